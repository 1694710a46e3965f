"""``xenpage owner MFN...``: who owns a machine frame, asked without changing anything.

The offline sysctl names a frame's owner only in the answer to *offlining* it
(``offline_page``: ``PG_OFFLINE_OWNED | owner << 16``), so that is never used here.  What a
dom0 process can ask of stock Xen 4.17 instead, all read-only:

* ``query_page_offline`` (``XEN_SYSCTL_page_offline_op``, ``sysctl_query_page_offline``):
  whether the frame is RAM, online, offline-pending, offlined, broken;
* the machine-to-phys table (``xc_map_m2p``): the pfn/gfn the frame was last given;
* ``XEN_DOMCTL_getpageframeinfo3`` of each domain (``xc_get_pfn_type_batch``): for a PV
  domain, by MFN, the frame's type when the domain owns it with a reference (``XTAB``
  otherwise); for a translated (HVM/PVH) domain it is asked by gfn, so the candidate gfn from
  the M2P is confirmed through the backend's ``hvm_p2m`` (the frame behind the gfn).

Xen keeps no reverse map a dom0 process can read: a free frame, a Xen-heap frame and a frame
of a domain the list does not show all read as "no domain".  The frame's raw
``count_info``/``type_info`` are not shown to dom0 by any 4.17 hypercall; the page type and
pin bit of ``getpageframeinfo3`` are what is known.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..abi import domctl as D
from ..abi import sysctl as S
from ..abi import xen as X
from .guest_type import domain_type
from .hypervisor import Hypervisor


@dataclass
class FrameOwner:
    mfn: int
    #: ``query_page_offline``: 0 or a negative errno (not RAM, no such frame)
    rc: int
    status: int | None
    #: online | offline-pending | offlined | broken+... | not-ram
    state: str
    #: the M2P entry (None: invalid)
    pfn: int | None
    domid: int | None = None
    name: str | None = None
    type: str | None = None
    #: getpageframeinfo3's type of the frame in its owner (NOTAB, L1TAB..L4TAB, BROKEN, ...)
    page_type: str | None = None
    pinned: bool = False

    def to_json(self) -> dict:
        d = asdict(self)
        # the query's word, decoded as every command decodes a status word
        d["status"] = None if self.status is None else \
            S.decode(int(self.status), S.sysctl_query_page_offline)
        d["mfn_hex"] = f"{self.mfn:x}"
        d["pfn_hex"] = f"{self.pfn:x}" if self.pfn is not None else None
        return d

    def line(self) -> str:
        where = (f"d{self.domid} ({self.name}, {self.type.upper()}) "
                 f"{'gfn' if self.type != 'pv' else 'pfn'} {self.pfn:#x}" if self.domid is not None
                 and self.pfn is not None else
                 f"d{self.domid} ({self.name}, {self.type.upper()})" if self.domid is not None
                 else "no domain (free, Xen's own, or not a listed domain's)")
        if self.rc < 0:
            return f"mfn {self.mfn:x}: not queryable (error {-self.rc}): no such frame or not RAM"
        pt = f", type {self.page_type}{' pinned' if self.pinned else ''}" if self.page_type else ""
        m2p = "" if self.domid is not None or self.pfn is None else f", M2P says pfn {self.pfn:#x}"
        return f"mfn {self.mfn:x}: {where}{pt}{m2p}, {self.state}"


def _state(rc: int, st: int) -> str:
    if rc < 0:
        return "not-ram"
    words = []
    if st & S.PG_OFFLINE_STATUS_BROKEN:
        words.append("broken")
    if st & S.PG_OFFLINE_STATUS_OFFLINE_PENDING:
        words.append("offline-pending")
    elif st & S.PG_OFFLINE_STATUS_OFFLINED:
        words.append("offlined")
    else:
        words.append("online")
    return "+".join(words)


def _ptype(t: int) -> tuple[str, bool]:
    """getpageframeinfo3's word as (type name, pinned)."""
    full = t & D.XEN_DOMCTL_PFINFO_LTAB_MASK
    if full in (D.XEN_DOMCTL_PFINFO_XTAB, D.XEN_DOMCTL_PFINFO_BROKEN, D.XEN_DOMCTL_PFINFO_XALLOC):
        return D.PFINFO_NAMES[full], False
    return D.pfinfo_name(t & D.XEN_DOMCTL_PFINFO_LTABTYPE_MASK), bool(t & D.XEN_DOMCTL_PFINFO_LPINTAB)


def frame_owners(hv: Hypervisor, mfns) -> list[FrameOwner]:
    """One :class:`FrameOwner` per MFN, in order (read-only calls only)."""
    mfns = np.asarray(mfns, dtype=np.int64).ravel()
    rcs, sts = hv.page_offline_each(S.sysctl_query_page_offline, mfns)
    m2p = hv.m2p(mfns)
    invalid = m2p == np.uint64(X.INVALID_M2P_ENTRY)
    out = [FrameOwner(int(m), int(rc), int(st) if rc == 0 else None, _state(int(rc), int(st)),
                      None if bad else int(p))
           for m, rc, st, p, bad in zip(mfns.tolist(), rcs.tolist(), sts.tolist(), m2p.tolist(),
                                        invalid.tolist())]
    todo = np.array([o.rc == 0 for o in out], dtype=bool)
    for d in hv.domain_list():
        if not todo.any():
            break
        kind = domain_type(hv, d)
        if not d.hvm:
            rc, types = hv.page_types(d.domid, mfns)
            if rc < 0:
                continue
            for i in np.flatnonzero(todo).tolist():
                t = int(types[i])
                if t & D.XEN_DOMCTL_PFINFO_LTAB_MASK == D.XEN_DOMCTL_PFINFO_XTAB:
                    continue
                _own(out[i], d, kind, t)
                todo[i] = False
            continue
        # translated: asked by gfn (the M2P's), confirmed by the frame behind that gfn
        for i in np.flatnonzero(todo & ~invalid).tolist():
            gfn = out[i].pfn
            rc, types = hv.page_types(d.domid, [gfn])
            if rc < 0 or int(types[0]) & D.XEN_DOMCTL_PFINFO_LTAB_MASK == D.XEN_DOMCTL_PFINFO_XTAB:
                continue
            rc, back, _, _ = hv.hvm_p2m(d.domid, [gfn])
            if rc == 0 and int(back[0]) == out[i].mfn:
                _own(out[i], d, kind, int(types[0]))
                todo[i] = False
    return out


def _own(o: FrameOwner, d, kind: str, t: int) -> None:
    o.domid, o.name, o.type = d.domid, d.name, kind
    o.page_type, o.pinned = _ptype(t)
