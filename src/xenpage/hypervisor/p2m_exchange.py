"""``XEN_DOMCTL_xenpage_exchange_gfn``: swap one p2m entry of a paused HVM guest for a fresh
frame, copying the page -- **xenpage's own extension, not a Xen 4.17 hypercall** (real Xen
4.17 has no way to move one frame of a running HVM guest; its toolstack can only migrate the
whole guest).  Modelled as the hypervisor side of an in-place HVM exchange
(``xenpage.toolstack.hvm_exchange``):

1. checks, nothing changed yet: the caller is the control domain; the domain is HVM, not
   dying, and paused (no vCPU can touch the page while it moves); ``p2m[gfn]`` names
   ``old_mfn`` (a compare-and-swap: the toolstack read the gfn from the M2P) with a RAM type
   the guest can use (``ram_rw`` or ``ram_logdirty``); the frame holds only its allocation
   reference (a frame mapped by the device model, granted or mapped by another domain would
   keep being used through the old frame: -EBUSY); the frame is not broken (its content
   cannot be read safely: -EIO);
2. the fallible work: allocate the new frame and make sure the HAP pool can hold the tables
   a split needs (1 GiB -> 2 MiB -> 4 KiB); any failure gives everything back (-ENOMEM);
3. the commit, which cannot fail: split the superpage around the gfn, copy the 4 KiB page,
   point the entry at the new frame (same p2m type), write the M2P, flush the EPT on every
   pCPU (``ept_sync_domain``), and drop the old frame's allocation reference -- an
   offline-pending frame is then offlined by the allocator, exactly as when its owner frees it.

Every step advances the host's simulated clock by the :class:`CostModel`; in-place exchange's
downtime is the time between the toolstack's pause and unpause.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import hvm as H
from ..abi import mm
from . import p2m as P
from . import paging
from .page_alloc import OutOfMemory

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

_U = np.uint64


@dataclass
class CostModel:
    """Simulated durations of the hypervisor's work (seconds); order-of-magnitude figures for
    a current x86 server, stated so that they can be argued with."""

    #: a privcmd ioctl from dom0 user space into Xen and back
    hypercall_s: float = 1.0e-6
    #: ``domain_pause``: per vCPU, ``vcpu_sleep_sync`` (IPI, VM exit, deschedule)
    pause_vcpu_s: float = 5.0e-6
    #: ``domain_unpause``: wake the vCPUs
    unpause_s: float = 2.0e-6
    #: ``alloc_domheap_page`` / ``free_domheap_page``
    page_alloc_s: float = 0.3e-6
    #: one EPT table: take a pool page, write its 512 entries (``ept_split_super_page``)
    ept_table_s: float = 1.0e-6
    #: copy within the host's memory (bytes per second)
    memcpy_bps: float = 10e9
    #: ``ept_sync_domain``: INVEPT on every pCPU that ran the guest (IPIs, waits)
    ept_flush_s: float = 4.0e-6


COSTS = CostModel()


def _fault(host: "Host", step: str) -> int:
    """Test hook: ``host.p2m_exchange_faults = {"alloc": -ENOMEM, ...}`` makes one step fail
    once (steps: ``alloc``, ``split``)."""
    inj = getattr(host, "p2m_exchange_faults", None)
    return int(inj.pop(step, 0)) if inj else 0


def exchange_gfn(host: "Host", caller: int, domid: int, gfn: int, old_mfn: int,
                 costs: CostModel | None = None) -> tuple[int, int]:
    """The domctl: ``(0, new_mfn)`` or ``(-errno, -1)`` with nothing changed."""
    costs = costs or COSTS
    host.clock += costs.hypercall_s
    c = host.domains.get(caller)
    if c is None or not c.privileged:
        return -E.EPERM, -1
    d = host.domains.get(domid)
    if d is None or d.is_system:
        return -E.ESRCH, -1
    p = P.get(host, domid)
    if p is None or not d.hvm:
        return -E.EOPNOTSUPP, -1
    if d.dying:
        return -E.EINVAL, -1
    if not (d.pause_count or d.is_shutting_down):
        return -E.EBUSY, -1
    if not 0 <= gfn < p.size or int(p.mfn[gfn]) != old_mfn:
        return -E.EINVAL, -1
    t = int(p.type[gfn])
    if t not in H.P2M_WRITABLE:
        return -E.EINVAL, -1
    ft = host.ft
    ci = int(ft.count_info[old_mfn])
    if ft.owner(old_mfn) != domid:
        return -E.EINVAL, -1
    if ci & mm.PGC_broken:
        return -E.EIO, -1
    if (ci & (mm.PGC_count_mask | mm.PGC_allocated)) != (mm.PGC_allocated | 1) \
            or ci & (mm.PGC_xen_heap | mm.PGC_extra) or int(ft.type_info[old_mfn]) & mm.PGT_count_mask:
        return -E.EBUSY, -1
    # -- the fallible work ----------------------------------------------------------------
    b1, b2 = p.split_needed(np.array([gfn]))
    if p.pool_used() + b1.size + b2.size > p.pool_pages:
        return -E.ENOMEM, -1
    rc = _fault(host, "alloc")
    if rc:
        return rc, -1
    try:
        new = host.heap.alloc(0)
    except OutOfMemory:
        return -E.ENOMEM, -1
    host.clock += costs.page_alloc_s
    rc = _fault(host, "split")
    if rc:
        host.heap.free(new, 0)
        return rc, -1
    # -- the commit (cannot fail) -------------------------------------------------------------
    rc = p.split(np.array([gfn]))
    assert rc == 0
    host.clock += costs.ept_table_s * (b1.size + b2.size)
    host.assign_pages(d, new, 1)
    if old_mfn in ft.pages:
        ft.pages[new] = ft.pages[old_mfn].copy()
    else:
        ft.pages.pop(new, None)
        ft.content[new] = ft.content[old_mfn]
    host.clock += 4096 / costs.memcpy_bps
    p.mfn[gfn] = _U(new)
    ft.set_m2p(new, gfn)
    p.stats["flushes"] += 1
    host.clock += costs.ept_flush_s
    if p.logdirty:
        paging.mark_dirty(p, np.array([gfn]))
    # drop the allocation reference of the old frame (guest_remove_page): freed -> offlined
    ft.count_info[old_mfn] = _U(int(ft.count_info[old_mfn]) & ~mm.PGC_allocated)
    host.put_page(old_mfn)
    host.clock += costs.page_alloc_s
    return 0, new
