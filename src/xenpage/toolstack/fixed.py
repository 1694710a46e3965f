"""Xen's fixed range: the frames of its image (``is_xen_fixed_mfn``: ``_stext`` ..
``__2M_rwdata_end``), which ``offline_page`` refuses for ever (EPERM, status 0x7ff20108),
although Xen hands some of them out: its init region, freed once Xen runs, and the unused
BSS given back at boot go to the heap -- the init region at the heads of the free lists, so
the next allocations, a new guest's first frames or an exchange's new frame, come from it.
A failing frame there can never be retired; the data on it can only be moved off it.

How a dom0 toolstack knows the range (measured on the lab's Xen 4.17.7,
tests_xen/results/lab-layout.json): ``KEXEC_CMD_kexec_get_range(KEXEC_RANGE_MA_XEN)``
(``machine_kexec_get_xen``) names ``_start`` .. ``_end``, exactly the frames the offline
sysctl refused.  Nothing else does: the query sysctl answers 0 for such a frame as for any
other, the E820 Xen gives dom0 and ``/proc/iomem`` show that memory as RAM, ``xl info`` has
no such field, and ``xl dmesg`` names the relocated base but not the image's extent (and the
console ring forgets it on a long-running host).
"""

from __future__ import annotations

from ..abi import domctl as D
from ..abi import xen as X
from .hypervisor import Hypervisor


def fixed_range(hv: Hypervisor) -> tuple[int, int] | None:
    """``[first, end)`` of Xen's fixed range, or None if this Xen does not say."""
    r = hv.xen_fixed_range()
    if not isinstance(r, tuple) or len(r) != 2:  # not said (or a failed call)
        return None
    return int(r[0]), int(r[1])


def in_fixed_range(mfn: int, rng: tuple[int, int] | None) -> bool:
    return rng is not None and rng[0] <= int(mfn) < rng[1]


def below_bits(rng: tuple[int, int]) -> int:
    """The output address bits (``XENMEMF_address_bits``) that keep a new frame out of the
    zone holding Xen's fixed range and every zone above it (0: none below).  Xen's allocator
    takes from the highest zone with a free frame (``get_free_buddy``), so a frame that
    landed in that zone had nothing above it to choose from: asking below it gives up only
    that zone's other frames."""
    z = int(rng[0]).bit_length()  # page_to_zone: flsl(mfn)
    return (z - 1) + X.PAGE_SHIFT if z > 1 else 0


def pv_owner(hv: Hypervisor, mfn: int) -> int | None:
    """The PV domain whose frame ``mfn`` is (``getpageframeinfo3`` names it for its owner
    only; XTAB for anyone else)."""
    for d in hv.domain_list():
        if d.hvm:
            continue
        rc, t = hv.page_types(d.domid, [int(mfn)])
        if rc == 0 and len(t) and int(t[0]) != D.XEN_DOMCTL_PFINFO_XTAB:
            return d.domid
    return None


def note(hv: Hypervisor, mfn: int) -> str | None:
    """One line for ``mem-status``: ``mfn`` lies in Xen's fixed range (and whose it is)."""
    rng = fixed_range(hv)
    if not in_fixed_range(mfn, rng):
        return None
    owner = pv_owner(hv, mfn)
    whose = f"d{owner}'s frame" if owner is not None else "it"
    return (f"mfn {mfn:x} lies in Xen's fixed range {rng[0]:x}-{rng[1] - 1:x} "
            f"(is_xen_fixed_mfn): {whose} can never be offlined on this Xen; "
            "migrate or exchange to move the data off it")
