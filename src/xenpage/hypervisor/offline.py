"""Offlining, onlining and querying machine frames (the per-page half of
``xen/common/page_alloc.c``: ``offline_page``, ``online_page``, ``query_page_offline``),
vectorised over a range the way ``XEN_SYSCTL_page_offline_op`` walks it: frames in order,
stopping at the first one whose function returns an error, with no rollback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import mm
from ..abi import sysctl as S
from ..abi.xen import DOMID_INVALID, DOMID_XEN
from .domain import POD_LOCK_CORRUPT, POD_LOCK_PRISTINE, POD_LOCK_SANE
from .quirks import HostHang

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

_U = np.uint64
_STATE = _U(mm.PGC_state)
_SHIFT = _U(mm.PGC_state_shift)
_NOT_STATE = _U(~mm.PGC_state & 0xFFFFFFFFFFFFFFFF)


def _window(host: "Host", start: int, n: int):
    """Per-frame facts for ``start .. start+n-1``: validity, RAM, Xen image, and the
    page_info fields (zero beyond the frame table)."""
    valid = host.e820.valid_window(start, n)
    ram = host.e820.ram_window(start, n)
    stop = min(start + n, host.nframes)
    m = max(0, stop - start)
    ci = np.zeros(n, dtype=np.uint64)
    own = np.zeros(n, dtype=np.uint16)
    if m:
        ci[:m] = host.ft.count_info[start:stop]
        own[:m] = host.ft.owner1[start:stop]
    mfn = np.arange(start, start + n, dtype=np.int64)
    xs, xe = host.xen_image
    xen = (mfn >= xs) & (mfn < xe)
    return valid, ram, xen, ci, own


def _first(mask: np.ndarray) -> int:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else mask.size


def _pod_lock(host: "Host", domid: int, times: int, pcpu: int) -> None:
    """Model of taking ``p2m->pod.lock`` ``times`` times from physical CPU ``pcpu`` in
    ``p2m_pod_offline_or_broken_hit``. A PV domain's PoD lock is never initialised
    (``p2m_initialise`` returns before ``p2m_pod_init`` for non-HVM domains); its zeroed
    ``recurse_cpu`` makes the first acquisition on CPU 0 skip the ticket, and the release
    then corrupts the lock: every later acquisition spins forever."""
    d = host.domains.get(domid)
    if d is None or d.is_system or d.hvm or times == 0 or not host.quirks.pod_lock_hang:
        return
    if d.pod_lock == POD_LOCK_CORRUPT:
        raise HostHang(f"offline of a frame owned by d{domid} takes its corrupted PoD lock: "
                       "the host would hang (Xen 4.17, first taken on pCPU 0)")
    if d.pod_lock == POD_LOCK_PRISTINE:
        if pcpu == 0:
            if times > 1:
                raise HostHang(f"second owned-frame offline of d{domid} in one call after the "
                               "first corrupted its PoD lock on pCPU 0: the host would hang")
            d.pod_lock = POD_LOCK_CORRUPT
        else:
            d.pod_lock = POD_LOCK_SANE


def offline_range(host: "Host", start: int, end: int, broken: bool = False,
                  pcpu: int = 0) -> tuple[int, np.ndarray]:
    """``offline_page`` for each frame of [start, end], as the sysctl loop calls it.

    Returns ``(rc, status)``: rc is 0 or the negative errno of the frame that stopped the
    walk; ``status`` holds one word per frame, 0x01010101 where no function wrote it."""
    n = end - start + 1
    status = np.full(n, S.STATUS_UNTOUCHED, dtype=np.uint32)
    valid, ram, xen, ci, own = _window(host, start, n)
    stop_mask = ~valid | xen | ~ram
    k = _first(stop_mask)
    rc = 0
    pre = slice(0, k)
    p_ci, p_own = ci[pre], own[pre]
    p_broken = (p_ci & _U(mm.PGC_broken)) != 0
    again = p_broken & (p_own != 0)
    work = ~again
    old_state = ((p_ci & _STATE) >> _SHIFT).astype(np.int8)
    count = p_ci & _U(mm.PGC_count_mask)
    # Frames that will stay in use (offlining) and whose owner is looked up.
    to_offlining = work & ((old_state == mm.STATE_INUSE) | (old_state == mm.STATE_OFFLINING))
    has_owner = to_offlining & (count != 0) & (p_own != 0)
    # The PoD-lock defect is checked before anything changes: a hang leaves nothing to see.
    owners, times = np.unique(p_own[has_owner], return_counts=True)
    for o, t in zip(owners.tolist(), times.tolist()):
        _pod_lock(host, o - 1, t, pcpu)
    # Step 5: already broken and owned -> AGAIN, the owner is crashed.
    status[pre][again] = S.PG_OFFLINE_AGAIN
    for o in np.unique(p_own[again]).tolist():
        host.crash(o - 1, "offline_page (PG_OFFLINE_AGAIN)")
    # Step 6: mark (free -> offlined, inuse -> offlining), optionally broken.
    mfns = np.arange(start, start + k, dtype=np.int64)
    was_free = work & (old_state == mm.STATE_FREE)
    now_offlined = work & ((old_state == mm.STATE_FREE) | (old_state == mm.STATE_OFFLINED))
    bflag = _U(mm.PGC_broken if broken else 0)
    if broken:
        host.ft.count_info[mfns[work]] |= bflag
    # A free frame goes to the broken or offlined list by its (new) broken bit; an already
    # offlined frame marked broken stays where it is (the offlined list: QUIRK in 1.2).
    host.heap.take_free_range(mfns[was_free])
    sl_off = np.flatnonzero(now_offlined)
    status[sl_off] = S.PG_OFFLINE_OFFLINED
    idx_inuse = mfns[to_offlining & (old_state == mm.STATE_INUSE)]
    host.ft.count_info[idx_inuse] = (host.ft.count_info[idx_inuse] & _NOT_STATE) | _U(mm.PGC_state_offlining)
    # Step 7: owner lookup on the (now) offlining frames.
    st_pre = status[:k]
    owned_idx = np.flatnonzero(has_owner)
    pod_hits = []
    for i in owned_idx.tolist():
        o = int(p_own[i]) - 1
        d = host.domains.get(o)
        if d is not None and d.hvm and (start + i) in d.pod_cache:
            pod_hits.append(i)
    st_pre[owned_idx] = (S.PG_OFFLINE_OWNED | S.PG_OFFLINE_PENDING
                         | (p_own[owned_idx].astype(np.uint32) - 1) << S.PG_OFFLINE_OWNER_SHIFT)
    for i in pod_hits:
        _pod_replace(host, start + i, int(p_own[i]) - 1)
        st_pre[i] = S.PG_OFFLINE_OFFLINED
    no_owner = to_offlining & ~has_owner
    xh = no_owner & ((p_ci & _U(mm.PGC_xen_heap)) != 0)
    st_pre[xh] = S.PG_OFFLINE_XENPAGE | S.PG_OFFLINE_PENDING | (DOMID_XEN << S.PG_OFFLINE_OWNER_SHIFT)
    anon = no_owner & ~xh
    st_pre[anon] = S.PG_OFFLINE_ANONYMOUS | S.PG_OFFLINE_FAILED | (DOMID_INVALID << S.PG_OFFLINE_OWNER_SHIFT)
    if broken:
        st_pre[work] |= S.PG_OFFLINE_BROKEN
    # The frame that stopped the walk.
    if k < n:
        if not valid[k]:
            rc = -E.EINVAL
        elif xen[k]:
            status[k] = S.PG_OFFLINE_XENPAGE | S.PG_OFFLINE_FAILED | (DOMID_XEN << S.PG_OFFLINE_OWNER_SHIFT)
            rc = -E.EPERM
        else:
            status[k] = S.PG_OFFLINE_FAILED | S.PG_OFFLINE_NOT_CONV_RAM
            rc = -E.EINVAL
    return rc, status


def _pod_replace(host: "Host", mfn: int, domid: int) -> None:
    """``p2m_pod_offline_or_broken_hit``: a PoD cache frame is freed (becoming offlined, as
    it is offlining) and a fresh frame takes its place in the cache."""
    d = host.domains[domid]
    d.pod_cache.remove(mfn)
    d.tot_pages -= 1
    host.ft.count_info[mfn] = host.ft.count_info[mfn] & _U(mm.PGC_state | mm.PGC_broken)
    host.free_domheap_pages(np.array([mfn]))
    try:
        new = host.alloc_domheap_pages(d, 0)
    except Exception:  # no replacement: the cache just shrinks (p2m_pod_offline_or_broken_replace)
        return
    d.pod_cache.append(new)


def online_range(host: "Host", start: int, end: int) -> tuple[int, np.ndarray]:
    """``online_page`` for each frame of [start, end] (no RAM check: a valid non-RAM frame
    simply reads 0)."""
    n = end - start + 1
    status = np.full(n, S.STATUS_UNTOUCHED, dtype=np.uint32)
    valid, ram, xen, ci, own = _window(host, start, n)
    brk = (ci & _U(mm.PGC_broken)) != 0
    k = _first(~valid | brk)
    st = ((ci[:k] & _STATE) >> _SHIFT).astype(np.int8)
    status[:k] = 0
    mfns = np.arange(start, start + k, dtype=np.int64)
    offl = st == mm.STATE_OFFLINED
    pend = st == mm.STATE_OFFLINING
    status[:k][offl | pend] = S.PG_ONLINE_ONLINED
    pm = mfns[pend]
    host.ft.count_info[pm] = (host.ft.count_info[pm] & _NOT_STATE) | _U(mm.PGC_state_inuse)
    # offlined: off page_offlined_list, inuse, then free_heap_pages(pg, 0): back in the buddy.
    host.heap.return_offlined(mfns[offl])
    rc = 0
    if k < n:
        rc = -E.EINVAL
        if valid[k]:
            status[k] = S.PG_ONLINE_FAILED | S.PG_ONLINE_BROKEN
    return rc, status


def query_range(host: "Host", start: int, end: int) -> tuple[int, np.ndarray]:
    """``query_page_offline`` for each frame of [start, end]."""
    n = end - start + 1
    status = np.full(n, S.STATUS_UNTOUCHED, dtype=np.uint32)
    valid, ram, xen, ci, own = _window(host, start, n)
    k = _first(~valid | ~ram)
    st = ((ci[:k] & _STATE) >> _SHIFT).astype(np.int8)
    out = np.zeros(k, dtype=np.uint32)
    out[st == mm.STATE_OFFLINING] |= S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    out[st == mm.STATE_OFFLINED] |= S.PG_OFFLINE_STATUS_OFFLINED
    out[(ci[:k] & _U(mm.PGC_broken)) != 0] |= S.PG_OFFLINE_STATUS_BROKEN
    status[:k] = out
    return (-E.EINVAL if k < n else 0), status


# -- many one-frame calls at once -------------------------------------------------------------

def _facts(host: "Host", mfns: np.ndarray):
    """:func:`_window` for an arbitrary array of frames (``mfns`` int64)."""
    e = host.e820
    valid = np.zeros(mfns.size, dtype=bool)
    ram = np.zeros(mfns.size, dtype=bool)
    g = 16  # PDX group: 2^16 frames (e820.valid_window)
    for s, t in e.ram_frame_ranges():
        ram |= (mfns >= s) & (mfns < t)
        gs, gt = (s >> g) << g, (((t - 1) >> g) + 1) << g
        valid |= (mfns >= gs) & (mfns < min(gt, e.max_page))
    inside = mfns < host.nframes
    idx = np.where(inside, mfns, 0)
    ci = np.where(inside, host.ft.count_info[idx], np.uint64(0))
    own = np.where(inside, host.ft.owner1[idx], np.uint16(0))
    xs, xe = host.xen_image
    xen = (mfns >= xs) & (mfns < xe)
    return valid, ram, xen, ci, own


def query_each(host: "Host", mfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``query_page_offline`` as one one-frame sysctl per MFN: ``(rc, status)`` arrays."""
    mfns = np.asarray(mfns, dtype=np.int64)
    valid, ram, xen, ci, own = _facts(host, mfns)
    ok = valid & ram
    state = ((ci & _STATE) >> _SHIFT).astype(np.int8)
    out = np.zeros(mfns.size, dtype=np.uint32)
    out[state == mm.STATE_OFFLINING] |= S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    out[state == mm.STATE_OFFLINED] |= S.PG_OFFLINE_STATUS_OFFLINED
    out[(ci & _U(mm.PGC_broken)) != 0] |= S.PG_OFFLINE_STATUS_BROKEN
    status = np.where(ok, out, np.uint32(S.STATUS_UNTOUCHED)).astype(np.uint32)
    rcs = np.where(ok, 0, -E.EINVAL).astype(np.int32)
    return rcs, status


