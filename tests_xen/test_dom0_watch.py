"""By hand (``run_lab.py --group dom0-watch``): which step on a PVH guest's memory disturbs
dom0's own memory?  dom0 runs the lab's memtest over 128 MiB of its own memory (a process
that fills its pages with a known pattern and checks them continuously, like the guests');
then, on a running PVH memtest guest, each step of the in-place retirement is done on its
own, and after each both memtests are read:

``p2m`` (``hvm_p2m`` of all of memtest's gfns, twice), ``probe`` (offline and online of one
frame), ``rewrite`` (a gfn copied out and back through a writable foreign mapping),
``decpop`` (pause, copy out, ``decrease_reservation``, ``populate_physmap``, copy back,
unpause, the frame not marked offline), ``inplace`` (the same with the frame marked offline
first: the old frame is offlined when freed), ``inplace8`` (eight frames under one pause).

Each step's record says how many of dom0's pages memtest found changed behind its back
(``dom0_corrupt``) and the first such lines."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np

import translated as T

HERE = Path(__file__).resolve().parent
LOG = Path("/tmp/dom0-memtest.log")
RX_OK = re.compile(r"^MEMTEST OK gen=(\d+) pages=(\d+) corrupt=(\d+) moved=(\d+)", re.M)


def _dom0() -> tuple[int, int, list[str]]:
    text = LOG.read_text(errors="replace") if LOG.exists() else ""
    ok = RX_OK.findall(text)
    bad = [ln for ln in text.splitlines() if "CORRUPT" in ln or "PFNMOVED" in ln]
    return (int(ok[-1][0]) if ok else -1), (int(ok[-1][2]) if ok else -1), bad


def _wait_dom0(after_gen: int, timeout: float = 120) -> tuple[int, int, list[str]]:
    end = time.time() + timeout
    while time.time() < end:
        g, c, bad = _dom0()
        if g > after_gen + 1:
            return g, c, bad
        time.sleep(1)
    return _dom0()


def test_dom0_memory_across_steps(xen, rec):
    exe = HERE / "memtest"
    proc = subprocess.Popen(["sh", "-c", f"exec {exe} 128 1 > {LOG} 2>&1"])
    end = time.time() + 300
    while time.time() < end and _dom0()[0] < 1:
        time.sleep(1)
    assert _dom0()[0] >= 1, f"dom0 memtest did not start: {LOG.read_text()[-500:] if LOG.exists() else ''}"
    g = T.start("pvh", rec)
    results = []

    def step(name: str, fn) -> None:
        gen0, c0, _ = _dom0()
        hgen = g.last_gen()
        t = time.perf_counter()
        info = fn() or {}
        took = time.perf_counter() - t
        gen1, c1, bad = _wait_dom0(gen0)
        hb = g.wait_after(hgen, 2)
        r = dict(step=name, took_s=round(took, 3), dom0_gen=gen1, dom0_corrupt=c1,
                 dom0_corrupt_new=c1 - c0, dom0_bad_lines=bad[:6], guest_heartbeats=hb[-2:],
                 guest_bad=g.bad_lines()[:4], **info)
        rec.add("dom0-watch", **r)
        results.append(r)

    idx = T.at(g, [T.ONE, 0.3, 0.6])
    pf = g.pfns()

    def p2m():
        gf = np.array([pf[i] for i in sorted(pf)], dtype=np.int64)
        out = [xen.hvm_p2m(g.domid, gf)[0] for _ in range(2)]
        return {"rc": out}

    def probe():
        _, old = T.frames(xen, g, [idx[0] + 1])
        st = T.mark(xen, [int(old[0])])[0]
        rc, st2 = xen.page_offline_op(T.S.sysctl_page_online, int(old[0]), int(old[0]))
        return {"mfn": hex(int(old[0])), "offline": hex(st), "online": rc}

    def rewrite():
        gf = np.array([pf[idx[1]]], dtype=np.int64)
        assert xen.pause(g.domid) == 0
        try:
            rc, data = xen.read_pages(g.domid, gf)
            wrc = xen.write_pages(g.domid, gf, data)
        finally:
            xen.unpause(g.domid)
        return {"gfn": hex(int(gf[0])), "rc": [rc, wrc]}

    def decpop():
        gf = np.array([pf[idx[2]]], dtype=np.int64)
        _, old = T.frames(xen, g, [idx[2]])
        assert xen.pause(g.domid) == 0
        try:
            rc, data = xen.read_pages(g.domid, gf)
            done = xen.decrease_reservation(g.domid, gf)
            st = T.status(xen, int(old[0]))
            pdone, _ = xen.populate_physmap(g.domid, gf)
            wrc = xen.write_pages(g.domid, gf, data)
        finally:
            xen.unpause(g.domid)
        return {"gfn": hex(int(gf[0])), "old": hex(int(old[0])), "done": [rc, done, pdone, wrc],
                "old_status_after_decrease": hex(st)}

    step("baseline", lambda: None)
    step("p2m", p2m)
    step("probe", probe)
    step("rewrite", rewrite)
    step("decpop", decpop)
    step("inplace", lambda: {"res": T.retire_in_place(xen, g, [T.ONE], rec, "watch-in-place-1")["new_mfns"]})
    step("inplace8", lambda: {"res": T.retire_in_place(xen, g, T.BATCH, rec, "watch-in-place-8")["new_mfns"]})
    step("after", lambda: time.sleep(20))
    proc.terminate()
    first = next((r["step"] for r in results if r["dom0_corrupt_new"] > 0), None)
    assert first is None, f"dom0's memory changed behind its back first after step {first!r}: " \
                          f"{[(r['step'], r['dom0_corrupt_new']) for r in results]}"
