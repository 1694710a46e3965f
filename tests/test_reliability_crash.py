"""Crash safety: an exchange interrupted at any point -- the toolstack process killed -- is
completed or rolled back by ``xenpage recover`` from the write-ahead journal, and the guest
resumes with every byte of its memory.

Two levels:

* the real command, killed with SIGKILL at every journal point of every exchange group (the
  CLI run by ``tests/crashrun.py``, which installs the test-only crash hook), then
  ``xenpage recover`` in a new process;
* in-process, a "kill" between *every* two hypercalls of mem-offline: the host is saved at
  that instant (what a dead process leaves), the process state thrown away, the host loaded
  back and recovered.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from xenpage.backends.sim import SimHypervisor, host_path
from xenpage.hypervisor.host import Host
from randomkill import five_frames
from simworld import image, problems, small_host
from xenpage.toolstack import crashpoint, journal, pcpu
from xenpage.toolstack.faults import MUTATING, Action, FaultPlan, FaultyHypervisor
from xenpage.toolstack.offline import mem_offline
from xenpage.toolstack.outcomes import Kind

EXE = Path(sys.executable).with_name("xenpage")
CRASHRUN = Path(__file__).resolve().with_name("crashrun.py")


#: a shared user page, a kernel-only page, a pinned user L1, an unpinned L2 and a P2M frame
targets = five_frames


@pytest.fixture(scope="module")
def crash_state(tmp_path_factory):
    d = tmp_path_factory.mktemp("crash-host")
    host, _ = small_host()
    host.save(host_path(d))
    return d


def _run(state, *args, crash=None):
    env = dict(os.environ, XENPAGE_STATE_DIR=str(state), XENPAGE_BACKEND="sim")
    if crash:
        cmd = [sys.executable, str(CRASHRUN), "--crash-at", crash, "--"]
    else:
        cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "xenpage.cli.main"]
    return subprocess.run(cmd + ["--backend", "sim"] + [str(a) for a in args], capture_output=True,
                          text=True, env=env, timeout=120)


def _check_recovered(host: Host, before, mfns: list[int], domid: int = 1) -> dict:
    assert problems(host) == []
    d = host.domains[domid]
    assert not d.is_shutting_down, "the guest was left suspended"
    after = image(host, domid)
    assert after.same_memory(before), "the guest's memory changed"
    p2m_before = np.frombuffer(before.p2m, dtype=np.int64)
    p2m_after = host.pv_p2m(domid).astype(np.int64)
    kinds = {}
    for m in mfns:
        pf = int(np.flatnonzero(p2m_before == m)[0])
        if p2m_after[pf] == m:
            kinds[m] = "rolled-back"
        else:
            kinds[m] = "complete"
            assert host.ft.owner(m) is None  # the old frame left the guest (offlined)
    return kinds


CLI_POINTS = [p for p in crashpoint.POINTS] + ["pinned", "clearing:2", "snapshot+:2", "exchanged+:3",
                                                  "done:3", "p2m:3", "copied:3"]


@pytest.mark.parametrize("point", CLI_POINTS)
def test_kill_the_command_then_recover(crash_state, tmp_path, point):
    state = tmp_path / "s"
    shutil.copytree(crash_state, state)
    host = Host.load(host_path(state))
    mfns = targets(host)
    before = image(host, 1)
    affinity = [list(a) for a in host.domains[0].affinity]
    assert any(0 in a for a in affinity)
    r = _run(state, "mem-offline", *[f"{m:x}" for m in mfns], crash=point)
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr)
    killed = Host.load(host_path(state))
    if point.startswith("pinned"):  # killed while dom0 was kept off pCPU 0
        assert all(0 not in a for a in killed.domains[0].affinity)
        assert (state / pcpu.AFFINITY_RECORD).exists()
    jp = journal.journal_path(state)
    rec = _run(state, "recover", "--json")
    assert rec.returncode == 0, rec.stderr
    out = json.loads(rec.stdout)
    assert out["ok"] and not jp.exists()
    assert bool(out["dom0_affinity_restored"]) == point.startswith("pinned")
    host = Host.load(host_path(state))
    assert host.domains[0].affinity == affinity      # dom0 may run on pCPU 0 again
    assert not (state / pcpu.AFFINITY_RECORD).exists()
    kinds = _check_recovered(host, before, mfns)
    # what recover said is what happened
    assert sorted(c["mfn"] for c in out["completed"]) == sorted(
        m for m, k in kinds.items() if k == "complete" and m in {c["mfn"] for c in out["completed"]}) 
    # the same command again finishes the job
    r = _run(state, "mem-offline", *[f"{m:x}" for m in mfns], "--json")
    host = Host.load(host_path(state))
    assert problems(host) == []
    assert image(host, 1).same_memory(before)
    assert all(host.ft.owner(m) is None for m in mfns), r.stdout


def test_recover_without_journal(crash_state, tmp_path):
    state = tmp_path / "s"
    shutil.copytree(crash_state, state)
    r = _run(state, "recover")
    assert r.returncode == 0 and "no interrupted exchange" in r.stdout


def test_torn_journal_line_is_ignored(crash_state, tmp_path):
    """Killed while writing a record: the torn line was never durable, so its step never
    started -- recover acts on the records before it."""
    state = tmp_path / "s"
    shutil.copytree(crash_state, state)
    host = Host.load(host_path(state))
    mfns = targets(host)
    before = image(host, 1)
    r = _run(state, "mem-offline", *[f"{m:x}" for m in mfns], crash="snapshot")
    assert r.returncode == -signal.SIGKILL
    with open(journal.journal_path(state), "a") as f:
        f.write('{"op":"snapshot","content":{"12')  # torn
    rec = _run(state, "recover", "--json")
    assert rec.returncode == 0, rec.stderr
    host = Host.load(host_path(state))
    assert set(_check_recovered(host, before, mfns).values()) <= {"rolled-back", "complete"}


class Killed(BaseException):
    pass


def _calls(host_factory, mfns):
    host, hv = host_factory()
    fh = FaultyHypervisor(hv)
    mem_offline(fh, mfns, journal_dir=None)
    return fh.calls


def test_kill_between_every_two_hypercalls(tmp_path):
    """Every hypercall boundary of a mem-offline of five frames (data and tables, four
    exchange groups): save the host there, drop the process, load, recover, check."""
    host0, _ = small_host()
    mfns = targets(host0)
    calls = _calls(small_host, mfns)
    assert len(calls) > 60
    if not os.environ.get("CI"):
        # the host changes only at mutating calls: a kill before each of them (and at the
        # end) reaches every distinct saved host; CI also kills before every read
        calls = [c for c in calls if c[1] in MUTATING] + [calls[-1]]
    outcomes = {"complete": 0, "rolled-back": 0}
    for seq, method, nth in calls:
        state = tmp_path / f"k{seq}"
        host, hv = small_host()
        hv.state_dir, hv.path = state, host_path(state)
        host.save(hv.path)
        before = image(host, 1)

        def kill(inner):
            inner.checkpoint()
            raise Killed()
        fh = FaultyHypervisor(hv, FaultPlan(actions=[Action(seq, kill)]))
        with pytest.raises(Killed):
            mem_offline(fh, mfns, journal_dir=state)
        del host, hv, fh
        host = Host.load(host_path(state))
        hv = SimHypervisor(host)
        res = journal.recover(hv, state)
        assert res.ok, (seq, method, res.errors)
        assert not journal.journal_path(state).exists()
        kinds = _check_recovered(host, before, mfns)
        for k in kinds.values():
            outcomes[k] += 1
        # and a new run completes every exchange
        r = mem_offline(hv, mfns, journal_dir=state)
        assert all(o.kind in (Kind.EXCHANGED, Kind.OFFLINED) for o in r.outcomes), (seq, method, r.outcomes)
        assert problems(host) == []
        assert image(host, 1).same_memory(before)
        shutil.rmtree(state)
    assert outcomes["complete"] and outcomes["rolled-back"]


@pytest.mark.parametrize("point", ["guarded", "pinned:2"])
def test_kill_while_guard_frames_are_held_then_recover(tmp_path, point):
    """On a 4.17-split host mem-offline holds guard frames (toolstack/split_guard.py) before
    it marks anything; killed there -- or while marking, dom0 pinned off pCPU 0 --
    `xenpage recover` onlines every one of them and gives dom0 its affinity back: the heap
    is what it was, nothing left offline."""
    state = tmp_path / "s"
    host, _ = small_host()
    host.quirks.reserve_misaligned = True
    h, k = next((h, k) for h, k in host.heap.chunks() if k >= 8)
    host.save(host_path(state))
    free0, offl0 = host.heap.free_pages, dict(host.heap.offlined_list)
    affinity = [list(a) for a in host.domains[0].affinity]
    r = _run(state, "mem-offline", f"{h + 1:x}", f"{h + 9:x}", crash=point)
    assert r.returncode == -signal.SIGKILL, r.stderr
    host = Host.load(host_path(state))
    assert host.heap.free_pages < free0           # guard frames held when it died
    pinned = all(0 not in a for a in host.domains[0].affinity)
    assert pinned == (point == "pinned:2")
    rec = _run(state, "recover", "--json")
    assert rec.returncode == 0, rec.stderr
    out = json.loads(rec.stdout)
    back = out["guard_frames_onlined"]
    assert bool(out["dom0_affinity_restored"]) == pinned
    host = Host.load(host_path(state))
    assert host.domains[0].affinity == affinity
    assert back and host.heap.free_pages == free0 and dict(host.heap.offlined_list) == offl0
    assert problems(host) == [] and host.heap.misaligned == 0
    # the command again: the two frames offlined, every chunk aligned
    r = _run(state, "mem-offline", f"{h + 1:x}", f"{h + 9:x}")
    assert r.returncode == 0, r.stderr
    host = Host.load(host_path(state))
    assert sorted(set(host.heap.offlined_list) - set(offl0)) == [h + 1, h + 9]
    assert problems(host) == [] and host.heap.misaligned == 0


def test_next_mem_offline_restores_dom0_after_a_kill_while_pinned(crash_state, tmp_path):
    """No `recover` typed: the next mem-offline gives dom0 its affinity back first (from the
    record the killed one left), then does its work from pCPU 1 and restores it again."""
    state = tmp_path / "s"
    shutil.copytree(crash_state, state)
    host = Host.load(host_path(state))
    mfns = targets(host)[:2]
    affinity = [list(a) for a in host.domains[0].affinity]
    r = _run(state, "mem-offline", *[f"{m:x}" for m in mfns], crash="pinned")
    assert r.returncode == -signal.SIGKILL
    assert all(0 not in a for a in Host.load(host_path(state)).domains[0].affinity)
    r = _run(state, "mem-offline", *[f"{m:x}" for m in mfns], "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["timings"]["dom0_affinity_restored"]
    host = Host.load(host_path(state))
    assert host.domains[0].affinity == affinity and not (state / pcpu.AFFINITY_RECORD).exists()
    assert all(host.ft.owner(m) is None for m in mfns) and problems(host) == []


def test_damaged_affinity_record_is_refused(crash_state, tmp_path):
    state = tmp_path / "s"
    shutil.copytree(crash_state, state)
    (state / pcpu.AFFINITY_RECORD).write_text('{"dom0_vcpus": {"0": "x"}')
    r = _run(state, "recover")
    assert r.returncode == 2 and "unreadable record of dom0's vCPU affinity" in r.stderr
    assert (state / pcpu.AFFINITY_RECORD).exists()


def test_a_failed_automatic_recovery_stops_mem_offline(crash_state, tmp_path):
    """Killed after XENMEM_exchange, then re-run while the backend cannot map the guest's
    frames: the automatic recovery fails, so mem-offline does nothing else (exit 2, the
    journal kept, no 'offlined successfully', no new journal over the old one); once the
    backend works again 'recover' completes it with the guest's memory whole (issue 19,
    item 1)."""
    from xenpage.abi import errno as E
    from xenpage.backends.sim import open_host
    from xenpage.toolstack.faults import Fault
    from xenpage.toolstack.outcomes import Reason
    state = tmp_path / "s"
    shutil.copytree(crash_state, state)
    host = Host.load(host_path(state))
    mfns = targets(host)
    before = image(host, 1)
    r = _run(state, "mem-offline", *[f"{m:x}" for m in mfns], crash="exchanged+")
    assert r.returncode == -signal.SIGKILL, r.stderr
    jp = journal.journal_path(state)
    kept = jp.read_bytes()
    with open_host(state) as hv:
        bad = FaultyHypervisor(hv, FaultPlan([Fault(k, "map_foreign", E.EFAULT) for k in range(1, 200)]))
        res = mem_offline(bad, mfns, journal_dir=state)
        assert bad.injected, "the recovery never needed a mapping"
    assert res.report.exit_code == 2
    text = "".join(ln.text for ln in res.report.lines)
    assert "could not be completed" in text and "offlined successfully" not in text
    assert all(o.reason == Reason.RECOVERY_NEEDED for o in res.outcomes)
    assert jp.read_bytes().startswith(kept[:kept.index(b"\n") + 1])   # the same begin record
    rec = _run(state, "recover", "--json")
    assert rec.returncode == 0, rec.stderr
    assert not jp.exists()
    host = Host.load(host_path(state))
    _check_recovered(host, before, mfns)


def test_snapshot_record_keeps_the_p2m_frames_recovery_reads():
    """The snapshot record holds the P2M frame of each gpfn of the group and the place of
    every frame of the group that is a P2M frame -- not the whole list (131,072 entries at
    256 GiB) -- and recovery gets those entries back where it reads them."""
    rng = np.random.default_rng(5)
    pf = rng.choice(1 << 30, size=131072, replace=False).astype(np.int64)
    grp = [(int(pf[77]), 77 * 512 + 3, 0), (123456, 5 * 512, 0), (777, 131071 * 512 + 9, 1)]
    rec = journal._p2m_frames_needed(pf, grp)
    assert json.loads(json.dumps(rec)) == rec and len(rec["at"]) == 3
    back = journal._p2m_frames_array(rec)
    assert back.size == pf.size
    for i in (77, 5, 131071):
        assert back[i] == pf[i]
    assert np.flatnonzero(np.isin(back, [m for m, _, _ in grp])).tolist() == [77]
    assert journal._p2m_frames_array([1, 2, 3]).tolist() == [1, 2, 3]  # an older journal's list
