"""The simulator's batched L1 path of ``mmu_update`` (``hypervisor.mm._l1_batch``) must be a
pure speed-up: for any batch, the return value and the whole host afterwards (every
page_info field, every table word, the heap's free lists in order, the offlined list,
domains' page counts) are exactly what processing the requests one by one gives, as
``do_mmu_update`` does.  Hypothesis draws batches mixing the cases the batched path must
decline (repeated slots, a frame both mapped and unmapped, flags Xen refuses, frames a
guest may not map, non-L1 targets, MACHPHYS requests in the middle) with those it takes."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenpage.abi.xen import INVALID_MFN
from xenpage.hypervisor import invariants, mm
from xenpage.hypervisor.host import Host, HostConfig
from xenpage.hypervisor.memory import Reservation

from page_info import pte, write  # noqa: E402

P, RW, US, PWT, A, D, PSE = 0x1, 0x2, 0x4, 0x8, 0x20, 0x40, 0x80
LINK = P | RW | US | A | D
NORMAL, MACHPHYS, PRESERVE_AD = 0, 1, 2
PIN_L4 = 3


def build():
    """dom0; guest u (64 frames) with a pinned L4 -> L3 -> L2 -> three L1s (f[4..6]); the
    L1s map data frames, one of them twice, and two frames u gave back (their mappings
    hold the last references, so unmapping frees them); guest v (32 frames)."""
    h = Host.boot(HostConfig(mem_bytes=64 << 20), dom0_pages=2048)
    u = h.create_domain("u", 64)
    v = h.create_domain("v", 32)
    f = [int(x) for x in h.p2m[u.domid]]
    t4, t3, t2 = f[1:4]
    l1s = f[4:7]
    write(h, t4, {0: pte(t3, LINK)})
    write(h, t3, {0: pte(t2, LINK)})
    write(h, t2, {i: pte(t, LINK) for i, t in enumerate(l1s)})
    write(h, l1s[0], {i: pte(f[10 + i], P | RW | US | A | D) for i in range(8)} | {8: pte(f[10], P | US)})
    write(h, l1s[1], {i: pte(f[20 + i], P | US | A) for i in range(6)} | {6: pte(f[20], P | RW)})
    write(h, l1s[2], {0: pte(f[30], P | US), 1: pte(f[30], P | US), 2: pte(f[35], P | RW)})
    hc = h.hypercalls(u.domid)
    assert hc.mmuext_op([(PIN_L4, t4)]) == (0, 1)
    assert abs(f[30] - f[35]) > 1 and f[30] ^ f[35] != 1  # freed apart, never merged
    assert hc.decrease_reservation(Reservation([f[30], f[35]])) == 2
    h.p2m[u.domid][[30, 35]] = INVALID_MFN  # as the guest's balloon driver does
    assert not invariants.check(h)
    return h, u.domid, v.domid, f, l1s


def snapshot(h) -> dict:
    ft = h.ft
    return {
        "arrays": {k: v.copy() for k, v in ft.to_arrays().items()},
        "heap": h.heap.to_state(),
        "tot": {d: h.domains[d].tot_pages for d in sorted(h.domains)},
    }


def same(a: dict, b: dict) -> bool:
    if a["heap"] != b["heap"] or a["tot"] != b["tot"] or a["arrays"].keys() != b["arrays"].keys():
        return False
    return all(np.array_equal(a["arrays"][k], b["arrays"][k]) for k in a["arrays"])


def run(reqs: list[tuple[int, int]], batched: bool, caller: str = "u"):
    h, u, v, f, l1s = build()
    old = mm._BATCH_MIN
    mm._BATCH_MIN = old if batched else 1 << 30
    try:
        who = u if caller == "u" else 0
        fd = 0x7FF0 if caller == "u" else ((u + 1) << 16) | u
        rc = h.hypercalls(who).mmu_update(np.array(reqs, dtype=np.uint64).reshape(-1, 2), fd)
    finally:
        mm._BATCH_MIN = old
    return rc, snapshot(h), invariants.check(h)


@st.composite
def batches(draw):
    h, u, v, f, l1s = _layout()
    frames = [f[10], f[11], f[12], f[20], f[21], f[30], f[35], f[40], f[41], f[50],
              l1s[0], l1s[1], f[2], f[3],               # table frames (RO fine, RW refused)
              int(h.p2m[v][3]), int(h.owned_frames(0)[5]), 0xA0, h.nframes + 3]
    tables = l1s + [l1s[0]] * 2 + [f[3], f[45]]         # mostly L1s; an L2; a data frame
    n = draw(st.integers(8, 40))
    out = []
    for _ in range(n):
        cmd = draw(st.sampled_from([NORMAL] * 6 + [PRESERVE_AD] * 3 + [MACHPHYS]))
        if cmd == MACHPHYS:
            m = draw(st.sampled_from(frames[:10]))
            out.append(((m << 12) | MACHPHYS, f.index(m)))  # a run cut by a consistent M2P write
            continue
        t = draw(st.sampled_from(tables))
        idx = draw(st.integers(0, 12))
        if draw(st.integers(0, 3)) == 0:
            val = draw(st.sampled_from([0, A | D, 0x200]))         # non-present
        else:
            flags = draw(st.sampled_from([P, P | US, P | RW, P | RW | US | A | D, P | US | A,
                                          P | PWT, P | PSE, P | RW | (1 << 63)]))
            val = pte(draw(st.sampled_from(frames)), flags)
        out.append(((t << 12) | (idx << 3) | cmd, val))
    return out


@functools.lru_cache(maxsize=1)
def _layout():
    """The frame numbers of :func:`build`'s host (the same on every build)."""
    return build()


