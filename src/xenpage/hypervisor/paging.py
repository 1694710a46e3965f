"""Log-dirty mode of an HVM guest (``xen/arch/x86/mm/paging.c``, ``hap/hap.c``) and
``XEN_DOMCTL_shadow_op``, the domctl behind ``xc_shadow_control`` / ``xc_logdirty_control``.

With log-dirty on, every ``p2m_ram_rw`` entry is turned into ``p2m_ram_logdirty`` (read-only
in the EPT).  The guest's first write to such a page faults; Xen marks the gfn in the dirty
bitmap, counts it, and makes that one entry writable again (``p2m_change_type_one``, which
splits the superpage around it: log-dirty shatters a guest's superpages).  ``CLEAN`` hands
the bitmap to the toolstack, clears it and write-protects everything again; ``PEEK`` only
reads it.  ``OFF`` makes every entry writable.

A PV guest's log-dirty (shadow paging write-protects its pages) is a bitmap indexed by
*pfn* (the frame's M2P entry, ``paging_mark_dirty``), marked where Xen marks it: the guest's
first write to a frame after a CLEAN (the shadow write fault, ``_sh_propagate``), every
page-table entry Xen writes for it -- ``mmu_update`` and the writable-page-table emulation
(``sh_validate_guest_entry``, reached through ``paging_write_guest_entry`` /
``paging_cmpxchg_guest_entry``) --, a table whose type count becomes non-zero or zero
(``validate_page`` / ``devalidate_page``), a pin or unpin (``do_mmuext_op``) and an
``MMU_MACHPHYS_UPDATE`` (``paging_mark_pfn_dirty``).  That state is not saved with the host
(a migration or a pre-scan runs within one toolstack call).
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
    """A PV guest's log-dirty bitmap (``d->arch.paging.log_dirty``): one bit per pfn, bit
    ``p & 7`` of byte ``p >> 3`` (the layout ``paging_log_dirty_op`` copies out), grown on
    demand like Xen's trie of leaves."""

    bits: np.ndarray
    fault_count: int = 0
    dirty_count: int = 0


def _pv_state(host: "Host", domid: int) -> PvLogDirty | None:
    lds = host.__dict__.get("pv_logdirty")
    return lds.get(domid) if lds else None


def _mark_pfns(st: PvLogDirty, pfns: np.ndarray) -> int:
    """Set the bits of ``pfns``; returns how many were newly set (``dirty_count``)."""
    pfns = np.unique(np.asarray(pfns, dtype=np.int64))
    if pfns.size == 0:
        return 0
    need = int(pfns[-1] >> 3) + 1
    if need > st.bits.size:
        st.bits = np.concatenate([st.bits, np.zeros(need - st.bits.size, dtype=np.uint8)])
    byte = pfns >> 3
    bit = (np.uint8(1) << (pfns & 7).astype(np.uint8)).astype(np.uint8)
    new = int(((st.bits[byte] & bit) == 0).sum())
    np.bitwise_or.at(st.bits, byte, bit)
    st.dirty_count += new
    return new


def mark_pfn_dirty(host: "Host", domid: int, pfns) -> None:
    """``paging_mark_pfn_dirty``: nothing unless log-dirty is on; a pfn with its top bit set
    (``!VALID_M2P``: a frame outside the pseudo-physical map, e.g. shared_info) is skipped."""
    st = _pv_state(host, domid)
    if st is None:
        return
    p = np.atleast_1d(np.asarray(pfns, dtype=np.uint64))
    p = p[p < np.uint64(1 << 63)].astype(np.int64)
    _mark_pfns(st, p)


