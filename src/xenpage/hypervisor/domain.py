"""Domains (``xen/common/domain.c``): identity, PV/HVM, pause count, shutdown and destruction.

What a domain's memory *holds* (page tables, P2M, workloads) is built by the guest layer;
here is only what the hypervisor tracks about a domain.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..abi import domctl
from ..abi.xen import DOMID_IO, DOMID_XEN, SHUTDOWN_suspend

#: ``d->shutdown_code`` of a domain that is not shut down (xen/include/xen/sched.h).
SHUTDOWN_CODE_INVALID = 0xFFFFFFFF

#: State of a PV domain's never-initialised PoD lock (see :mod:`.quirks`).
POD_LOCK_PRISTINE = "pristine"
POD_LOCK_SANE = "sane"
POD_LOCK_CORRUPT = "corrupt"


@dataclass
class Domain:
    domid: int
    name: str
    #: ``is_hvm_domain``: an HVM container with Xen's p2m -- HVM *and* PVH guests.  Every rule
    #: the simulator keys on ``hvm`` (translated foreign maps, no typed references, vMCE,
    #: PoD, refcount-less mmuext, log-dirty by p2m type) holds for both, as in Xen 4.17
    hvm: bool = False
    #: a PVH guest: an HVM container (``is_hvm_domain``) with HAP, no device model and only
    #: the local APIC emulated (``emulation_flags`` = ``XEN_X86_EMU_LAPIC``)
    pvh: bool = False
    privileged: bool = False
    max_pages: int = 0
    tot_pages: int = 0
    vcpus: int = 1
    #: per vCPU: the set of physical CPUs it may run on (``vcpu_set_hard_affinity``)
    affinity: list[list[int]] = field(default_factory=list)
    pause_count: int = 0
    is_shutting_down: bool = False
    shutdown_code: int = 0
    dying: bool = False
    #: ``SCHEDOP_shutdown(suspend)`` returns this to the guest on a cooperative resume
    suspend_cancelled: bool = False
    pod_lock: str = POD_LOCK_PRISTINE
    #: HVM populate-on-demand cache frames
    pod_cache: list[int] = field(default_factory=list)
    #: Xen-heap frames shared with this domain (shared_info, grant frames)
    xenheap_pages: list[int] = field(default_factory=list)
    #: per vCPU root page tables (``v->arch.guest_table`` / ``guest_table_user``), 0 = none
    guest_table: list[int] = field(default_factory=list)
    guest_table_user: list[int] = field(default_factory=list)
    #: the guest's ``arch_shared_info``: where its P2M frame list lives and its size
    p2m_fll_mfn: int = 0
    p2m_max_pfn: int = 0
    #: ``v->mapcache_invalidate`` (one flag for all vCPUs here): the device model must drop
    #: its map cache on the guest's next hypercall
    mapcache_invalidate: bool = False
    #: ``PG_SH_forced``: a PV domain switched to shadow paging by the L1TF check
    #: (``pv_l1tf_tasklet``; see :mod:`.l1tf`)
    sh_forced: bool = False
    #: free-form per-domain data kept by the guest layer (kernel model state)
    guest: dict = field(default_factory=dict)

    @property
    def is_system(self) -> bool:
        return self.domid in (DOMID_XEN, DOMID_IO)

    def flags(self) -> int:
        """``XEN_DOMINF_*`` as ``getdomaininfo`` reports them."""
        f = 0
        if self.dying:
            f |= domctl.XEN_DOMINF_dying
        if self.hvm:
            f |= domctl.XEN_DOMINF_hvm_guest | domctl.XEN_DOMINF_hap
        if self.is_shutting_down:
            f |= domctl.XEN_DOMINF_shutdown
            f |= (self.shutdown_code & domctl.XEN_DOMINF_shutdownmask) << domctl.XEN_DOMINF_shutdownshift
        else:
            # getdomaininfo ORs in ``d->shutdown_code << 16`` unconditionally, and a domain
            # that is not shut down holds SHUTDOWN_CODE_INVALID (~0u): bits 16-31 all set.
            f |= (SHUTDOWN_CODE_INVALID << domctl.XEN_DOMINF_shutdownshift) & 0xFFFFFFFF
        if self.pause_count:
            f |= domctl.XEN_DOMINF_paused
        if not (self.pause_count or self.is_shutting_down or self.dying):
            f |= domctl.XEN_DOMINF_running
        return f

    @property
    def suspended(self) -> bool:
        return self.is_shutting_down and self.shutdown_code == SHUTDOWN_suspend

    def to_state(self) -> dict:
        d = dict(self.__dict__)
        return d

    @classmethod
    def from_state(cls, st: dict) -> "Domain":
        return cls(**st)
