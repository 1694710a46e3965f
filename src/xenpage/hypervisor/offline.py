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
