"""Fidelity switches: where Xen 4.17 has a defect that changes outcomes, the simulator has it
too (on by default) so that tools are tested against the real behaviour, and a switch to
turn it off so that a test can show what the behaviour would be without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class HostCrash(Exception):
    """The real hypervisor would crash here (a ``BUG()`` or a fatal page fault in Xen).

    Raised loudly, like :class:`HostHang`, so that tests can prove a tool never gets here."""


class HostHang(Exception):
    """The real host would hang here (a CPU spinning forever with interrupts off in Xen).

    Raised instead of hanging, loudly, so that tests can prove a tool never gets here."""


class HypercallLivelock(Exception):
    """The real hypervisor would restart this hypercall for ever (a continuation that can
    never make progress): the calling dom0 process never returns from it.

    Raised loudly, like :class:`HostHang`, so that tests can prove a tool never gets here."""


@dataclass
class Quirks:
    #: Xen 4.17: ``p2m_pod_offline_or_broken_hit`` takes a PV domain's never-initialised PoD
    #: lock; taken first on physical CPU 0 the recursive spinlock is corrupted and the next
    #: acquisition (the next owned-frame offline of that domain, or its destruction) spins
    #: forever (xen-lab.md, "A hang in Xen 4.17's page offlining").
    pod_lock_hang: bool = True
    #: ``memory_exchange`` fail-after-steal: ``assign_pages`` resets count_info, so a stolen
    #: offlining frame handed back returns to ``inuse`` and loses PGC_broken (QUIRK 7.C5).
    assign_resets_state: bool = True
    #: Xen 4.17: ``reserve_offlined_page`` grows the pieces of a free buddy split around an
    #: offlined frame without checking their alignment (and stops one step early at the
    #: buddy's end), so the free lists get chunks not aligned to their order; a later merge
    #: with such a chunk builds a "free" chunk over frames in use, and Xen hands pages out
    #: twice or dies (fixed upstream in 2026: 71c6a62317, 5cb7ff13ee).  Range offlines of
    #: more than ``Heap.PER_FRAME_LIMIT`` free frames are still re-split canonically.
    #: xenpage's mem-offline steps around it (toolstack/split_guard.py); Xen's own
    #: machine-check offline of a free frame and a destroyed domain's pending frame cannot be
    #: guarded.  Tests of the fixed split (xen-semantics.md 1.8) turn it off.
    reserve_misaligned: bool = True
    #: The order in which ``relinquish_memory`` frees a dying domain's pages is its page
    #: list's (allocation order), which the simulator does not keep: it frees them at once and
    #: merges canonically.  On: the worst case of that order -- each offline-pending frame
    #: freed after its neighbours, offlined inside their merged buddy, where
    #: ``reserve_misaligned`` then leaves misaligned chunks (the lab saw guests crash and Xen
    #: fault in ``free_heap_pages`` after such destructions).  Off by default (the real order
    #: usually frees a superpage's frames upwards, which keeps a pending frame the last of its
    #: merged buddy); tests of the toolstack's migration path turn it on.
    relinquish_pending_last: bool = False
    #: A Xen built without shadow paging (``CONFIG_SHADOW_PAGING=n``: ``mm/shadow/none.c``),
    #: as the lab's Debian 4.17.7 is (its boot log: "PV L1TF shadowing: Dom0 disabled, DomU
    #: disabled"): a PV guest has no log-dirty -- ENABLE_LOGDIRTY answers -EOPNOTSUPP and OFF
    #: -EINVAL (both seen in the lab).  A build option, not a defect: off by default.
    no_shadow_paging: bool = False
    #: The CPU as Xen's ``l1tf_calculations`` sees it (see :mod:`.l1tf`): believed
    #: L1TF-vulnerable (``cpu_has_bug_l1tf``: Intel family-6 cores), its CPUID physical
    #: address width and the L1D's (0: the same).  Default: the lab's QEMU/TCG ``-cpu max``,
    #: "CPU Vendor: AMD, Family 15 (0xf), Model 107", not vulnerable, 40 address bits
    #: (measured: tests_xen/test_hang_guard.py, test_l1tf_boot_facts).
    cpu_l1tf: bool = False
    paddr_bits: int = 40
    l1d_maxphysaddr: int = 0
    #: ``pv-l1tf=`` (``opt_pv_l1tf_hwdom``, ``opt_pv_l1tf_domu``); None: Xen's default (dom0
    #: off; domUs on iff ``cpu_l1tf``).  The lab's boot log: "PV L1TF shadowing: Dom0
    #: disabled, DomU disabled".
    pv_l1tf_dom0: bool | None = None
    pv_l1tf_domu: bool | None = None

    def to_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, st: dict) -> "Quirks":
        return cls(**{k: v for k, v in st.items() if k in cls.__dataclass_fields__})
