"""The hypercall surface a domain sees, bound to the calling domain (``current->domain``).

Guests act on the simulated host only through this object; dom0's toolstack reaches the same
code through :mod:`xenpage.backends.sim`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..abi import domctl as D
from ..abi import errno as E
from ..abi import mm as M
from ..abi import xen as X
from . import foreign, grant_table, memory, mm

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host


class Hypercalls:
    def __init__(self, host: "Host", caller: int):
        self.host = host
        self.caller = caller

    # memory management
    def mmu_update(self, reqs, foreigndom: int = X.DOMID_SELF) -> tuple[int, int]:
        return mm.mmu_update(self.host, self.caller, reqs, foreigndom)

    def mmuext_op(self, ops, foreigndom: int = X.DOMID_SELF, vcpu: int = 0) -> tuple[int, int]:
        return mm.mmuext_op(self.host, self.caller, ops, foreigndom, vcpu)

    def ptwr_write(self, table: int, idx: int, val: int) -> int:
        """Not a hypercall: a write to an entry of one of the caller's L1 tables through a
        read-only mapping, which Xen emulates (``ptwr_emulated_update``)."""
        return mm.ptwr_emulated_update(self.host, self.caller, table, idx, val)

    def wrote(self, mfns) -> None:
        """Not a hypercall: the caller wrote these frames of its own through its mappings
        (in log-dirty mode the first such write faults and marks the frame dirty)."""
        if "pv_logdirty" in self.host.__dict__:
            from . import paging
            paging.guest_write_pv(self.host, self.caller, mfns)

    def memory_exchange(self, inp: memory.Reservation, out: memory.Reservation,
                        nr_exchanged: int = 0) -> memory.ExchangeResult:
        return memory.memory_exchange(self.host, self.caller, inp, out, nr_exchanged)

    def populate_physmap(self, res: memory.Reservation):
        return memory.populate_physmap(self.host, self.caller, res)

    def decrease_reservation(self, res: memory.Reservation) -> int:
        return memory.decrease_reservation(self.host, self.caller, res)

    def kexec_get_range(self, rng: int, nr: int = 0) -> tuple[int, int, int]:
        from . import kexec
        return kexec.get_range(self.host, self.caller, rng, nr)

    def machphys_mfn_list(self, max_extents: int) -> list[int]:
        return memory.machphys_mfn_list(self.host, max_extents)

    def maximum_ram_page(self) -> int:
        return self.host.max_page

    # grant tables
    def grant_map(self, granter: int, ref: int, flags: int) -> tuple[int, int]:
        return grant_table.map_grant_ref(self.host, self.caller, granter, ref, flags)

    def grant_unmap(self, handle: int) -> int:
        return grant_table.unmap_grant_ref(self.host, self.caller, handle)

    # pages the guest registers with Xen (Xen maps them for itself)
    def register_vcpu_info(self, mfn: int) -> int:
        """``VCPUOP_register_vcpu_info`` (vCPU 0)."""
        return foreign.map_guest_page(self.host, self.caller, mfn, "vcpu_info")

    def evtchn_init_control(self, mfn: int) -> int:
        """``EVTCHNOP_init_control`` (FIFO ABI, vCPU 0's control block)."""
        return foreign.map_guest_page(self.host, self.caller, mfn, "evtchn_fifo_control")

    def evtchn_expand_array(self, mfn: int) -> int:
        """``EVTCHNOP_expand_array``: one more page of the FIFO event array."""
        return foreign.map_guest_page(self.host, self.caller, mfn, "evtchn_fifo_array")

    # scheduling
    def sched_shutdown(self, reason: int) -> int:
        """``SCHEDOP_shutdown``: the calling domain shuts itself down with a reason."""
        self.host.shutdown(self.caller, reason)
        return 0

    # control-domain operations (domctl / privcmd)
    def _privileged(self) -> bool:
        d = self.host.domains.get(self.caller)
        return bool(d and d.privileged)

    def foreign_map(self, domid: int, frames, writable: bool) -> tuple[int, int]:
        return foreign.map_frames(self.host, self.caller, domid, frames, writable)

    def foreign_unmap(self, handle: int) -> int:
        return foreign.unmap(self.host, handle, self.caller)

    def getpageframeinfo3(self, domid: int, gfns) -> tuple[int, np.ndarray]:
        """``XEN_DOMCTL_getpageframeinfo3``: page type of each frame of ``domid``."""
        if not self._privileged():
            return -E.EPERM, np.zeros(0, dtype=np.uint32)
        d = self.host.domains.get(domid)
        if d is None or d.is_system:
            return -E.ESRCH, np.zeros(0, dtype=np.uint32)
        return 0, page_types(self.host, domid, np.asarray(gfns, dtype=np.int64))


def page_types(host: "Host", domid: int, gfns: np.ndarray) -> np.ndarray:
    """Per frame: XTAB if not this domain's (or a Xen-heap/extra frame); else L1..L4TAB from
    the type field when validated or pinned (NOTAB otherwise), LPINTAB if pinned; BROKEN
    for a broken frame."""
    d = host.domains[domid]
    out = np.full(gfns.size, D.XEN_DOMCTL_PFINFO_XTAB, dtype=np.uint32)
    if d.hvm:
        p2m = host.p2m.get(domid, np.zeros(0, dtype=np.uint64))
        ok = (gfns >= 0) & (gfns < p2m.size)
        mfns = np.where(ok, p2m[np.clip(gfns, 0, max(p2m.size - 1, 0))].astype(np.int64) if p2m.size else -1, -1)
    else:
        mfns = gfns
    inr = (mfns >= 0) & (mfns < host.nframes)
    idx = np.flatnonzero(inr)
    m = mfns[idx]
    ci = host.ft.count_info[m]
    ti = host.ft.type_info[m]
    own = host.ft.owner1[m].astype(np.int64) - 1
    good = (own == domid) & ((ci & np.uint64(M.PGC_count_mask)) != 0) \
        & ((ci & np.uint64(M.PGC_xen_heap | M.PGC_extra)) == 0)
    lvl = ((ti & np.uint64(M.PGT_type_mask)) >> np.uint64(61)).astype(np.int64)
    pinned = (ti & np.uint64(M.PGT_pinned)) != 0
    valid = (ti & np.uint64(M.PGT_validated)) != 0
    is_pt = (lvl >= 1) & (lvl <= 4) & (pinned | valid)
    t = np.where(is_pt, lvl.astype(np.uint32) << 28, 0).astype(np.uint32)
    t |= np.where(is_pt & pinned, np.uint32(D.XEN_DOMCTL_PFINFO_LPINTAB), np.uint32(0))
    t = np.where((ci & np.uint64(M.PGC_broken)) != 0, np.uint32(D.XEN_DOMCTL_PFINFO_BROKEN), t)
    out[idx] = np.where(good, t, np.uint32(D.XEN_DOMCTL_PFINFO_XTAB))
    return out
