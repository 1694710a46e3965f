"""Defects of the real Xen 4.17 hypervisor that a page-retiring tool must step around.

**Misaligned buddies after an offline (seen in the lab: Xen panics).**  When a frame becomes
offlined while it sits inside a larger free buddy -- a *free* frame offlined directly
(``reserve_heap_page``), or an offline-pending frame freed later (its domain destroyed, or
the old frame of an exchange whose neighbours are free) -- Xen 4.17's
``reserve_offlined_page`` splits the buddy around it.  It grows the chunks *after* the
offlined frame without checking their alignment, so the free lists then hold chunks that
are not aligned to their order (fixed upstream in 2025: "Do not grow to next_order if
cur_head is not aligned to it", and the head's order is not reset to 0).  Nothing happens
at once; a later allocation or free in that region merges with a stale "buddy" and Xen dies
(``FATAL PAGE FAULT`` in ``free_heap_pages`` on the lab machine, while destroying a domain
built from that region).

A free frame is safe to offline when it is the *last* frame of its free buddy: then only
the chunks before it are split, and those stay aligned.  That holds when the next frame is in
use -- owned by some domain.  :func:`free_frames_followed_by_owned` finds such frames.
"""

from __future__ import annotations

import numpy as np

from ...abi import domctl as D


def free_frames_followed_by_owned(hv, start: int = 0x1000, limit: int | None = None,
                                  step: int = 1 << 14) -> list[int]:
    """Frames X (from high to low) owned by no domain whose successor X+1 is owned by one
    (``getpageframeinfo3`` per domain).  If such an X is free it is the last frame of its free
    buddy, so offlining it cannot leave misaligned chunks behind (see the module doc)."""
    mx = hv.max_mfn()
    doms = [d.domid for d in hv.domain_list() if not d.dying]
    out: list[int] = []
    for s in range(start, mx - 1, step):
        r = np.arange(s, min(s + step + 1, mx), dtype=np.int64)
        owned = np.zeros(r.size, dtype=bool)
        for d in doms:
            rc, t = hv.page_types(d, r)
            if rc == 0:
                owned |= t != np.uint32(D.XEN_DOMCTL_PFINFO_XTAB)
        idx = np.flatnonzero(~owned[:-1] & owned[1:])
        out.extend(int(x) for x in r[idx])
    out.sort(reverse=True)
    return out[:limit] if limit else out
