"""The ``Hypervisor`` protocol: what a dom0 process can do through libxenctrl,
libxenguest, libxenforeignmemory, libxencall and libxenstore.

Errors come back as negative errnos (``rc``), as the hypercalls return them; the toolstack
turns them into typed outcomes.  Batches are first-class: a thousand PTE updates are one call.
Two implementations exist: :mod:`xenpage.backends.sim` (the simulated host, in-process) and
:mod:`xenpage.backends.xen` (real Xen through ctypes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..abi import domctl

if TYPE_CHECKING:  # annotations only: the CLI's start-up does not load numpy
    from array import array

    import numpy as np

    #: the offline sysctl's status words (see :meth:`Hypervisor.page_offline_op`)
    StatusWords = np.ndarray | array
# -- capabilities: what a backend can do beyond the base protocol ---------------------------
#: live migration (and the HVM retirement paths' other calls): the backend is a
#: :class:`MigrationHypervisor`
CAP_MIGRATE = "migrate"
#: in-place retirement of an HVM/PVH guest's frames with stock hypercalls (pause, copy,
#: ``XENMEM_decrease_reservation``, ``XENMEM_populate_physmap``, copy back; hvm_exchange.py)
CAP_HVM_INPLACE = "hvm-inplace"
#: the host's state must be saved by the toolstack at each journal record
#: (:class:`CheckpointHypervisor`): the simulator, whose host lives in this process.  Real
#: Xen keeps its state by itself across the death of a dom0 process and does not claim it.
CAP_CHECKPOINT = "checkpoint"
#: every capability a backend may claim
CAPABILITIES = frozenset({CAP_MIGRATE, CAP_HVM_INPLACE, CAP_CHECKPOINT})


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
        """``XEN_DOMINF_hvm_guest``: a translated guest, HVM or PVH (Xen's flags do not tell
        them apart; see :mod:`.guest_type`)."""
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
    #: what this backend can do beyond this protocol, from :data:`CAPABILITIES`; the
    #: toolstack asks this, never the backend's attributes
    capabilities: frozenset[str]

    # -- host -------------------------------------------------------------------------------
    def physinfo(self) -> PhysInfo: ...

    def max_mfn(self) -> int:
        """``XENMEM_maximum_ram_page``: first frame past the last RAM frame."""
        ...

    def page_offline_op(self, cmd: int, start: int, end: int) -> tuple[int, StatusWords | None]:
        """``XEN_SYSCTL_page_offline_op`` over [start, end] (32-bit fields): ``(rc, status)``,
        one uint32 word per frame in a buffer-protocol sequence (``len``, indexing,
        ``tolist()``; ``np.asarray`` views it): numpy on the simulator, ``array('I')`` on real
        Xen, so a one-frame query loads no numpy."""
        ...

    def page_offline_each(self, cmd: int, mfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The sysctl once per MFN, each a one-frame call (``start == end``), in the order
        given: ``(rc, status)`` as int32 and uint32 arrays, element i what the call for
        ``mfns[i]`` answered (rc 0 or a negative errno; status 0x01010101 where Xen wrote
        nothing).  What a toolstack offlining frames highest first issues
        (:mod:`.split_guard`), without a Python object per frame."""
        ...

    def split_misaligns(self) -> bool:
        """Whether this Xen's ``reserve_offlined_page`` can leave misaligned free buddies
        (Xen 4.17; see :mod:`xenpage.toolstack.split_guard`)."""
        ...

    def xen_fixed_range(self) -> tuple[int, int] | None:
        """``[first, end)`` MFNs of Xen's fixed image -- the frames ``is_xen_fixed_mfn``
        makes ``offline_page`` refuse for ever (EPERM), its freed init region and unused BSS
        included although the heap hands them out -- from
        ``KEXEC_CMD_kexec_get_range(KEXEC_RANGE_MA_XEN)``; None if this Xen does not say
        (no kexec support).  Nothing else a dom0 process can read names it: the offline
        sysctl's query answers 0 for such a frame, ``xl info`` and dom0's E820 and
        ``/proc/iomem`` do not show it, and ``xl dmesg`` gives the relocated base but not
        the image's extent (measured in the lab: tests_xen/results/lab-layout.json)."""
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

    def memory_exchange(self, domid: int, in_mfns: list[int], out_gpfns: list[int],
                        address_bits: int = 0) -> tuple[int, int, list[int]]:
        """``XENMEM_exchange`` of order-0 extents: ``(rc, nr_exchanged, out_mfns)``;
        ``address_bits`` (the output's ``XENMEMF_address_bits``): new frames below 2^bits
        bytes only (0: anywhere)."""
        ...

    def logdirty_control(self, domid: int, op: int, pages: int = 0, mode: int = 0,
                         packed: bool = False
                         ) -> tuple[int, np.ndarray | None, LogDirtyStats | None]:
        """``xc_shadow_control`` / ``xc_logdirty_control``: ENABLE_LOGDIRTY, OFF, CLEAN, PEEK.
        For CLEAN/PEEK the bitmap of ``pages`` gfns (bool array) and the stats; ``packed``:
        the bitmap as Xen hands it out, ``ceil(pages / 8)`` bytes, bit ``p & 7`` of byte
        ``p >> 3`` (a PV guest's pfns: the pre-scan reads a big guest's without unpacking)."""
        ...

    def wait(self, seconds: float) -> None:
        """Let time pass (the simulator runs its guests; real Xen just sleeps)."""
        ...


