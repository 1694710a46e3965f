"""Does a translated guest survive many in-place retirements?  (lab group ``inplace-soak``,
by hand, its own boot.)

Three PVH memtest guests side by side, for a fixed time, one step each per round:

* ``soaka``: one memtest frame retired in place (guard frames, offline mark, pause, copy out,
  ``XENMEM_decrease_reservation``, ``XENMEM_populate_physmap``, copy back, unpause);
* ``soakc``: the same without the offline mark (the old frame goes back to Xen's heap);
* ``soakb``, the control: pause, copy the same page out, write it back, unpause -- every step
  but the decrease and the populate.

Asked because in three eager-FPU lab boots a translated guest that had had frames retired in
place later triple-faulted (tests_xen/README.md).  Every guest must be alive and its memtest
clean at the end.  A triple fault's guest RIP (the guests boot with ``nokaslr``, so dom0's
``/proc/kallsyms`` names it) goes into the record."""

from __future__ import annotations

import os
import re
import time

import numpy as np

import translated as T
from helpers import run

SECONDS = float(os.environ.get("XENPAGE_LAB_SOAK_S", "300"))
APPEND = "nokaslr"
RX_TRIPLE = re.compile(r"d(\d+)v\d+ Triple fault.*?RIP:\s+([0-9a-f]{4}):\[<([0-9a-f]+)>\]", re.S)


def _kallsyms() -> tuple[np.ndarray, list[str]]:
    addrs, names = [], []
    with open("/proc/kallsyms") as f:
        for ln in f:
            a, t, n = ln.split()[:3]
            if t in "tTwW" and int(a, 16):
                addrs.append(int(a, 16))
                names.append(n)
    order = np.argsort(np.array(addrs, dtype=np.uint64))
    return np.array(addrs, dtype=np.uint64)[order], [names[i] for i in order]


def _symbol(rip: int, ks) -> str:
    addrs, names = ks
    i = int(np.searchsorted(addrs, np.uint64(rip), side="right")) - 1
    return f"{names[i]}+{rip - int(addrs[i]):#x}" if i >= 0 else "?"


def _triples() -> list[dict]:
    out = run(["xl", "dmesg"], timeout=60).stdout
    ks = _kallsyms()
    res = []
    for m in RX_TRIPLE.finditer(out):
        rip = int(m.group(3), 16)
        res.append({"domid": int(m.group(1)), "cs": m.group(2), "rip": hex(rip),
                    "symbol": _symbol(rip, ks) if m.group(2) != "e008" else "(Xen's context)"})
    return res


def _control(xen, g: T.TGuest, gfn: int) -> bool:
    assert xen.pause(g.domid) == 0
    try:
        rc, data = xen.read_pages(g.domid, np.array([gfn], dtype=np.int64))
        wrc = xen.write_pages(g.domid, np.array([gfn], dtype=np.int64), data) if rc == 0 else rc
    finally:
        xen.unpause(g.domid)
    return rc == 0 and wrc == 0


def test_inplace_soak(xen, rec):
    guests = {k: T.start("pvh", rec, name=f"soak{k}", append=APPEND) for k in "abc"}
    pf = {k: g.pfns() for k, g in guests.items()}
    n = min(len(p) for p in pf.values())
    steps = {k: 0 for k in guests}
    dead: dict[str, dict] = {}
    t0 = time.time()
    i = 0
    while time.time() - t0 < SECONDS and len(dead) < len(guests):
        idx = (17 + 389 * i) % n
        for k, g in guests.items():
            if k in dead:
                continue
            info = xen.domain_info(g.domid)
            if info is None or info.shutdown:
                dead[k] = {"round": i, "steps": steps[k], "after_s": round(time.time() - t0, 1),
                           "shutdown_reason": None if info is None else info.shutdown_reason,
                           "tail": g.tail(6)}
                continue
            gfn = pf[k][idx]
            if k == "a":
                gfns, old = T.frames(xen, g, [idx])
                guard = T.guarded(xen, old)
                T.mark(xen, old)
                try:
                    r = T.decrease_populate(xen, g.domid, gfns)
                finally:
                    guard.release()
                ok = r["decrease_done"] == 1 and r["populate_done"] == 1 and r["identical"]
            elif k == "c":
                r = T.decrease_populate(xen, g.domid, np.array([gfn], dtype=np.int64))
                ok = r["decrease_done"] == 1 and r["populate_done"] == 1 and r["identical"]
            else:
                ok = _control(xen, g, gfn)
            assert ok, (k, i, hex(gfn))
            steps[k] += 1
        i += 1
        if i % 25 == 0:
            rec.add("soak-progress", round=i, steps=steps, dead=sorted(dead),
                    gens={k: g.last_gen() for k, g in guests.items()})
    time.sleep(10)
    triples = _triples()
    res = {k: {"domid": g.domid, "steps": steps[k], "dead": dead.get(k), "last_gen": g.last_gen(),
               "bad": g.bad_lines()[:5], "heartbeats": len(g.heartbeats())} for k, g in guests.items()}
    rec.add("soak", seconds=SECONDS, rounds=i, guests=res, triple_faults=triples)
    assert not dead and not triples, (dead, triples)
    for k, g in guests.items():
        assert not g.bad_lines(), (k, g.bad_lines()[:5])
