"""The invariant checker: recompute every general and type count from first principles
(allocation references, page-table entries of validated tables, pins, CR3s, grant maps,
foreign mappings, Xen-heap shares) and compare with ``page_info``; check the M2P against
every P2M, the heap's lists against the frames' states, and that no retired frame is
referenced or allocated.

``check(host)`` returns the list of violations (empty when the host is consistent).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..abi import mm
from ..abi import pte as P
from ..abi.xen import DOMID_IO, DOMID_XEN, INVALID_MFN
from .mm import L4_XEN_FIRST, L4_XEN_LAST, refcounted

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

_U = np.uint64


class InvariantError(AssertionError):
    pass


def _table_entries(host: "Host", mfns: np.ndarray) -> np.ndarray:
    if mfns.size == 0:
        return np.zeros((0, 512), dtype=np.uint64)
    return np.stack([host.ft.table(int(m)) if int(m) in host.ft.pages else host.ft.read_page(int(m))
                     for m in mfns.tolist()])


def expected_counts(host: "Host") -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(general count, type count, required type per frame (-1 = any), problems)."""
    n = host.nframes
    ft = host.ft
    gen = np.zeros(n, dtype=np.int64)
    typ = np.zeros(n, dtype=np.int64)
    need = np.full(n, -1, dtype=np.int64)  # required PGT type >> 61
    problems: list[str] = []

    def want_type(frames: np.ndarray, t: int, why: str) -> None:
        if frames.size == 0:
            return
        cur = need[frames]
        clash = (cur != -1) & (cur != t)
        for f in frames[clash][:5].tolist():
            problems.append(f"mfn {f:#x} referenced both as type {int(need[f])} and {t} ({why})")
        need[frames] = t

    ti = ft.type_info
    gen += ft.has_flag(mm.PGC_allocated)
    tlevel = ((ti & _U(mm.PGT_type_mask)) >> _U(61)).astype(np.int64)
    validated = ((ti & _U(mm.PGT_validated)) != 0) & ((ti & _U(mm.PGT_count_mask)) != 0)
    for level in (1, 2, 3, 4):
        tabs = np.flatnonzero(validated & (tlevel == level))
        ents = _table_entries(host, tabs)
        if level == 4 and ents.size:
            ents = ents.copy()
            ents[:, L4_XEN_FIRST:L4_XEN_LAST + 1] = 0
        pres = (ents & _U(P._PAGE_PRESENT)) != 0
        frames = ((ents >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)
        if level > 1:
            pres &= frames != tabs[:, None]  # linear self entries hold nothing
        f = frames[pres]
        if level == 1:
            # MMIO / DOMID_IO frames are mapped without references (is_iomem_page)
            keep = refcounted(host, f)
            rw = ((ents & _U(P._PAGE_RW)) != 0)[pres][keep]
            owner_tab = np.broadcast_to((ft.owner1[tabs].astype(np.int64) - 1)[:, None],
                                        pres.shape)[pres][keep]
            f = f[keep]
            gen += np.bincount(f, minlength=n)[:n]
            typed = rw
            hv = [d.domid for d in host.domains.values() if d.hvm]
            if hv and rw.any():
                fo = ft.owner1[f].astype(np.int64) - 1
                typed = rw & ~(np.isin(fo, hv) & (fo != owner_tab))
            fw = f[typed]
            typ += np.bincount(fw, minlength=n)[:n]
            want_type(np.unique(fw), 7, "RW L1 entry")
            continue
        if (f >= n).any():
            problems.append(f"L{level} entries beyond the frame table")
            f = f[f < n]
        gen += np.bincount(f, minlength=n)[:n]
        typ += np.bincount(f, minlength=n)[:n]
        want_type(np.unique(f), level - 1, f"L{level} entry")
    pinned = np.flatnonzero((ti & _U(mm.PGT_pinned)) != 0)
    gen[pinned] += 1
    typ[pinned] += 1
    for d in host.domains.values():
        for m in d.guest_table + d.guest_table_user:
            if m:
                gen[m] += 1
                typ[m] += 1
                want_type(np.array([m]), 4, "CR3")
        if d.domid in (DOMID_IO, DOMID_XEN):
            continue
        xh = np.array(d.xenheap_pages, dtype=np.int64)
        typ[xh] += 1
        want_type(xh, 7, "Xen-heap share")
    io = np.flatnonzero(ft.owner1 == DOMID_IO + 1)
    typ[io] += 1
    for h in host.m2p_chunks:  # the M2P, shared read-only as DOMID_XEN's
        typ[h:h + 512] += 1
    for m in host.grants.maptrack.values():
        gen[m.mfn] += m.refs
        if m.type_refs:
            typ[m.mfn] += m.type_refs
            want_type(np.array([m.mfn]), 7, "writable grant map")
    for fm in host.foreign.maps.values():
        a = np.array(fm.mfns, dtype=np.int64)
        np.add.at(gen, a, 1)
        if fm.typed:
            np.add.at(typ, a, 1)
            want_type(np.unique(a), 7, "writable foreign map")
    return gen, typ, need, problems


def check(host: "Host") -> list[str]:
    ft = host.ft
    n = host.nframes
    gen, typ, need, problems = expected_counts(host)
    ti = ft.type_info
    have_gen = ft.counts().astype(np.int64)
    have_typ = (ti & _U(mm.PGT_count_mask)).astype(np.int64)
    for f in np.flatnonzero(have_gen != gen)[:10].tolist():
        problems.append(f"mfn {f:#x}: general count {have_gen[f]} but {gen[f]} references exist")
    for f in np.flatnonzero(have_typ != typ)[:10].tolist():
        problems.append(f"mfn {f:#x}: type count {have_typ[f]} but {typ[f]} type references exist")
    tl = ((ti & _U(mm.PGT_type_mask)) >> _U(61)).astype(np.int64)
    wrong = np.flatnonzero((need != -1) & (tl != need) & (typ > 0))
    for f in wrong[:10].tolist():
        problems.append(f"mfn {f:#x} has type {mm.PGT_NAMES.get(int(tl[f]) << 61)} but is used as {int(need[f])}")
    state = ft.states()
    # Type bits: pinned only on a validated page table; a validated table has a type count.
    lvl_ok = (tl >= 1) & (tl <= 4)
    pin = (ti & _U(mm.PGT_pinned)) != 0
    val = (ti & _U(mm.PGT_validated)) != 0
    for f in np.flatnonzero(pin & ~(lvl_ok & val))[:5].tolist():
        problems.append(f"mfn {f:#x} is pinned but not a validated page table")
    for f in np.flatnonzero(lvl_ok & val & (have_typ == 0))[:5].tolist():
        problems.append(f"mfn {f:#x} is a validated L{int(tl[f])} table with type count 0")
    # Owners exist; tot_pages adds up.
    own = ft.owner1.astype(np.int64) - 1
    owners, counts = np.unique(own[own >= 0], return_counts=True)
    for o, c in zip(owners.tolist(), counts.tolist()):
        d = host.domains.get(o)
        if d is None:
            problems.append(f"{c} frames owned by missing domain {o}")
            continue
        if d.is_system:
            continue
        if c - len(d.xenheap_pages) != d.tot_pages:
            problems.append(f"d{o}: tot_pages {d.tot_pages} but owns {c - len(d.xenheap_pages)} domheap frames")
    # Owned and allocated frames are in use (inuse or offlining); PGC_allocated needs an owner.
    inuse = (state == mm.STATE_INUSE) | (state == mm.STATE_OFFLINING)
    for f in np.flatnonzero((own >= 0) & ~inuse)[:5].tolist():
        problems.append(f"mfn {f:#x} is owned by d{int(own[f])} but {mm.STATE_NAMES[int(state[f])]}")
    alloc = ft.has_flag(mm.PGC_allocated)
    for f in np.flatnonzero(alloc & (own < 0))[:5].tolist():
        problems.append(f"mfn {f:#x} has PGC_allocated but no owner")
    for f in np.flatnonzero(~inuse & ((ti != 0) | (ft.m2p_plus1 != 0)))[:5].tolist():
        problems.append(f"{mm.STATE_NAMES[int(state[f])]} mfn {f:#x} keeps a type or an M2P entry")
    # Retired frames: offlined state means free of everything.
    off = np.flatnonzero(state == mm.STATE_OFFLINED)
    for f in off[(gen[off] != 0) | (own[off] >= 0) | (have_gen[off] != 0)][:10].tolist():
        problems.append(f"offlined mfn {f:#x} is still referenced or owned")
    listed = set(host.heap.offlined_list) | set(host.heap.broken_list)
    if set(off.tolist()) != listed:
        problems.append(f"offlined frames {len(off)} != offlined+broken lists {len(listed)}")
    for f in host.heap.broken_list:
        if not int(ft.count_info[f]) & mm.PGC_broken:
            problems.append(f"mfn {f:#x} on the broken list without PGC_broken")
    # Heap: chunks aligned, disjoint, free; free_pages matches.
    free = state == mm.STATE_FREE
    covered = np.zeros(n, dtype=bool)
    total = 0
    for h, k in host.heap.chunks():
        sz = 1 << k
        if h % sz:
            problems.append(f"chunk {h:#x} order {k} misaligned")
        if covered[h:h + sz].any() or not free[h:h + sz].all():
            problems.append(f"chunk {h:#x} order {k} overlaps or holds non-free frames")
        covered[h:h + sz] = True
        total += sz
    if total != host.heap.free_pages or int(free.sum()) != total or (free & ~covered).any():
        problems.append(f"heap: free_pages {host.heap.free_pages}, chunks cover {total}, "
                        f"free-state frames {int(free.sum())}")
    if (own[free] >= 0).any() or (have_gen[free] != 0).any():
        problems.append("a free frame has an owner or references")
    # The free lists and the chunk heads recorded in the frame table agree.
    listed_chunks: dict[int, int] = {}
    for (z, k), lst in host.heap.lists.items():
        for h in lst:
            if h in listed_chunks:
                problems.append(f"chunk {h:#x} is on two free lists")
            listed_chunks[h] = k
            if z != int(h).bit_length():
                problems.append(f"chunk {h:#x} is on the list of zone {z}")
    per_zone: dict[int, int] = {}
    for (z, k), lst in host.heap.lists.items():
        per_zone[z] = per_zone.get(z, 0) + (len(lst) << k)
    if {z: v for z, v in per_zone.items() if v} != {z: v for z, v in host.heap.zone_pages.items() if v}:
        problems.append("heap: per-zone free counts disagree with the free lists")
    if listed_chunks != dict(host.heap.chunks()):
        diff = set(listed_chunks.items()) ^ set(host.heap.chunks())
        problems.append(f"free lists and chunk heads disagree ({len(diff)} chunks, e.g. "
                        f"{sorted(diff)[:3]})")
    # M2P agrees with every P2M.
    for d in host.guest_domains():
        p2m = host.pv_p2m(d.domid)
        if p2m is None:
            continue
        p2m = np.asarray(p2m).astype(np.uint64)
        okm = p2m != _U(INVALID_MFN)
        g = np.flatnonzero(okm)
        m = p2m[okm].astype(np.int64)
        if (m >= n).any():
            problems.append(f"d{d.domid}: P2M names frames beyond the frame table")
            continue
        bad_owner = g[own[m] != d.domid]
        for pf in bad_owner[:5].tolist():
            problems.append(f"d{d.domid}: P2M[{pf:#x}] = {int(p2m[pf]):#x} is not its frame")
        m2p = ft.m2p_array(m)
        bad = g[m2p != g.astype(np.uint64)]
        for pf in bad[:5].tolist():
            problems.append(f"d{d.domid}: M2P[{int(p2m[pf]):#x}] = {ft.m2p(int(p2m[pf])):#x}, P2M says pfn {pf:#x}")
    # HVM p2ms: superpages, types, HAP pool, log-dirty (see p2m.check)
    from .p2m import check as p2m_check
    problems += p2m_check(host)
    return problems


def assert_ok(host: "Host") -> None:
    p = check(host)
    if p:
        raise InvariantError("; ".join(p[:20]))
