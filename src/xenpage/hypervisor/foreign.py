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
from .mm import get_page, get_page_type, put_page, put_page_type, refcounted

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host


@dataclass
class ForeignMapping:
    mapper: int
    domid: int
    mfns: list[int]
    writable: bool
    typed: bool  # whether writable type references were taken (not for HVM frames)


@dataclass
class ForeignMaps:
    maps: dict[int, ForeignMapping] = field(default_factory=dict)
    next_handle: int = 1

    def to_state(self) -> dict:
        return {"maps": {str(h): [m.mapper, m.domid, m.mfns, m.writable, m.typed]
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
    if d is None or d.is_system:
        return -E.ESRCH, -1
    frames = [int(f) for f in np.asarray(frames).ravel().tolist()]
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
    done: list[int] = []
    rc = 0
    for m in mfns:
        if not get_page(host, m, domid):
            rc = -E.EBUSY
            break
        if typed and get_page_type(host, m, mm.PGT_writable_page):
            put_page(host, m)
            rc = -E.EBUSY
            break
        done.append(m)
    if rc:
        for m in done:
            if typed:
                put_page_type(host, m)
            put_page(host, m)
        return rc, -1
    h = host.foreign.next_handle
    host.foreign.next_handle += 1
    host.foreign.maps[h] = ForeignMapping(mapper, domid, mfns, writable, typed)
    return 0, h


def unmap(host: "Host", handle: int) -> int:
    m = host.foreign.maps.pop(handle, None)
    if m is None:
        return -E.EINVAL
    for f in m.mfns:
        if m.typed:
            put_page_type(host, f)
        put_page(host, f)
    return 0