@given(batches(), st.sampled_from(["u", "dom0"]))
def test_batched_l1_updates_equal_one_by_one(reqs, caller):
    rc1, s1, p1 = run(reqs, batched=False, caller=caller)
    rc2, s2, p2 = run(reqs, batched=True, caller=caller)
    assert rc2 == rc1
    assert same(s1, s2)
    assert p1 == p2 == []


def test_clear_and_repoint_batches_take_the_batched_path(monkeypatch):
    """What the exchange sends (clear many entries; re-point them) is batched, and the
    result equals the one-by-one result."""
    h, u, v, f, l1s = build()
    seen = []
    real = mm._l1_batch

    def spy(*a, **kw):
        n = real(*a, **kw)
        seen.append(n)
        return n
    monkeypatch.setattr(mm, "_l1_batch", spy)
    t = l1s[0]
    clear = [((t << 12) | (i << 3) | PRESERVE_AD, 0) for i in range(8)]
    rc1, s1, _ = run(clear, batched=False, caller="dom0")
    rc2, s2, _ = run(clear, batched=True, caller="dom0")
    assert rc1 == rc2 == (0, 8) and same(s1, s2)
    assert seen == [8]
    # freed frames (the last reference was the mapping) leave in request order
    t2 = l1s[2]
    unmap = [((t2 << 12) | (i << 3) | NORMAL, 0) for i in (2, 1, 0)] + clear[:5]
    rc1, s1, _ = run(unmap, batched=False, caller="dom0")
    rc2, s2, _ = run(unmap, batched=True, caller="dom0")
    assert rc1 == rc2 == (0, 8) and same(s1, s2)
    assert seen[-1] == 8


@pytest.mark.parametrize("case", ["repeat-slot", "map-and-unmap", "bad-flags", "unmap-last-then-map"])
def test_declined_batches_still_match(case):
    h, u, v, f, l1s = build()
    t = l1s[1]
    reqs = [((t << 12) | (i << 3), 0) for i in range(8)]
    if case == "repeat-slot":
        reqs.append(((t << 12) | (3 << 3), pte(f[40], P | US)))
    elif case == "map-and-unmap":
        reqs.append(((t << 12) | (9 << 3), pte(f[20], P | US)))
    elif case == "bad-flags":
        reqs.insert(4, ((t << 12) | (9 << 3), pte(f[40], P | PSE)))
    else:  # the mapping held f[35]'s last reference: mapping it again must fail
        reqs[:0] = [((l1s[2] << 12) | (2 << 3), 0), ((t << 12) | (9 << 3), pte(f[35], P | US))]
    rc1, s1, p1 = run(reqs, batched=False)
    rc2, s2, p2 = run(reqs, batched=True)
    assert rc1 == rc2 and same(s1, s2) and p1 == p2 == []
    if case == "bad-flags":
        assert rc1 == (-22, 4)
    if case == "unmap-last-then-map":
        assert rc1 == (-16, 1)
