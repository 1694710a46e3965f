"""Grant tables, version 1 (``xen/common/grant_table.c``).

A domain's shared grant entries live in Xen-heap frames shared with it; each 8-byte entry is
``flags:u16 | domid:u16 | frame:u32`` (as one little-endian word: ``flags | domid<<16 |
frame<<32``).  The guest writes entries directly into those frames.  Another domain maps a
granted frame with ``GNTTABOP_map_grant_ref``: a host mapping holds one general reference on
the frame (and a writable type reference unless read-only), a device mapping one more of
each; Xen marks the entry ``GTF_reading``/``GTF_writing`` while it is mapped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..abi import grant as G
from ..abi import mm
from .mm import get_page, get_page_type, put_page, put_page_type

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

_U = np.uint64
DEFAULT_FRAMES = 4


@dataclass
class Maptrack:
    mapper: int
    granter: int
    ref: int
    mfn: int
    flags: int  # GNTMAP_*
    #: whether a writable host mapping took a writable type reference
    #: (``gnttab_host_mapping_get_page_type``: not for an HVM granter's frame mapped by another)
    host_typed: bool = True

    @property
    def refs(self) -> int:
        """General references held: one per kind of mapping (host, device)."""
        return int(bool(self.flags & G.GNTMAP_host_map)) + int(bool(self.flags & G.GNTMAP_device_map))

    @property
    def writable(self) -> bool:
        return not self.flags & G.GNTMAP_readonly

    @property
    def type_refs(self) -> int:
        """Writable type references held."""
        if not self.writable:
            return 0
        return int(bool(self.flags & G.GNTMAP_device_map)) \
            + int(bool(self.flags & G.GNTMAP_host_map) and self.host_typed)


@dataclass
class GrantTables:
    """Grant state of the whole host: each domain's grant frames and every live mapping."""

    frames: dict[int, list[int]] = field(default_factory=dict)
    maptrack: dict[int, Maptrack] = field(default_factory=dict)
    next_handle: int = 1

    def to_state(self) -> dict:
        return {"frames": {str(k): v for k, v in self.frames.items()},
                "maptrack": {str(h): [m.mapper, m.granter, m.ref, m.mfn, m.flags, m.host_typed]
                             for h, m in self.maptrack.items()},
                "next_handle": self.next_handle}

    @classmethod
    def from_state(cls, st: dict) -> "GrantTables":
        g = cls()
        g.frames = {int(k): list(v) for k, v in st.get("frames", {}).items()}
        g.maptrack = {int(h): Maptrack(*v) for h, v in st.get("maptrack", {}).items()}
        g.next_handle = st.get("next_handle", 1)
        return g


def setup_table(host: "Host", domid: int, nr_frames: int = DEFAULT_FRAMES) -> list[int]:
    """``gnttab_setup_table`` / ``gnttab_grow_table``: Xen-heap frames shared with the guest."""
    gt = host.grants
    have = gt.frames.setdefault(domid, [])
    d = host.domains[domid]
    while len(have) < nr_frames:
        m = host.alloc_xenheap_page()
        host.share_xen_page_with_guest(m, d)
        host.ft.write_page(m, np.zeros(512, dtype=np.uint64))
        host.ft.table(m)  # keep the entries as a real array
        have.append(m)
    return list(have)


def entries(host: "Host", domid: int) -> np.ndarray:
    """All v1 entries of a domain as uint64 words (``nr_frames * 512``)."""
    fr = host.grants.frames.get(domid, [])
    if not fr:
        return np.zeros(0, dtype=np.uint64)
    return np.concatenate([host.ft.read_page(m) for m in fr])


