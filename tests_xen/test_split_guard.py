"""Xen 4.17's misaligned buddy split on real Xen (backends/xen/quirks.py,
toolstack/split_guard.py).

Stock xen-hptool offlining a free frame that *heads* a large free buddy leaves Xen 4.17's
free lists with chunks not aligned to their order; later allocations and frees then build
"free" chunks over frames in use (our early lab runs: a FATAL PAGE FAULT in free_heap_pages,
a domU and dom0 handed the same memory).  xenpage offlines the same frames guarded: here it
offlines frames aligned to 2^13 across RAM in one command -- the free ones are buddy heads --
keeps them offline while guests are built and destroyed over that memory twice, and Xen must
stay up, the guests must see no corruption, the guard must give back every frame it took,
and the frames come back online at the end.  Runs on its own boot (run_lab.py group
``split``)."""

from __future__ import annotations

import os

import pytest

from helpers import run, start_guest, status, xenpage_inproc
from xenpage.abi import sysctl as S
from xenpage.toolstack.pcpu import off_pcpu0

STEP = 0x2000          # candidates aligned to 2^13 frames (32 MiB)
#: Xen's own run-time allocations (event channels, xenstore rings ...) move free_pages a little
SLACK = 64


def destroy_guest(xen, g) -> None:
    """``xl destroy``, so that libxl tears the domain's devices and its xl daemon down (a bare
    XEN_DOMCTL_destroydomain leaves them, and after a few such guests ``xl create`` fails on
    this machine with nothing offlined at all: the control run).  dom0 off pCPU 0 (4.17's
    PoD-lock hang)."""
    with off_pcpu0(xen):
        r = run(["xl", "destroy", g.name], timeout=120)
    assert r.rc == 0, f"xl destroy {g.name}: {r.stderr}"


def churn(xen, rec, prefix: str, rounds: int = 2, per_round: int = 3) -> list[dict]:
    """Build ``per_round`` memtest guests, wait for two heartbeats each, destroy them; again.
    Asserts that no guest saw corruption; returns a record per round."""
    out = []
    for rnd in range(rounds):
        guests = [start_guest(f"{prefix}-{rnd}-{i}") for i in range(per_round)]
        marks = {g.name: g.mark() for g in guests}
        hbs = {g.name: g.wait_heartbeats(2, after=marks[g.name], timeout=90) for g in guests}
        bad = {g.name: g.bad_lines(marks[g.name]) for g in guests}
        for g in guests:
            destroy_guest(xen, g)
        out.append({"round": rnd, "domids": [g.domid for g in guests],
                    "heartbeats": {k: v[-1:] for k, v in hbs.items()}, "bad": bad,
                    "free_pages": _free_pages(xen)})
        rec.add(f"{prefix}-churn", **out[-1])
        assert all(len(v) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in v) for v in hbs.values()), hbs
        assert not any(bad.values()), bad
    return out


def _free_pages(xen) -> int:
    return int(xen.physinfo().free_pages)


def test_guarded_offline_of_buddy_heads_survives_domain_churn(xen, rec):
    maxm = xen.max_mfn()
    cands = list(range(0x10000, maxm - STEP, STEP))
    free0 = _free_pages(xen)
    off = xenpage_inproc("mem-offline", *[f"{m:x}" for m in cands], as_json=True)
    outs = off.data["outcomes"]
    held = [o["mfn"] for o in outs if o["kind"] == "offlined"]
    pending = [o["mfn"] for o in outs if o["kind"] == "pending"]
    guard = off.data["timings"].get("split_guard")
    # frames found in use (dom0's, Xen's) go back at once
    for m in pending:
        assert xenpage_inproc("mem-online", f"{m:x}").rc == 0
    free1 = _free_pages(xen)
    rec.add("split-guard-offline", candidates=len(cands), offlined=[hex(m) for m in held],
            pending=[hex(m) for m in pending], guard=guard, free_pages_before=free0,
            free_pages_after=free1, elapsed_s=round(off.elapsed_s, 3))
    assert len(held) >= 4, f"too few free candidates: {outs}"
    assert guard and guard["guard_frames_probed"] > 0
    # every guard frame went back: only the offlined targets are missing from the heap
    assert abs(free1 - (free0 - len(held))) <= SLACK, (free0, free1, len(held))
    assert all(status(xen, m) == S.PG_OFFLINE_STATUS_OFFLINED for m in held)

    churn(xen, rec, "split")
    assert all(status(xen, m) == S.PG_OFFLINE_STATUS_OFFLINED for m in held)
    assert abs(_free_pages(xen) - free1) <= SLACK
    for m in held:
        r = xenpage_inproc("mem-online", f"{m:x}")
        assert r.rc == 0 and f"Memory mfn {m:x} onlined successfully" in r.stdout
        assert status(xen, m) == 0
    assert abs(_free_pages(xen) - free0) <= SLACK


@pytest.mark.skipif(not os.environ.get("XENPAGE_SPLIT_CONTROL"),
                    reason="control run by hand: run_lab.py --arg XENPAGE_SPLIT_CONTROL=1")
def test_control_domain_churn_without_offlines(xen, rec):
    """The churn alone, nothing offlined: what xl does on this machine by itself."""
    churn(xen, rec, "ctl")


@pytest.mark.skipif(not os.environ.get("XENPAGE_SPLIT_STOCK"),
                    reason="destructive counterpart, run by hand: run_lab.py --group split "
                           "--arg XENPAGE_SPLIT_STOCK=1")
def test_stock_offline_of_buddy_heads_then_domain_churn(xen, rec):
    """The same frames offlined by stock xen-hptool (one mem-offline each; dom0 kept off
    pCPU 0 so that only the heap defect is in play), then the same churn."""
    from helpers import hptool
    from xenpage.toolstack.pcpu import off_pcpu0
    maxm = xen.max_mfn()
    held = []
    for m in range(0x10000, maxm - STEP, STEP):
        with off_pcpu0(xen):
            r = hptool("mem-offline", f"{m:x}")
        if "current state is [PG_OFFLINE_OFFLINED]" in r.stdout:
            held.append(m)
        elif status(xen, m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING:
            hptool("mem-online", f"{m:x}")
    rec.add("split-stock-offline", offlined=[hex(m) for m in held])
    churn(xen, rec, "stock")