def mark_dirty_pv(host: "Host", domid: int, mfns) -> int:
    """``paging_mark_dirty`` for a PV domain: only frames that are valid and owned by the
    domain; the bit is the frame's *pfn* (its M2P entry -- "we really mean PFN here, even for
    non-translated guests"), never the mfn.  Returns the number of newly dirty pfns."""
    st = _pv_state(host, domid)
    if st is None:
        return 0
    m = np.atleast_1d(np.asarray(mfns, dtype=np.int64))
    ft = host.ft
    m = m[(m >= 0) & (m < ft.nframes)]
    m = m[ft.owner1[m] == domid + 1]
    p = ft.m2p_array(m)
    return _mark_pfns(st, p[p < np.uint64(1 << 63)].astype(np.int64))


def guest_write_pv(host: "Host", domid: int, mfns) -> None:
    """A PV guest in log-dirty (shadow) mode writing its own frames: the first write to a
    frame after a CLEAN faults on the write-protected shadow entry and ``_sh_propagate``
    marks it dirty (``paging_mark_dirty``); later writes take no fault."""
    st = _pv_state(host, domid)
    if st is None:
        return
    st.fault_count += mark_dirty_pv(host, domid, mfns)


def _pv_shadow_control(host: "Host", domid: int, op: int, pages: int, packed: bool):
    """``paging_log_dirty_enable`` / ``_disable`` / ``paging_log_dirty_op`` of a PV guest
    (shadow mode): the bitmap covers ``pages`` pfns; CLEAN also empties it and zeroes the
    counts."""
    if getattr(host.quirks, "no_shadow_paging", False):
        # shadow/none.c: no log-dirty ops for a PV guest (the lab's real answers)
        return (-E.EOPNOTSUPP if op == H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY else -E.EINVAL), None, None
    lds = host.__dict__.setdefault("pv_logdirty", {})
    st = lds.get(domid)
    if op == H.XEN_DOMCTL_SHADOW_OP_OFF:
        lds.pop(domid, None)
        return 0, None, None
    if op == H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY:
        if st is not None:
            return -E.EINVAL, None, None
        n = int(host.domains[domid].p2m_max_pfn or 0)
        lds[domid] = PvLogDirty(np.zeros((n + 7) // 8, dtype=np.uint8))
        return 0, None, None
    if op in (H.XEN_DOMCTL_SHADOW_OP_CLEAN, H.XEN_DOMCTL_SHADOW_OP_PEEK):
        if st is None:
            return -E.EINVAL, None, None
        nb = (pages + 7) // 8
        stats = ShadowStats(st.fault_count, st.dirty_count)
        if op == H.XEN_DOMCTL_SHADOW_OP_CLEAN and nb == st.bits.size:
            out, st.bits = st.bits, np.zeros(nb, dtype=np.uint8)  # handed over whole
        else:
            k = min(nb, st.bits.size)
            out = np.zeros(nb, dtype=np.uint8)
            out[:k] = st.bits[:k]
            if op == H.XEN_DOMCTL_SHADOW_OP_CLEAN:
                st.bits[:] = 0
        if pages % 8 and nb:
            out[-1] &= np.uint8((1 << (pages % 8)) - 1)
        if op == H.XEN_DOMCTL_SHADOW_OP_CLEAN:
            st.fault_count = st.dirty_count = 0
        if not packed:
            return 0, np.unpackbits(out, count=pages, bitorder="little").astype(bool), stats
        return 0, out, stats
    return -E.EINVAL, None, None


def shadow_control(host: "Host", caller: int, domid: int, op: int, pages: int = 0,
                   mode: int = 0, packed: bool = False
                   ) -> tuple[int, np.ndarray | None, ShadowStats | None]:
    """``XEN_DOMCTL_shadow_op``: ``(rc, bitmap, stats)``.  The bitmap (for CLEAN/PEEK) is a
    bool array of ``pages`` entries (gfns past the p2m read as clean); with ``packed`` (PV
    guests) Xen's own form: ``ceil(pages / 8)`` bytes, bit ``p & 7`` of byte ``p >> 3``."""
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
        return _pv_shadow_control(host, domid, op, pages, packed)
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