def _slot(host: "Host", domid: int, ref: int) -> tuple[np.ndarray, int] | None:
    fr = host.grants.frames.get(domid, [])
    if not 0 <= ref < len(fr) * G.GRANT_V1_PER_FRAME:
        return None
    return host.ft.table(fr[ref // G.GRANT_V1_PER_FRAME]), ref % G.GRANT_V1_PER_FRAME


def write_entry(host: "Host", domid: int, ref: int, flags: int, to: int, frame: int) -> bool:
    """The guest writing one of its own shared entries (a plain memory write)."""
    s = _slot(host, domid, ref)
    if s is None:
        return False
    tab, i = s
    tab[i] = _U((flags & 0xFFFF) | ((to & 0xFFFF) << 16) | ((frame & 0xFFFFFFFF) << 32))
    return True


def read_entry(host: "Host", domid: int, ref: int) -> tuple[int, int, int] | None:
    s = _slot(host, domid, ref)
    if s is None:
        return None
    w = int(s[0][s[1]])
    return w & 0xFFFF, (w >> 16) & 0xFFFF, w >> 32


def map_grant_ref(host: "Host", mapper: int, granter: int, ref: int, flags: int) -> tuple[int, int]:
    """``GNTTABOP_map_grant_ref``: (GNTST status, handle).

    In Xen's order: neither host nor device mapping requested -> ``GNTST_bad_gntref``; no
    such granter -> ``GNTST_bad_domain``; ref beyond the table -> ``GNTST_bad_gntref``;
    entry already pinned by another domain -> ``GNTST_general_error``; first pin: the entry
    must be ``GTF_permit_access`` to the mapper, and a writable map needs an entry without
    ``GTF_readonly`` (``GNTST_general_error``); the granted frame must be the granter's
    (``get_paged_frame``: ``GNTST_bad_page``); the type references must be obtainable
    (``GNTST_general_error``).  On success the entry gets ``GTF_reading`` (and
    ``GTF_writing`` for a writable map)."""
    if not flags & (G.GNTMAP_host_map | G.GNTMAP_device_map):
        return G.GNTST_bad_gntref, -1  # "Bad flags in grant map op"
    rd = host.domains.get(granter)
    if rd is None or rd.is_system:
        return G.GNTST_bad_domain, -1
    e = read_entry(host, granter, ref)
    if e is None:
        return G.GNTST_bad_gntref, -1
    eflags, edom, frame = e
    ro = bool(flags & G.GNTMAP_readonly)
    pins = [x for x in host.grants.maptrack.values() if x.granter == granter and x.ref == ref]
    if pins and any(x.mapper != mapper for x in pins):
        return G.GNTST_general_error, -1  # "Bad domain (%d != %d)"
    if not pins or (not ro and not any(x.writable for x in pins)):
        mask = G.GTF_type_mask | (0 if ro else G.GTF_readonly)
        if not pins and ((eflags & mask) != G.GTF_permit_access or edom != mapper):
            return G.GNTST_general_error, -1  # "Bad flags (%x) or dom (%d)"
        if not ro and eflags & G.GTF_readonly:
            return G.GNTST_general_error, -1  # "Attempt to write-pin a r/o grant entry"
    if pins:
        frame = pins[0].mfn  # the active entry keeps the frame of the first pin
    elif not get_page(host, frame, granter):
        return G.GNTST_bad_page, -1  # get_paged_frame
    else:
        put_page(host, frame)
    host_typed = mapper == granter or not rd.hvm
    m = Maptrack(mapper, granter, ref, frame, flags, host_typed)
    taken: list[tuple[str, int]] = []
    ok = True
    for _ in range(m.refs):
        if not get_page(host, frame, granter):
            ok = False
            break
        taken.append(("page", frame))
    for _ in range(m.type_refs):
        if not ok or get_page_type(host, frame, mm.PGT_writable_page):
            ok = False
            break
        taken.append(("type", frame))
    if not ok:
        for kind, f in reversed(taken):
            (put_page_type if kind == "type" else put_page)(host, f)
        return G.GNTST_general_error, -1  # could_not_pin
    h = host.grants.next_handle
    host.grants.next_handle += 1
    host.grants.maptrack[h] = m
    fl = eflags | G.GTF_reading | (0 if ro else G.GTF_writing)
    write_entry(host, granter, ref, fl, edom, e[2])
    return G.GNTST_okay, h


def unmap_grant_ref(host: "Host", mapper: int, handle: int) -> int:
    """``GNTTABOP_unmap_grant_ref``: drop the mapping's references; ``GTF_writing`` is
    cleared when no writable pin of the entry remains, ``GTF_reading`` when no pin remains."""
    m = host.grants.maptrack.get(handle)
    if m is None or m.mapper != mapper:
        return G.GNTST_bad_handle
    del host.grants.maptrack[handle]
    for _ in range(m.type_refs):
        put_page_type(host, m.mfn)
    for _ in range(m.refs):
        put_page(host, m.mfn)
    e = read_entry(host, m.granter, m.ref) if m.granter in host.domains else None
    if e is not None:
        still = [x for x in host.grants.maptrack.values() if x.granter == m.granter and x.ref == m.ref]
        fl = e[0]
        if not any(x.writable for x in still):
            fl &= ~G.GTF_writing
        if not still:
            fl &= ~G.GTF_reading
        write_entry(host, m.granter, m.ref, fl, e[1], e[2])
    return G.GNTST_okay


def release_domain(host: "Host", domid: int) -> None:
    """``gnttab_release_mappings``: a dying domain's mappings of others' grants go away;
    its own grant frames go back with its other Xen-heap pages."""
    for h, m in list(host.grants.maptrack.items()):
        if m.mapper == domid:
            unmap_grant_ref(host, domid, h)
    host.grants.frames.pop(domid, None)