def _each_by_one(fn, host: "Host", mfns: np.ndarray, **kw) -> tuple[np.ndarray, np.ndarray]:
    rcs = np.zeros(mfns.size, dtype=np.int32)
    status = np.full(mfns.size, S.STATUS_UNTOUCHED, dtype=np.uint32)
    for i, m in enumerate(mfns.tolist()):
        rc, st = fn(host, m, m, **kw)
        rcs[i], status[i] = rc, st[0]
    return rcs, status


def online_each(host: "Host", mfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``online_page`` as one one-frame sysctl per MFN, in the order given."""
    return _each_by_one(online_range, host, np.asarray(mfns, dtype=np.int64))


def offline_each(host: "Host", mfns: np.ndarray, pcpu: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``offline_page`` as one one-frame sysctl per MFN, in the order given (what a toolstack
    offlining frames highest first issues): ``(rc, status)`` arrays, and the host left
    exactly as those calls leave it, heap lists and offlined list in their order included.

    Vectorised when the calls cannot interact beyond what is modelled here: distinct
    frames, no populate-on-demand cache page, no owner whose PoD lock the calls could
    corrupt or hang on, nothing already broken and owned, an aligned heap, and every free
    frame the last free frame of its buddy when its call comes (frames of one buddy offlined
    from its end down: then Xen 4.17's ``reserve_offlined_page`` split and the fixed one
    agree, each leaving the maximal aligned pieces below the frame).  Otherwise the calls
    are made one by one."""
    mfns = np.asarray(mfns, dtype=np.int64)
    n = mfns.size
    if n == 0:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.uint32)
    srt = np.sort(mfns)
    if n < 64 or (srt[1:] == srt[:-1]).any():
        return _each_by_one(offline_range, host, mfns, pcpu=pcpu)
    valid, ram, xen, ci, own = _facts(host, mfns)
    stop = ~valid | xen | ~ram
    ok = ~stop
    state = ((ci & _STATE) >> _SHIFT).astype(np.int8)
    count = ci & _U(mm.PGC_count_mask)
    broken = (ci & _U(mm.PGC_broken)) != 0
    if (ok & broken & (own != 0)).any():          # AGAIN: crashes the owner
        return _each_by_one(offline_range, host, mfns, pcpu=pcpu)
    to_offlining = ok & ((state == mm.STATE_INUSE) | (state == mm.STATE_OFFLINING))
    has_owner = to_offlining & (count != 0) & (own != 0)
    owners = np.unique(own[has_owner]).tolist()
    for o in owners:
        d = host.domains.get(o - 1)
        if d is None:
            continue
        if d.hvm and d.pod_cache:
            return _each_by_one(offline_range, host, mfns, pcpu=pcpu)
        if not d.is_system and not d.hvm and host.quirks.pod_lock_hang and \
                (d.pod_lock == POD_LOCK_CORRUPT or (pcpu == 0 and d.pod_lock == POD_LOCK_PRISTINE)):
            return _each_by_one(offline_range, host, mfns, pcpu=pcpu)
    free_mask = ok & (state == mm.STATE_FREE)
    free = mfns[free_mask]
    heap = host.heap
    chunks = _last_of_buddies(host, free) if free.size else ([], [])
    if chunks is None:
        return _each_by_one(offline_range, host, mfns, pcpu=pcpu)
    # from here on nothing falls back: apply, in the calls' effect
    for o in owners:
        _pod_lock(host, o - 1, 1, pcpu)
    ft = host.ft
    if free.size:
        ft.count_info[free] = (ft.count_info[free] & _NOT_STATE) | _U(mm.PGC_state_offlined)
        for (h, k), low in zip(*chunks):
            heap._remove(h, k)
            rest, pos = low - h, h
            for j in range(k - 1, -1, -1):  # the aligned pieces of [h, low), lowest first
                if rest & (1 << j):
                    heap._add(pos, j, tail=True)
                    pos += 1 << j
        heap._list_offlined(free)
    inuse = mfns[to_offlining & (state == mm.STATE_INUSE)]
    ft.count_info[inuse] = (ft.count_info[inuse] & _NOT_STATE) | _U(mm.PGC_state_offlining)
    status = np.full(n, S.STATUS_UNTOUCHED, dtype=np.uint32)
    rcs = np.zeros(n, dtype=np.int32)
    status[ok & ((state == mm.STATE_FREE) | (state == mm.STATE_OFFLINED))] = S.PG_OFFLINE_OFFLINED
    status[has_owner] = (S.PG_OFFLINE_OWNED | S.PG_OFFLINE_PENDING
                         | (own[has_owner].astype(np.uint32) - 1) << S.PG_OFFLINE_OWNER_SHIFT)
    no_owner = to_offlining & ~has_owner
    xh = no_owner & ((ci & _U(mm.PGC_xen_heap)) != 0)
    status[xh] = S.PG_OFFLINE_XENPAGE | S.PG_OFFLINE_PENDING | (DOMID_XEN << S.PG_OFFLINE_OWNER_SHIFT)
    status[no_owner & ~xh] = (S.PG_OFFLINE_ANONYMOUS | S.PG_OFFLINE_FAILED
                              | (DOMID_INVALID << S.PG_OFFLINE_OWNER_SHIFT))
    inv = ~valid
    rcs[inv] = -E.EINVAL
    xenf = valid & xen
    status[xenf] = S.PG_OFFLINE_XENPAGE | S.PG_OFFLINE_FAILED | (DOMID_XEN << S.PG_OFFLINE_OWNER_SHIFT)
    rcs[xenf] = -E.EPERM
    nr = valid & ~xen & ~ram
    status[nr] = S.PG_OFFLINE_FAILED | S.PG_OFFLINE_NOT_CONV_RAM
    rcs[nr] = -E.EINVAL
    return rcs, status


