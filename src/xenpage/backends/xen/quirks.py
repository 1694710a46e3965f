"""Defects of the real Xen 4.17 hypervisor that a page-retiring tool must step around.

**Misaligned buddies after an offline (seen in the lab: Xen panics).**  When a frame becomes
offlined while it sits inside a larger free buddy -- a *free* frame offlined directly
(``reserve_heap_page``), or an offline-pending frame freed later (its domain destroyed, or
the old frame of an exchange whose neighbours are free) -- Xen 4.17's
``reserve_offlined_page`` splits the buddy around it.  It grows the chunks *after* the
offlined frame without checking their alignment, so the free lists then hold chunks that
are not aligned to their order (fixed upstream in June 2026, commits 71c6a62317 -- an
alignment check before each growth step -- and 5cb7ff13ee -- the growth stopped one step
short of the buddy's end; in no 4.17 release).  Nothing happens
at once; a later allocation or free in that region merges with a stale "buddy" and Xen dies
(``FATAL PAGE FAULT`` in ``free_heap_pages`` on the lab machine, while destroying a domain
built from that region).

``xenpage mem-offline`` steps around it with guard frames (toolstack/split_guard.py).
A free frame is safe to offline when it is the *last* frame of its free buddy: then only
the chunks before it are split, and those stay aligned.  That holds when the next frame is in
use -- owned by some domain.  :func:`free_frames_followed_by_owned` finds such frames.
"""

from __future__ import annotations

from .lazynp import np

from ...abi import domctl as D


def _pv_guest_frames(hv, domid: int) -> np.ndarray:
    rc, frames, n = hv.pv_p2m_frames(domid)
    if rc:
        return np.zeros(0, dtype=np.int64)
    m = hv.map_foreign(domid, frames, False)
    if isinstance(m, int):
        return np.zeros(0, dtype=np.int64)
    p2m = m.array.reshape(-1)[:n].copy()
    m.unmap()
    return p2m[p2m < np.uint64(hv.max_mfn())].astype(np.int64)


def free_frames_followed_by_owned(hv, limit: int = 20, start: int = 0x1000) -> list[int]:
    """Frames X (from high to low) owned by no domain whose successor X+1 is a PV guest's
    frame (read from the guests' P2Ms).  If such an X is free it is the last frame of its free
    buddy, so offlining it cannot leave misaligned chunks behind (see the module doc).

    Ownership is asked of Xen (``getpageframeinfo3``) only for the few candidates: on real
    Xen every frame a domain does not own costs a ``get_page`` error line on its console."""
    doms = [d for d in hv.domain_list() if not d.dying]
    owned = np.unique(np.concatenate([_pv_guest_frames(hv, d.domid) for d in doms
                                      if d.domid and not d.hvm] or [np.zeros(0, dtype=np.int64)]))
    if owned.size == 0:
        return []
    prev = owned - 1
    cand = prev[(prev >= start) & ~np.isin(prev, owned)][::-1][:limit * 4]
    keep = np.ones(cand.size, dtype=bool)
    for d in doms:
        if cand.size == 0:
            break
        rc, t = hv.page_types(d.domid, cand)
        if rc == 0:
            keep &= t == np.uint32(D.XEN_DOMCTL_PFINFO_XTAB)
    return [int(x) for x in cand[keep][:limit]]
