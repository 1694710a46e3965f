"""Log-dirty mode of an HVM guest (``xen/arch/x86/mm/paging.c``, ``hap/hap.c``) and
``XEN_DOMCTL_shadow_op``, the domctl behind ``xc_shadow_control`` / ``xc_logdirty_control``.

With log-dirty on, every ``p2m_ram_rw`` entry is turned into ``p2m_ram_logdirty`` (read-only
in the EPT).  The guest's first write to such a page faults; Xen marks the gfn in the dirty
bitmap, counts it, and makes that one entry writable again (``p2m_change_type_one``, which
splits the superpage around it: log-dirty shatters a guest's superpages).  ``CLEAN`` hands
the bitmap to the toolstack, clears it and write-protects everything again; ``PEEK`` only
reads it.  ``OFF`` makes every entry writable.

A PV guest's log-dirty (shadow paging write-protects its pages) is modelled by comparing
each of its frames with what it held at the last CLEAN: a simulated guest's every write
changes its page, so the set of pages is the one write faults would give.  That state is not
saved with the host (a migration runs within one toolstack call).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import hvm as H
from . import p2m as P

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host


@dataclass(frozen=True)
class ShadowStats:
    """``xc_shadow_op_stats_t``."""

    fault_count: int
    dirty_count: int


def enable(p: P.P2M) -> int:
    """``paging_log_dirty_enable``: -EINVAL when already on."""
    if p.logdirty:
        return -E.EINVAL
    p.logdirty = True
    p.dirty = np.zeros(p.size, dtype=bool)
    p.fault_count = p.dirty_count = 0
    p.change_type_global(H.p2m_ram_rw, H.p2m_ram_logdirty)
    return 0


def disable(p: P.P2M) -> int:
    """``paging_log_dirty_disable``: every entry writable again, the bitmap freed."""
    if p.logdirty:
        p.change_type_global(H.p2m_ram_logdirty, H.p2m_ram_rw)
    p.logdirty = False
    p.dirty = np.zeros(p.size, dtype=bool)
    return 0


def mark_dirty(p: P.P2M, gfns: np.ndarray) -> None:
    """``paging_mark_dirty`` for each gfn (already unique)."""
    if not p.logdirty or gfns.size == 0:
        return
    if p.dirty.size < p.size:
        p.dirty = np.concatenate([p.dirty, np.zeros(p.size - p.dirty.size, dtype=bool)])
    new = ~p.dirty[gfns]
    p.dirty[gfns] = True
    p.dirty_count += int(new.sum())


def write_fault(p: P.P2M, gfns: np.ndarray) -> int:
    """The EPT violations of writes to log-dirty gfns (unique): mark them dirty and make each
    entry writable (``p2m_change_type_one`` logdirty -> rw at 4 KiB).  -ENOMEM when a split
    finds the HAP pool exhausted (the caller crashes the domain, as Xen does)."""
    if gfns.size == 0:
        return 0
    rc = p.split(gfns)
    if rc:
        return rc
    p.fault_count += int(gfns.size)
    mark_dirty(p, gfns)
    p.type[gfns] = H.p2m_ram_rw
    return 0


@dataclass
class PvLogDirty:
    """Content of each of the domain's frames at the last CLEAN."""

    mfns: np.ndarray
    content: np.ndarray
    full: dict
    fault_count: int = 0


def _pv_snapshot(host: "Host", domid: int) -> PvLogDirty:
    ft = host.ft
    m = host.owned_frames(domid)
    full = {int(x): hash(ft.pages[int(x)].tobytes()) for x in m.tolist() if int(x) in ft.pages} \
        if ft.pages else {}
    return PvLogDirty(m, ft.content[m].copy(), full)


def _pv_dirty(host: "Host", domid: int, st: PvLogDirty, pages: int) -> np.ndarray:
    ft = host.ft
    now = _pv_snapshot(host, domid)
    pos = np.searchsorted(st.mfns, now.mfns)
    pos = np.clip(pos, 0, max(st.mfns.size - 1, 0))
    known = (st.mfns.size > 0) & (st.mfns[pos] == now.mfns) if st.mfns.size else np.zeros(now.mfns.size, bool)
    changed = ~known
    changed[known] |= st.content[pos[known]] != now.content[known]
    for m, hsh in now.full.items():
        if st.full.get(m) != hsh:
            changed[np.searchsorted(now.mfns, m)] = True
    for m in set(st.full) - set(now.full):
        i = np.searchsorted(now.mfns, m)
        if i < now.mfns.size and now.mfns[i] == m:
            changed[i] = True
    pfn = ft.m2p_array(now.mfns[changed])
    pfn = pfn[pfn < np.uint64(pages)].astype(np.int64)
    bm = np.zeros(pages, dtype=bool)
    bm[pfn] = True
    return bm


def _pv_shadow_control(host: "Host", domid: int, op: int, pages: int):
    lds = host.__dict__.setdefault("pv_logdirty", {})
    st = lds.get(domid)
    if op == H.XEN_DOMCTL_SHADOW_OP_OFF:
        lds.pop(domid, None)
        return 0, None, None
    if op == H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY:
        if st is not None:
            return -E.EINVAL, None, None
        lds[domid] = _pv_snapshot(host, domid)
        return 0, None, None
    if op in (H.XEN_DOMCTL_SHADOW_OP_CLEAN, H.XEN_DOMCTL_SHADOW_OP_PEEK):
        if st is None:
            return -E.EINVAL, None, None
        bm = _pv_dirty(host, domid, st, pages)
        n = int(bm.sum())
        if op == H.XEN_DOMCTL_SHADOW_OP_CLEAN:
            lds[domid] = _pv_snapshot(host, domid)
        return 0, bm, ShadowStats(n, n)
    return -E.EINVAL, None, None


def shadow_control(host: "Host", caller: int, domid: int, op: int, pages: int = 0,
                   mode: int = 0) -> tuple[int, np.ndarray | None, ShadowStats | None]:
    """``XEN_DOMCTL_shadow_op``: ``(rc, bitmap, stats)``.  The bitmap (for CLEAN/PEEK) is a
    bool array of ``pages`` entries (gfns past the p2m read as clean)."""
    c = host.domains.get(caller)
    if c is None or not c.privileged:
        return -E.EPERM, None, None
    d = host.domains.get(domid)
    if d is None or d.is_system:
        return -E.ESRCH, None, None
    if domid == caller:
        return -E.EINVAL, None, None
    p = P.get(host, domid)
    if p is None:
        if d.hvm:
            return -E.EOPNOTSUPP, None, None
        return _pv_shadow_control(host, domid, op, pages)
    if op == H.XEN_DOMCTL_SHADOW_OP_OFF:
        return disable(p), None, None
    if op == H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY:
        return enable(p), None, None
    if op in (H.XEN_DOMCTL_SHADOW_OP_CLEAN, H.XEN_DOMCTL_SHADOW_OP_PEEK):
        if not p.logdirty:
            return -E.EINVAL, None, None
        bm = np.zeros(pages, dtype=bool)
        k = min(pages, p.dirty.size)
        bm[:k] = p.dirty[:k]
        stats = ShadowStats(p.fault_count, p.dirty_count)
        if op == H.XEN_DOMCTL_SHADOW_OP_CLEAN:
            p.dirty[:] = False
            p.fault_count = p.dirty_count = 0
            p.change_type_global(H.p2m_ram_rw, H.p2m_ram_logdirty)
        return 0, bm, stats
    return -E.EINVAL, None, None
