"""Random-delay SIGKILL over the real CLI -- test support for ``make test`` and ``make soak``.

Each round copies a saved simulated host, starts ``xenpage mem-offline`` of five frames of a PV
guest (a data group and three table groups), sends it SIGKILL after a random delay (uniform
over the time a whole run takes; every other round the clock starts when the run's journal
appears, the delay uniform over the time its exchanges take), runs ``xenpage recover`` in a new process, then checks that
nothing was lost: the invariant checker, every guest's own content check, the guest running
with the memory it had, and -- after ``mem-offline`` is run again -- every frame retired.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from simworld import image, problems
from xenpage.backends.sim import SimHypervisor, host_path
from xenpage.hypervisor.host import Host
from xenpage.toolstack import journal
from xenpage.toolstack.offline import mem_offline

EXE = Path(sys.executable).with_name("xenpage")


def five_frames(host, domid: int = 1) -> list[int]:
    """A shared user page, a kernel-only page, a pinned user L1, an unpinned L2 and a P2M
    frame: one data group and three table groups."""
    g = host.guests[domid]
    pf = [g.user_pages("shared")[0], g.kernel_only_pages()[0], g.procs[0].ul1[0],
          g.procs[1].ul2, g.tables["p2m"][0]]
    return [g.mfn(p) for p in pf]


def _cmd() -> list[str]:
    return [str(EXE)] if EXE.exists() else [sys.executable, "-m", "xenpage.cli.main"]


def _env(state: Path) -> dict:
    return dict(os.environ, XENPAGE_STATE_DIR=str(state), XENPAGE_BACKEND="sim",
                OPENBLAS_NUM_THREADS="1")


def _check(state: Path, before, domid: int = 1) -> list[str]:
    host = Host.load(host_path(state))
    out = list(problems(host))
    if host.domains[domid].is_shutting_down:
        out.append(f"d{domid} left suspended")
    if not image(host, domid).same_memory(before):
        out.append(f"d{domid}'s memory changed")
    return out


def _wait_for_journal(p: subprocess.Popen, state: Path, timeout: float) -> float | None:
    """Poll until ``state`` holds a journal (the time then) or ``p`` ends (None)."""
    jp = journal.journal_path(state)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if jp.exists():
            return time.monotonic()
        if p.poll() is not None:
            return None
        time.sleep(0.0005)
    return None


def run(base: Path, work: Path, kills: int, seed: int = 1, log=None) -> Counter:
    """``kills`` rounds on copies of the host saved in ``base`` (scratch in ``work``).
    Returns the counts (``kills``, ``mid_run``, ``journal_open``, ``completed_by_recover``,
    ``rolled_back_by_recover``); raises AssertionError on the first thing lost."""
    rng = np.random.default_rng(seed)
    host = Host.load(host_path(base))
    mfns = five_frames(host)
    before = image(host, 1)
    args = ["--backend", "sim", "mem-offline"] + [f"{m:x}" for m in mfns]
    # how long a whole run takes here, and when its first journal appears
    state = work / "calibrate"
    shutil.copytree(base, state, symlinks=True)
    t0 = time.monotonic()
    p = subprocess.Popen(_cmd() + args, env=_env(state), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    first = _wait_for_journal(p, state, 300.0)
    err = p.communicate(timeout=300)[1]
    whole = time.monotonic() - t0
    assert p.returncode == 0 and first is not None, (p.returncode, err)
    first -= t0
    shutil.rmtree(state)
    c: Counter = Counter()
    for i in range(kills):
        state = work / f"kill{i}"
        shutil.copytree(base, state, symlinks=True)
        # every other round: the clock starts when the journal appears (the exchanges)
        in_exchange = bool(i % 2)
        span = (whole - first) if in_exchange else whole
        delay = float(rng.uniform(0.0, span * 1.1))
        p = subprocess.Popen(_cmd() + args, env=_env(state), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
        if in_exchange:
            _wait_for_journal(p, state, 300.0)
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)  # this round's own child, by its pid
        err = p.communicate(timeout=300)[1]
        c["kills"] += 1
        mid = p.returncode == -signal.SIGKILL
        c["mid_run"] += mid
        if not mid:
            assert p.returncode == 0 and "Traceback" not in err, (seed, i, p.returncode, err)
        jopen = journal.journal_path(state).exists()
        c["journal_open"] += jopen
        rec = subprocess.run(_cmd() + ["--backend", "sim", "recover", "--json"], env=_env(state),
                             capture_output=True, text=True, timeout=300)
        assert rec.returncode == 0, (seed, i, delay, rec.stderr)
        if jopen:
            import json
            out = json.loads(rec.stdout)
            c["completed_by_recover"] += len(out["completed"])
            c["rolled_back_by_recover"] += len(out["rolled_back"])
        lost = _check(state, before)
        assert not lost, (seed, i, delay, lost[:10])
        # the command again (in-process) retires every frame
        h = Host.load(host_path(state))
        hv = SimHypervisor(h)  # not saved: checked here, in memory
        res = mem_offline(hv, mfns, journal_dir=state)
        assert res.report.exit_code == 0, (seed, i, [ln.text for ln in res.report.lines])
        assert all(h.ft.owner(m) is None for m in mfns), (seed, i)
        lost = list(problems(h))
        if not image(h, 1).same_memory(before):
            lost.append("d1's memory changed after the re-run")
        assert not lost, (seed, i, delay, lost[:10])
        shutil.rmtree(state)
        if log is not None:
            log(f"  kill {i + 1}/{kills} after {delay * 1000:.0f} ms: "
                f"{'mid-run' if mid else 'after the end'}"
                f"{', journal open' if jopen else ''} -- nothing lost")
    c["whole_run_ms"] = int(whole * 1000)
    c["exchange_ms"] = int((whole - first) * 1000)
    return c
