"""Foreign mappings by the control domain (privcmd / ``xenforeignmemory_map``).

On real Xen, dom0 maps a guest's frames by writing L1 entries of its own page tables with
``mmu_update(foreigndom=guest)``; each mapping holds a general reference on the frame and,
if writable, a writable type reference (none for an HVM guest's frames).  dom0's own page
tables are not modelled, so each mapping is recorded here with the references it holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import mm
from ..abi.xen import DOMID_XEN
from .mm import (_l1_refs_check, _l1_refs_drop, _l1_refs_take, get_page, get_page_type,
                 put_page, refcounted)

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host


@dataclass
class ForeignMapping:
    mapper: int
    domid: int
    mfns: list[int]
    writable: bool
    typed: bool  # whether writable type references were taken (not for HVM frames)
    #: for Xen's own mappings of a guest's pages (mapper DOMID_XEN): what they are
    what: str = ""


@dataclass
class ForeignMaps:
    maps: dict[int, ForeignMapping] = field(default_factory=dict)
    next_handle: int = 1

    def to_state(self) -> dict:
        return {"maps": {str(h): [m.mapper, m.domid, m.mfns, m.writable, m.typed, m.what]
                         for h, m in self.maps.items()}, "next_handle": self.next_handle}

    @classmethod
    def from_state(cls, st: dict) -> "ForeignMaps":
        f = cls()
        f.maps = {int(h): ForeignMapping(*v) for h, v in st.get("maps", {}).items()}
        f.next_handle = st.get("next_handle", 1)
        return f


def map_frames(host: "Host", mapper: int, domid: int, frames, writable: bool) -> tuple[int, int]:
    """Map ``frames`` (MFNs of a PV guest, GFNs of an HVM guest) of ``domid`` into ``mapper``.
    All or nothing: on the first frame that cannot be mapped every reference taken is given
    back and its error returned, as ``mod_l1_entry`` / ``get_page_from_l1e`` would for
    ``mmu_update(foreigndom=domid)`` on the mapper's own L1: a GFN with no frame behind it
    -EINVAL; an MMIO/DOMID_IO or invalid frame -EPERM (the guest has no I/O access); a frame
    that is not the guest's, or whose type forbids a writable mapping (a page table),
    -EBUSY.  Returns (rc, handle)."""
    md = host.domains.get(mapper)
    if md is None or not md.privileged:
        return -E.EPERM, -1
    d = host.domains.get(domid)
    # DOMID_XEN's frames shared with privileged guests (the M2P) may be mapped by dom0
    if d is None or (d.is_system and domid != DOMID_XEN):
        return -E.ESRCH, -1
    frames = np.asarray(frames).ravel().tolist()  # Python ints
    if d.hvm:
        p2m = host.p2m.get(domid)
        mfns = []
        for g in frames:
            if p2m is None or not 0 <= g < p2m.size:
                return -E.EINVAL, -1
            m = int(p2m[g])
            if m >= host.nframes or host.ft.owner(m) != domid \
                    or not int(host.ft.count_info[m]) & mm.PGC_count_mask:
                return -E.EINVAL, -1  # get_page_from_gfn failed
            mfns.append(m)
    else:
        mfns = frames
    ref = refcounted(host, np.array(mfns, dtype=np.int64))
    if not ref.all():
        return -E.EPERM, -1  # iomem_access_permitted(guest) fails
    typed = writable and not d.hvm
    # The references dom0's L1 entries would take (get_page_from_l1e), all or nothing,
    # vectorised over the batch.
    arr = np.array(mfns, dtype=np.int64)
    rw = np.full(arr.size, typed)
    rc = _l1_refs_check(host, arr, rw, mapper, domid)
    if rc:
        return rc, -1
    _l1_refs_take(host, arr, rw, mapper)
    h = host.foreign.next_handle
    host.foreign.next_handle += 1
    host.foreign.maps[h] = ForeignMapping(mapper, domid, mfns, writable, typed)
    return 0, h


def unmap(host: "Host", handle: int, mapper: int | None = None) -> int:
    """Drop a mapping's references; with ``mapper`` given, only that domain's mapping."""
    m = host.foreign.maps.get(handle)
    if m is None or (mapper is not None and m.mapper != mapper):
        return -E.EINVAL
    del host.foreign.maps[handle]
    arr = np.array(m.mfns, dtype=np.int64)
    _l1_refs_drop(host, arr, np.full(arr.size, m.typed), m.mapper)
    return 0


#: dom0 daemons that map a guest's rings and unmap them when they see it die (xenstored and
#: xenconsoled watch ``@releaseDomain``, which ``domain_kill`` fires through ``VIRQ_DOM_EXC``)
DAEMON_KINDS = ("xenstored", "xenconsoled")

#: Xen's own mappings of guest pages a PV guest registers (``xen/common/domain.c``
#: ``map_vcpu_info``, ``xen/common/event_fifo.c`` via ``map_guest_page``)
XEN_MAPPED_KINDS = ("vcpu_info", "evtchn_fifo_control", "evtchn_fifo_array")


def map_guest_page(host: "Host", domid: int, mfn: int, what: str) -> int:
    """Xen maps one of the guest's own frames for itself (``mfn``: for a translated guest,
    a gfn -- ``map_vcpu_info`` takes a gfn and calls ``get_page_from_gfn``), e.g. ``VCPUOP_register_vcpu_info``
    or ``EVTCHNOP_init_control`` / ``EVTCHNOP_expand_array``: a general and a writable type
    reference (``get_page_from_gfn`` + ``get_page_type(PGT_writable_page)``), held until the
    domain is destroyed.  -EINVAL if the frame is not the guest's or cannot be writable (a
    page table); -EINVAL for a second vcpu_info or control block of the domain (vCPU 0)."""
    d = host.domains.get(domid)
    if d is None:
        return -E.EINVAL
    if d.hvm:  # get_page_from_gfn: a translated guest names a gfn
        p2m = host.p2m.get(domid)
        if p2m is None or not 0 <= mfn < p2m.size or int(p2m[mfn]) >= host.nframes:
            return -E.EINVAL
        mfn = int(p2m[mfn])
    if what != "evtchn_fifo_array" and any(
            m.mapper == DOMID_XEN and m.domid == domid and m.what == what
            for m in host.foreign.maps.values()):
        return -E.EINVAL  # already registered
    if not get_page(host, mfn, domid):
        return -E.EINVAL
    if get_page_type(host, mfn, mm.PGT_writable_page):
        put_page(host, mfn)
        return -E.EINVAL
    h = host.foreign.next_handle
    host.foreign.next_handle += 1
    host.foreign.maps[h] = ForeignMapping(DOMID_XEN, domid, [mfn], True, True, what)
    return 0
