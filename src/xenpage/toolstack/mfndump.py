"""``xen-mfndump dump-p2m <domid>`` (``tools/misc/xen-mfndump.c``): a guest's pfn -> mfn
with each frame's page type, so a user can find what to retire."""

from __future__ import annotations

import numpy as np

from ..abi import domctl as D
from ..abi import errno as E
from ..abi import xen as X
from .hypervisor import Hypervisor
from .report import Report


def type_suffix(t: int) -> str:
    """The word xen-mfndump prints after ``(type 0x..)``."""
    k = t >> D.XEN_DOMCTL_PFINFO_LTAB_SHIFT
    if k == 0:
        return ""
    if 1 <= k <= 4:
        return f" L{k}"
    if 9 <= k <= 0xC:
        return f" pinned L{k & 7}"
    return {0xD: " broken", 0xE: " xalloc", 0xF: " invalid"}.get(k, " <invalid type>")


def dump_p2m(hv: Hypervisor, domid: int, limit: int | None = None) -> Report:
    r = Report()
    info = hv.domain_info(domid)
    if info is None:
        r.err(f"xc: error: Failed to obtain info for domain {domid}")
        r.exit_code = 1
        return r
    rc, frames, n = hv.pv_p2m_frames(domid)
    if rc:
        r.err(f"xc: error: Could not map domain {domid} memory information")
        r.err(f"xenpage: d{domid} has no guest-maintained P2M ({E.name(rc)})"
              + (" -- an HVM guest's P2M is kept by Xen" if info.hvm else ""))
        r.exit_code = 1
        return r
    m = hv.map_foreign(domid, frames, False)
    if isinstance(m, int):
        r.err(f"xc: error: Could not map domain {domid} memory information")
        r.exit_code = 1
        return r
    p2m = m.array.ravel()[:n].copy()
    m.unmap()
    types = np.full(n, D.XEN_DOMCTL_PFINFO_XTAB, dtype=np.uint32)
    ok = np.flatnonzero(p2m != np.uint64(X.INVALID_MFN))
    rc, t = hv.page_types(domid, p2m[ok].astype(np.int64))
    if rc == 0:
        types[ok] = t
    r.out(f" --- Dumping P2M for domain {domid} ---")
    r.out(f" Guest Width: 8, PT Levels: 4 P2M size: = {n}")
    rows = []
    count = n if limit is None else min(n, limit)
    for i in range(count):
        tt = int(types[i]) & D.XEN_DOMCTL_PFINFO_LTAB_MASK
        r.out(f"  pfn=0x{i:x} ==> mfn=0x{int(p2m[i]):x} (type 0x{tt >> 28:x}){type_suffix(tt)}")
        rows.append({"pfn": i, "mfn": int(p2m[i]), "type": tt >> 28, "type_name": D.pfinfo_name(tt)})
    r.out(f" --- End of P2M for domain {domid} ---")
    r.data = {"command": "dump-p2m", "domid": domid, "p2m_size": n, "entries": rows}
    return r
