"""``memory_op``: ``XENMEM_exchange``, ``populate_physmap``, ``decrease_reservation`` (``xen/common/memory.c``; ``steal_page`` from ``xen/arch/x86/mm.c``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import mm
from ..abi import xen as X
from ..abi.memory import XENMEMF_get_address_bits
from .mm import get_page, mfn_valid, put_page
from .page_alloc import OutOfMemory

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

_U = np.uint64

#: ``max_order()``: the control domain may use bigger extents than a guest.
CTLDOM_MAX_ORDER = 12
DOMU_MAX_ORDER = 9


@dataclass
class Reservation:
    """``struct xen_memory_reservation``."""

    extent_start: list[int]
    extent_order: int = 0
    domid: int = X.DOMID_SELF
    mem_flags: int = 0


@dataclass
class ExchangeResult:
    rc: int
    nr_exchanged: int
    out: list[int] = field(default_factory=list)


def _max_order(host: "Host", caller: int) -> int:
    d = host.domains.get(caller)
    return CTLDOM_MAX_ORDER if d and d.privileged else DOMU_MAX_ORDER


def _resolve(host: "Host", caller: int, domid: int) -> tuple[int, int]:
    """``rcu_lock_domain_by_any_id`` + ``xsm_memory_exchange(XSM_TARGET)``."""
    target = caller if domid == X.DOMID_SELF else domid
    d = host.domains.get(target)
    if d is None or d.is_system:
        return -E.ESRCH, -1
    c = host.domains.get(caller)
    if target != caller and not (c and c.privileged):
        return -E.EPERM, -1
    return 0, target


def steal_page(host: "Host", domid: int, mfn: int) -> int:
    """``steal_page(d, page, MEMF_no_refcount)``: the frame must be d's, not special, and
    referenced only by its allocation (count 2 with the temporary reference)."""
    d = host.domains[domid]
    if d.hvm:
        return -E.EOPNOTSUPP
    if not 0 <= mfn < host.nframes:
        return -E.EINVAL
    c = int(host.ft.count_info[mfn])
    if (c & mm.PGC_count_mask) == 0:
        return -E.EINVAL
    c += 1  # the temporary reference
    owner = host.ft.owner(mfn)
    if owner != domid or c & (mm.PGC_xen_heap | mm.PGC_extra):
        return -E.EINVAL
    if (c & (mm.PGC_count_mask | mm.PGC_allocated)) != (mm.PGC_allocated | 2):
        return -E.EINVAL  # "Bad steal mfn"
    t = int(host.ft.type_info[mfn])
    if t & (mm.PGT_count_mask | mm.PGT_locked | mm.PGT_pinned):
        raise AssertionError("steal_page: typed page with only the allocation reference")
    # Clear the count and PGC_allocated; state and broken bits stay.
    host.ft.count_info[mfn] = _U(c & ~(mm.PGC_count_mask | mm.PGC_allocated))
    host.ft.type_info[mfn] = _U(0)
    host.ft.set_owner(mfn, None)
    return 0


def memory_exchange(host: "Host", caller: int, inp: Reservation, out: Reservation,
                    nr_exchanged: int = 0) -> ExchangeResult:
    """``memory_exchange``: checks in Xen's order, then chunk by chunk: steal the inputs,
    allocate the outputs, free the inputs (an offlining frame becomes offlined here), assign
    the outputs and, for a PV guest, write ``M2P[new] = gpfn`` from ``out.extent_start``."""
    nin, nout = len(inp.extent_start), len(out.extent_start)
    if max(inp.extent_order, out.extent_order) > _max_order(host, caller):
        return ExchangeResult(-E.EPERM, nr_exchanged)
    if nr_exchanged > nin or inp.domid != out.domid \
            or (nin << inp.extent_order) != (nout << out.extent_order):
        return ExchangeResult(-E.EINVAL, nr_exchanged)
    if nr_exchanged == nin:
        return ExchangeResult(0, nr_exchanged, list(out.extent_start))
    rc, domid = _resolve(host, caller, inp.domid)
    if rc:
        return ExchangeResult(rc, nr_exchanged)
    d = host.domains[domid]
    if inp.extent_order <= out.extent_order:
        in_chunk, out_chunk = out.extent_order - inp.extent_order, 0
    else:
        in_chunk, out_chunk = 0, inp.extent_order - out.extent_order
    out_list = list(out.extent_start)
    # the output's address bits (``XENMEMF_address_bits``): alloc_domheap_pages searches
    # zones up to bits_to_zone(bits) only
    bits = XENMEMF_get_address_bits(out.mem_flags)
    zone_hi = (max(bits - X.PAGE_SHIFT, 1) if bits else None)
    if FAST and inp.extent_order == 0 and out.extent_order == 0 and not d.hvm and not d.dying:
        nr_exchanged = _exchange_frames(host, domid, inp.extent_start, out_list, nr_exchanged, zone_hi)
        if nr_exchanged == nin:
            return ExchangeResult(0, nin, out_list)
    # mfn_valid of every input frame, once (it depends on the memory map only)
    heads = np.array([min(max(int(x), -1), 1 << 62) for x in inp.extent_start],
                     dtype=np.int64).reshape(-1, 1)
    frames = heads + np.arange(1 << inp.extent_order, dtype=np.int64)[None, :]
    valid = (mfn_valid(host, frames) & (frames < host.e820.max_page)).tolist()
    i = nr_exchanged >> in_chunk
    while i < (nin >> in_chunk):
        stolen: list[int] = []
        rc = 0
        for j in range(1 << in_chunk):
            gmfn = inp.extent_start[(i << in_chunk) + j]
            for k in range(1 << inp.extent_order):
                mfn = gmfn + k
                if not valid[(i << in_chunk) + j][k]:
                    rc = -E.EINVAL
                    break
                rc = steal_page(host, domid, mfn)
                if rc:
                    break
                stolen.append(mfn)
            if rc:
                break
        new_heads: list[int] = []
        if not rc:
            try:
                for _ in range(1 << out_chunk):
                    new_heads.append(host.heap.alloc(out.extent_order, zone_hi=zone_hi))
            except OutOfMemory:
                rc = -E.ENOMEM
        if rc:
            # fail path: give back what was stolen, free what was allocated
            for m in stolen:
                if d.dying:
                    host.free_domheap_pages(np.array([m]))
                    continue
                # assign_pages keeps only PGC_preserved: a stolen offlining frame handed
                # back is inuse again and loses PGC_broken (QUIRK 7.C5); with the quirk
                # off the frame keeps its state and broken bit.
                kept = int(host.ft.count_info[m]) & (mm.PGC_state | mm.PGC_broken)
                host.assign_pages(d, m, 1, count_towards=False)
                if not host.quirks.assign_resets_state:
                    host.ft.count_info[m] = _U(int(host.ft.count_info[m]) | kept)
            for h in new_heads:
                n = 1 << out.extent_order
                # allocated with MEMF_no_owner: free_domheap_pages scrubs them
                host.heap.free(h, out.extent_order, scrub=True) if n else None
            return ExchangeResult(rc, i << in_chunk, out_list)
        # point of no return for this chunk
        for m in stolen:
            host.free_domheap_pages(np.array([m]))
        for j, h in enumerate(new_heads):
            n = 1 << out.extent_order
            if d.dying:
                host.heap.free(h, out.extent_order, scrub=True)
                return ExchangeResult(0, i << in_chunk, out_list)
            host.assign_pages(d, h, n, count_towards=False)
            slot = (i << out_chunk) + j
            gpfn = out.extent_start[slot]
            if not d.hvm:
                host.ft.set_m2p(slice(h, h + n), np.arange(gpfn, gpfn + n, dtype=np.uint64))
            else:
                host.p2m[domid][gpfn:gpfn + n] = np.arange(h, h + n, dtype=np.uint64)
                host.ft.set_m2p(slice(h, h + n), np.arange(gpfn, gpfn + n, dtype=np.uint64))
            out_list[slot] = h
        i += 1
    return ExchangeResult(0, nin, out_list)


#: the batched path for single frames (:func:`_exchange_frames`); off: every extent one by
#: one (the tests compare the two)
FAST = True


def _exchange_frames(host: "Host", domid: int, ins: list[int], out_list: list[int],
                     start: int, zone_hi: int | None = None) -> int:
    """``memory_exchange`` of single frames, extents ``start..`` at once, when that gives
    exactly what the loop of :func:`memory_exchange` gives.  Returns how many extents are
    done then (``start`` when it declines; the caller goes on extent by extent from there,
    e.g. with an allocation that failed: the loop fails it again and takes its fail path).

    One extent is: ``steal_page`` the input, ``alloc_heap_pages`` one frame, free the input,
    ``assign_pages`` the output and write its M2P entry.  The extents are independent of
    each other when every input is an offline-pending frame of ``d`` that ``steal_page``
    accepts, the inputs are distinct, no input's order-0 buddy heads a free chunk and there
    are at least as many free frames as extents: freeing an offlining frame then only moves
    it to the offlined (or broken) list -- nothing merges, no free list changes -- so the
    allocations see the heap the loop would show them, one after another, and every other
    write touches only its own frame.  An input in use (a page moved off Xen's fixed range,
    with address bits) is freed to the heap, but in a zone above every one the allocations
    may take from, where no merge can reach theirs: the same holds."""
    ft = host.ft
    mf = np.array(ins[start:], dtype=np.int64)
    k = mf.size
    if k == 0 or host.heap.free_pages < k:
        return start
    if mf.min() < 0 or mf.max() >= host.e820.max_page or not mfn_valid(host, mf).all():
        return start
    if np.unique(mf).size != k:
        return start
    ci = ft.count_info[mf]
    c = ci + _U(1)  # steal_page's temporary reference
    state = (ci & _U(mm.PGC_state)) >> _U(mm.PGC_state_shift)
    offl = state == _U(mm.STATE_OFFLINING)
    bo = ft.buddy_order
    # a frame in use (moved off Xen's fixed range) is freed to the heap and may merge there:
    # independent of the allocations only when those keep below a zone it lies above and no
    # merge can reach down to them (every chunk aligned, none of order >= zone_hi at frame 0,
    # the only chunk a merge from above could join below)
    apart = zone_hi is not None and host.heap.misaligned == 0 \
        and not (bo[0] and int(bo[0]) - 1 >= zone_hi)
    inuse = (state == _U(mm.STATE_INUSE)) & (mf >= (1 << zone_hi)) if apart else np.zeros(k, dtype=bool)
    ok = ((ci & _U(mm.PGC_count_mask)) != 0) & (ft.owner1[mf] == domid + 1) \
        & ((c & _U(mm.PGC_xen_heap | mm.PGC_extra)) == 0) \
        & ((c & _U(mm.PGC_count_mask | mm.PGC_allocated)) == _U(mm.PGC_allocated | 2)) \
        & (offl | inuse)
    if not ok.all():
        return start
    bud = mf[offl] ^ 1
    if (bo[bud[bud < ft.nframes]] == 1).any():
        return start
    if (ft.type_info[mf] & _U(mm.PGT_count_mask | mm.PGT_locked | mm.PGT_pinned)).any():
        raise AssertionError("steal_page: typed page with only the allocation reference")
    try:
        gp = np.array(out_list[start:], dtype=np.uint64)
    except (OverflowError, ValueError, TypeError):
        return start
    got = host.heap.alloc_frames(k, zone_hi)  # k calls of alloc(0, zone_hi), one after another
    if len(got) < k:  # out of memory: the extents before it are done; the loop fails this one
        k = len(got)
        if k == 0:
            return start
        mf, ci, offl = mf[:k], ci[:k], offl[:k]
    new = np.array(got, dtype=np.int64)
    # steal_page + free_heap_pages of each offline-pending input: offlined, broken bit kept,
    # no owner, no type, M2P invalid; listed in extent order
    mo, co = mf[offl], ci[offl]
    ft.count_info[mo] = (co & _U(mm.PGC_broken)) | _U(mm.PGC_state_offlined)
    ft.type_info[mo] = _U(0)
    ft.owner1[mo] = 0
    ft.m2p_plus1[mo] = _U(0)
    host.heap._list_offlined(mo)
    # ... and of each input in use: stolen (no count, no owner, no type), then freed to the
    # heap one by one in extent order, as the loop frees them (to the tails: no owner)
    for m in mf[~offl].tolist():
        ft.count_info[m] &= _U(~(mm.PGC_count_mask | mm.PGC_allocated) & 0xFFFFFFFFFFFFFFFF)
        ft.type_info[m] = _U(0)
        ft.set_owner(m, None)
        host.free_domheap_pages(np.array([m], dtype=np.int64))
    # assign_pages (count_towards=False) and M2P[new] = gpfn
    ft.count_info[new] = (ft.count_info[new] & _U(mm.PGC_preserved)) | _U(mm.PGC_allocated | 1)
    ft.owner1[new] = domid + 1
    ft.set_m2p(new, gp[:k])
    out_list[start:start + k] = new.tolist()
    return start + k


def populate_physmap(host: "Host", caller: int, res: Reservation) -> tuple[int, list[int]]:
    """``XENMEM_populate_physmap`` for a PV guest: new frames, M2P set to the given GPFNs.
    Returns (number of extents done, their MFNs)."""
    rc, domid = _resolve(host, caller, res.domid)
    if rc:
        return rc, []
    d = host.domains[domid]
    out = []
    for gpfn in res.extent_start:
        try:
            h = host.alloc_domheap_pages(d, res.extent_order)
        except Exception:
            break
        n = 1 << res.extent_order
        host.ft.set_m2p(slice(h, h + n), np.arange(gpfn, gpfn + n, dtype=np.uint64))
        out.append(h)
    return len(out), out


def decrease_reservation(host: "Host", caller: int, res: Reservation) -> int:
    """``XENMEM_decrease_reservation`` (``guest_remove_page``): the guest gives frames back;
    each loses its allocation reference and is freed once nothing else references it.
    Returns the number of extents done."""
    rc, domid = _resolve(host, caller, res.domid)
    if rc:
        return rc
    done = 0
    for gmfn in res.extent_start:
        for k in range(1 << res.extent_order):
            mfn = gmfn + k
            if not get_page(host, mfn, domid):
                return done  # "Bad page free"
            c = int(host.ft.count_info[mfn])
            if c & mm.PGC_allocated:
                host.ft.count_info[mfn] = _U(c & ~mm.PGC_allocated)
                put_page(host, mfn)
            put_page(host, mfn)
        done += 1
    return done


def machphys_mfn_list(host: "Host", max_extents: int) -> list[int]:
    """``XENMEM_machphys_mfn_list``: the first MFN of each 2 MiB chunk of the M2P, at most
    ``max_extents`` of them; the tools map them as DOMID_XEN's frames (``xc_map_m2p``)."""
    return list(host.m2p_chunks[:max_extents])