def _last_of_buddies(host: "Host", free: np.ndarray):
    """For free frames offlined one by one in this order: their buddies ``[(head, order)]``
    in the order they are first met and the lowest frame taken from each, when every frame
    is the last free frame of its buddy at its turn (an aligned heap, frames strictly
    descending, and each buddy's frames a run up to its end); else None."""
    heap = host.heap
    if heap.misaligned or (free.size > 1 and not (np.diff(free) < 0).all()):
        return None
    bo = host.ft.buddy_order
    head = np.full(free.size, -1, dtype=np.int64)
    order = np.zeros(free.size, dtype=np.int64)
    for k in range(heap.max_order + 1):
        left = head < 0
        if not left.any():
            break
        h = free[left] & ~np.int64((1 << k) - 1)
        hit = bo[h] == k + 1
        sel = np.flatnonzero(left)[hit]
        head[sel], order[sel] = h[hit], k
    if (head < 0).any():
        return None  # a free frame on no list: the one-by-one path says what Xen does
    heads, first, counts = np.unique(head, return_index=True, return_counts=True)  # few heads
    ords = order[first]
    hi = np.maximum.reduceat(free[np.argsort(head, kind="stable")], np.r_[0, np.cumsum(counts)[:-1]])
    lo = np.minimum.reduceat(free[np.argsort(head, kind="stable")], np.r_[0, np.cumsum(counts)[:-1]])
    if not ((hi == heads + (np.int64(1) << ords) - 1) & (hi - lo + 1 == counts)).all():
        return None
    met = np.argsort(first)  # buddies in call order (descending frames: descending heads)
    return ([(int(heads[i]), int(ords[i])) for i in met], [int(lo[i]) for i in met])