@runtime_checkable
class CheckpointHypervisor(Hypervisor, Protocol):
    """A backend claiming :data:`CAP_CHECKPOINT`."""

    def checkpoint(self) -> None:
        """Save the host now: what the death of the toolstack at this point leaves behind
        (the write-ahead journal calls it before each record)."""
        ...


# -- HVM guests and live migration ----------------------------------------------------------

class PageData(Protocol):
    """The contents of a batch of guest pages, copied out of (or into) the guest: opaque to
    the toolstack except for page-table normalisation, which reads and writes words."""

    def __len__(self) -> int: ...

    def words(self, i: int) -> np.ndarray:
        """Page ``i`` as 512 uint64 words (a copy)."""
        ...

    def set_words(self, i: int, words: np.ndarray) -> None: ...

    def select(self, idx: np.ndarray) -> "PageData":
        """The pages at positions ``idx``, in that order."""
        ...


@dataclass(frozen=True)
class LogDirtyStats:
    """``xc_shadow_op_stats_t``: faults taken and pages newly dirtied since the last CLEAN."""

    fault_count: int
    dirty_count: int


@dataclass
class MigrationReport:
    """What a live migration did, as the backend's engine reports it: libxl's ``xl migrate``
    on real Xen (engine ``"libxl"``), the simulator's model of libxc's save/restore
    (engine ``"sim"``).  Fields an engine does not report are None."""

    ok: bool
    rc: int
    error: str
    new_domid: int | None
    same_host: bool
    rounds: int | None
    live_rounds: int | None
    pages_sent: int | None
    downtime_s: float | None
    total_s: float
    stop_reason: str | None
    engine: str
    log: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


@runtime_checkable
class MigrationHypervisor(Hypervisor, Protocol):
    """What the HVM/PVH retirement paths need on top of :class:`Hypervisor` -- each one a
    call a dom0 process makes on real Xen (libxenctrl, libxenforeignmemory, libxl)."""

    def now(self) -> float:
        """Seconds on the host's clock (``time.monotonic`` on real Xen; the simulated clock
        on the simulator, which guests' work and hypervisor operations advance)."""
        ...

    def read_pages(self, domid: int, frames) -> "tuple[int, PageData | None]":
        """Map ``frames`` (gfns of a translated guest, mfns of a PV guest) read-only, copy
        them out and unmap (``xenforeignmemory_map`` + memcpy)."""
        ...

    def write_pages(self, domid: int, frames, data: "PageData") -> int:
        """Map ``frames`` writable, copy ``data`` in, unmap."""
        ...

    def populate_physmap(self, domid: int, gfns, address_bits: int = 0) -> tuple[int, np.ndarray]:
        """``XENMEM_populate_physmap`` with order-0 extents at the given gfns:
        ``(done or -errno, extents)``.  For a translated (HVM/PVH) guest Xen writes no MFN
        back: ``extents`` is the gfn list as passed."""
        ...

    def decrease_reservation(self, domid: int, gfns) -> int:
        """``XENMEM_decrease_reservation`` with order-0 extents (gfns of a translated guest):
        the number of extents done (Xen stops at the first it cannot remove) or -errno."""
        ...

    def live_migrate(self, domid: int, destination=None) -> MigrationReport:
        """Live-migrate ``domid`` (to the same host when ``destination`` is None) with the
        backend's migration engine."""
        ...

    def hvm_p2m(self, domid: int, gfns) -> "tuple[int, np.ndarray, np.ndarray, np.ndarray]":
        """``(rc, mfns, p2m types, leaf orders)`` of a translated guest's ``gfns``: Xen 4.17
        has no hypercall that tells a dom0 process this; the real backend learns the frame
        from dom0's own page-table entry after mapping the gfn (:mod:`xenpage.backends.xen`),
        the simulator reads its p2m.  ``-EOPNOTSUPP`` where a backend cannot; the toolstack
        uses it only to verify (the new frame's M2P)."""
        ...

