"""Upstream's ``xc_exchange_page`` as coded (libxenguest 4.17, ``xg_offline_page.c``), so that
the simulator reproduces what real Xen does with the stock tools (xen-semantics.md §5, §7.A).

Defects, each a switch (``Defects``):

* ``pfd``: the mmu_update batch is created with ``subject = domid`` -- no page-table-owner
  field -- so Xen looks for the guest's tables among dom0's frames and every non-empty batch
  fails with EINVAL ("clear pte failed"; 7.A1).  The lab's LD_PRELOAD shim fixes only this.
* ``mask``: restored entries are built with the frame mask not shifted by 12, dropping every
  low flag bit (7.A2).
* ``out_gpfn``: the GPFN handed to XENMEM_exchange is an uninitialised bounce buffer (0 here),
  so the new frame's M2P entry is wrong (7.A3).
* ``repin_index``: the re-pin looks up ``pfn_type[mfn]`` instead of ``pfn_type[gpfn]`` (7.A5).

Messages are libxc's, printed as its default logger does (``xc: error: ...: Internal error``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..abi import domctl as D
from ..abi import errno as E
from ..abi import grant as G
from ..abi import pte as P
from ..abi import sysctl as S
from ..abi import xen as X
from .hypervisor import Hypervisor

MAX_MMU_UPDATES = 1024


@dataclass
class Defects:
    pfd: bool = True
    mask: bool = True
    out_gpfn: bool = True
    repin_index: bool = True


@dataclass
class UpstreamResult:
    result: int          # 0, -1 or -2 as xc_exchange_page returns
    errno: int
    log: list[str]
    new_mfn: int | None = None


def xc_exchange_page(hv: Hypervisor, domid: int, mfn: int, defects: Defects | None = None) -> UpstreamResult:
    df = defects or Defects()
    log: list[str] = []

    def err(msg: str) -> None:
        log.append(f"xc: error: {msg}: Internal error")

    info = hv.domain_info(domid)
    if info is None:
        err(f"Could not get domain info for dom{domid}")
        return UpstreamResult(-1, E.ESRCH, log)
    if not (info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend):
        err("Can't exchange page unless domain is suspended")
        return UpstreamResult(-1, E.EINVAL, log)
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    status = int(st[0]) if st is not None else 0
    if domid == 0 or domid > X.DOMID_FIRST_RESERVED or info.hvm or rc or \
            not status & S.PG_OFFLINE_STATUS_OFFLINE_PENDING:
        if not (domid == 0 or domid > X.DOMID_FIRST_RESERVED or info.hvm):
            err(f"Page {mfn:x} is not offline pending {status:x}")
        err("Could not exchange page")
        return UpstreamResult(-1, E.EINVAL, log)
    gpfn = int(hv.m2p(np.array([mfn]))[0])
    rc, frames, n = hv.pv_p2m_frames(domid)
    if rc:
        err("Could not map domain's memory information")
        return UpstreamResult(-1, -rc, log)
    pm = hv.map_foreign(domid, frames, True)
    if isinstance(pm, int):
        err("Could not map domain's memory information")
        return UpstreamResult(-1, -pm, log)
    p2m = pm.array.ravel()[:n].copy()
    ok = np.flatnonzero(p2m != np.uint64(X.INVALID_MFN))
    pfn_type = np.full(n, D.XEN_DOMCTL_PFINFO_XTAB, dtype=np.uint32)
    _, t = hv.page_types(domid, p2m[ok].astype(np.int64))
    pfn_type[ok] = t
    try:
        rc, grants = hv.grant_entries(domid)
        if rc:
            err("Failed to map grant table")
            return UpstreamResult(-1, -rc, log)
        live = (grants & np.uint64(G.GTF_type_mask)) != 0
        if (live & ((grants >> np.uint64(32)) == np.uint64(mfn))).any():
            err(f"Page {mfn:x} is granted now")
            return UpstreamResult(-1, E.EINVAL, log)
        unpinned = False
        if gpfn < n and pfn_type[gpfn] & D.XEN_DOMCTL_PFINFO_LPINTAB:
            if hv.mmuext_op([(X.MMUEXT_UNPIN_TABLE, mfn)], domid)[0]:
                err(f"Failed to unpin page {mfn:x}")
                return UpstreamResult(-1, E.EINVAL, log)
            unpinned = True
        cm = hv.map_foreign(domid, [mfn], False)
        if isinstance(cm, int):
            err(f"Failed to map foreign page {mfn:x}")
            return UpstreamResult(-1, -cm, log)
        content = cm.array[0].copy()
        cm.unmap()
        subject = domid if df.pfd else X.foreigndom(domid, domid)
        backup: list[tuple[int, int]] = []

        def flush(batch: list[tuple[int, int]]) -> int:
            if not batch:
                return 0
            rc, _ = hv.mmu_update(np.array(batch, dtype=np.uint64), subject)
            batch.clear()
            if rc:
                err("Failure when submitting mmu updates")
            return rc

        def change_pte(fn) -> int:
            batch: list[tuple[int, int]] = []
            p2m_now = pm.array.ravel()[:n]
            for i in range(n):
                tm = int(p2m_now[i])
                t = int(pfn_type[i])
                if tm == X.INVALID_MFN or t == D.XEN_DOMCTL_PFINFO_XTAB:
                    continue
                if not t & D.XEN_DOMCTL_PFINFO_LTABTYPE_MASK:
                    continue
                m = hv.map_foreign(domid, [tm], False)
                if isinstance(m, int):
                    return m
                ents = m.array[0].copy()
                m.unmap()
                for j in range(512):
                    new = fn(tm, j, int(ents[j]))
                    if new is not None:
                        batch.append(((tm << 12) | (j * 8) | X.MMU_PT_UPDATE_PRESERVE_AD, new))
                        if len(batch) >= MAX_MMU_UPDATES and flush(batch):
                            return -E.EINVAL
            return flush(batch)

        def clear(tm, j, pte):
            if pte & P._PAGE_PRESENT and ((pte >> 12) & P.MFN_MASK_X86) == mfn:
                backup.append((tm, j))
                return pte & ~P._PAGE_PRESENT
            return None

        def update_to(f):
            mask = P.MFN_MASK_X86 if df.mask else P.PTE_FRAME_MASK

            def upd(tm, j, pte):
                if (tm, j) not in backup:
                    return None
                return ((pte & ~mask) | (f << 12) | P._PAGE_PRESENT) & 0xFFFFFFFFFFFFFFFF
            return upd

        if change_pte(clear):
            err("clear pte failed")
            return UpstreamResult(-1, E.EINVAL, log)
        out_gpfn = 0 if df.out_gpfn else gpfn
        rc, nr, outl = hv.memory_exchange(domid, [mfn], [out_gpfn])
        if rc or nr != 1:
            err("Exchange the page failed")
            r = change_pte(update_to(mfn))
            return UpstreamResult(-2 if r else -1, -rc if rc else E.EINVAL, log)
        new_mfn = int(outl[0])
        if change_pte(update_to(new_mfn)):
            err("update pte failed guest may be broken now")
            return UpstreamResult(-2, E.EINVAL, log, new_mfn)
        rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
        if rc:
            err("Fail to query offline status")
            return UpstreamResult(-1, -rc, log, new_mfn)
        if not int(st[0]) & S.PG_OFFLINE_STATUS_OFFLINED:
            err("page is still online or pending")
            return UpstreamResult(-1, E.EINVAL, log, new_mfn)
        log.append(f"xc: info: Now page is offlined {mfn:x}")
        if gpfn < n:
            pm.array.ravel()[gpfn] = np.uint64(new_mfn)
            pm.flush()
        nm = hv.map_foreign(domid, [new_mfn], True)
        if isinstance(nm, int):
            err("failed to map new_p for copy, guest may be broken?")
            return UpstreamResult(-1, -nm, log, new_mfn)
        nm.array[0] = content
        nm.flush()
        nm.unmap()
        result = 0
        if unpinned:
            idx = mfn if df.repin_index else gpfn
            t = int(pfn_type[idx]) if idx < n else 0
            if t & D.XEN_DOMCTL_PFINFO_LPINTAB:
                level = (t & D.XEN_DOMCTL_PFINFO_LTABTYPE_MASK) >> 28
                if hv.mmuext_op([(X.MMUEXT_PIN_L1_TABLE + level - 1, new_mfn)], domid)[0]:
                    err("failed to pin the mfn again")
                    result = -2
        return UpstreamResult(result, 0 if result == 0 else E.EINVAL, log, new_mfn)
    finally:
        pm.unmap()
