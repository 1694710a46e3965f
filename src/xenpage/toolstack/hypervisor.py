"""The ``Hypervisor`` protocol: what a dom0 process can do through libxenctrl,
libxenguest, libxenforeignmemory, libxencall and libxenstore.

Errors come back as negative errnos (``rc``), as the hypercalls return them; the toolstack
turns them into typed outcomes.  Batches are first-class: a thousand PTE updates are one call.
Two implementations exist: :mod:`xenpage.backends.sim` (the simulated host, in-process) and
:mod:`xenpage.backends.xen` (real Xen through ctypes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from ..abi import domctl


@dataclass(frozen=True)
class DomainInfo:
    """``xc_domaininfo_t`` as the toolstack needs it."""

    domid: int
    flags: int
    tot_pages: int
    max_pages: int
    nr_vcpus: int
    name: str = ""

    @property
    def hvm(self) -> bool:
        return bool(self.flags & domctl.XEN_DOMINF_hvm_guest)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & domctl.XEN_DOMINF_shutdown)

    @property
    def shutdown_reason(self) -> int:
        return domctl.shutdown_reason(self.flags)

    @property
    def paused(self) -> bool:
        return bool(self.flags & domctl.XEN_DOMINF_paused)

    @property
    def dying(self) -> bool:
        return bool(self.flags & domctl.XEN_DOMINF_dying)

    def state_letters(self) -> str:
        """``xl list``'s state column: r b p s c d."""
        f = self.flags
        reason = self.shutdown_reason
        return "".join([
            "r" if f & domctl.XEN_DOMINF_running else "-",
            "b" if f & domctl.XEN_DOMINF_blocked else "-",
            "p" if f & domctl.XEN_DOMINF_paused else "-",
            "s" if (f & domctl.XEN_DOMINF_shutdown) and reason != 3 else "-",
            "c" if (f & domctl.XEN_DOMINF_shutdown) and reason == 3 else "-",
            "d" if f & domctl.XEN_DOMINF_dying else "-",
        ])

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(hvm=self.hvm, state=self.state_letters(), shutdown=self.shutdown,
                 shutdown_reason=self.shutdown_reason if self.shutdown else None)
        return d


@dataclass(frozen=True)
class PhysInfo:
    nr_cpus: int
    total_pages: int
    free_pages: int
    max_mfn: int
    backend: str = ""
    extra: dict = field(default_factory=dict)


class ForeignMap(Protocol):
    """Frames of a guest mapped into dom0 (``xenforeignmemory_map``): ``array`` is an
    ``(n, 512)`` uint64 view of their contents; after writing to a writable mapping call
    :meth:`flush`; :meth:`unmap` drops the mapping (and the references it holds)."""

    mfns: np.ndarray
    writable: bool
    array: np.ndarray

    def flush(self) -> None: ...

    def unmap(self) -> None: ...


@runtime_checkable
class Hypervisor(Protocol):
    """The privileged (control-domain) view of one Xen host."""

    #: "sim" or "xen"
    kind: str

    # -- host -------------------------------------------------------------------------------
    def physinfo(self) -> PhysInfo: ...

    def max_mfn(self) -> int:
        """``XENMEM_maximum_ram_page``: first frame past the last RAM frame."""
        ...

    def page_offline_op(self, cmd: int, start: int, end: int) -> tuple[int, np.ndarray | None]:
        """``XEN_SYSCTL_page_offline_op`` over [start, end] (32-bit fields): ``(rc, status)``."""
        ...

    # -- domains ----------------------------------------------------------------------------
    def domain_list(self) -> list[DomainInfo]: ...

    def domain_info(self, domid: int) -> DomainInfo | None: ...

    def pause(self, domid: int) -> int: ...

    def unpause(self, domid: int) -> int: ...

    def resume(self, domid: int, fast: bool = True) -> int:
        """``xc_domain_resume``: cooperative (fast) resume of a suspended domain."""
        ...

    def destroy(self, domid: int) -> int: ...

    def vcpu_affinity(self, domid: int, vcpu: int) -> list[int]: ...

    def set_vcpu_affinity(self, domid: int, vcpu: int, cpus: list[int]) -> int: ...

    # -- xenstore ---------------------------------------------------------------------------
    def xs_read(self, path: str) -> str | None: ...

    def xs_write(self, path: str, value: str) -> int: ...

    # -- guest memory (libxenforeignmemory, libxenguest) ----------------------------------
    def m2p(self, mfns: np.ndarray) -> np.ndarray:
        """Entries of the machine-to-phys table (``xc_map_m2p``); INVALID = 2^64-1."""
        ...

    def pv_p2m_frames(self, domid: int) -> tuple[int, np.ndarray, int]:
        """``(rc, frames, p2m_size)``: the MFNs holding a PV guest's P2M, found through its
        shared_info frame list (``xc_map_domain_meminfo``)."""
        ...

    def pv_p2m_frame_lists(self, domid: int) -> tuple[int, np.ndarray, int]:
        """``(rc, frame_list_mfns, frame_list_list_mfn)`` of a PV guest's P2M."""
        ...

    def map_foreign(self, domid: int, mfns, writable: bool) -> "ForeignMap | int":
        """Map frames of ``domid``; a negative errno if any cannot be mapped."""
        ...

    def page_types(self, domid: int, mfns) -> tuple[int, np.ndarray]:
        """``XEN_DOMCTL_getpageframeinfo3`` over a batch (``xc_get_pfn_type_batch``)."""
        ...

    def grant_entries(self, domid: int) -> tuple[int, np.ndarray]:
        """The guest's v1 grant entries as uint64 words (``flags | domid<<16 | frame<<32``)."""
        ...

    def mmu_update(self, reqs: np.ndarray, foreigndom: int) -> tuple[int, int]:
        """``HYPERVISOR_mmu_update`` with ``(ptr, val)`` rows: ``(rc, done)``."""
        ...

    def mmuext_op(self, ops: list[tuple[int, int]], foreigndom: int) -> tuple[int, int]:
        """``HYPERVISOR_mmuext_op`` with ``(cmd, mfn)`` pairs: ``(rc, done)``."""
        ...

    def memory_exchange(self, domid: int, in_mfns: list[int], out_gpfns: list[int]
                        ) -> tuple[int, int, list[int]]:
        """``XENMEM_exchange`` of order-0 extents: ``(rc, nr_exchanged, out_mfns)``."""
        ...

    def wait(self, seconds: float) -> None:
        """Let time pass (the simulator runs its guests; real Xen just sleeps)."""
        ...
