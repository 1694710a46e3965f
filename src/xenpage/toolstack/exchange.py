"""Exchange offline-pending frames of a suspended PV guest in place -- the seed's algorithm
(``xc_exchange_page``, tools/libs/guest/xg_offline_page.c) done right.

For a batch of frames of one guest, under one suspend and with one scan of its page tables:

0. (``survey``) the guest's P2M and the type of every frame may be read before it is
   suspended; under the suspend only the frames that were page tables (and the targets) are
   typed again (:func:`refresh`), so a large guest is not kept suspended while all its pfns
   are typed;
1. checks: the guest exists, is PV, is not dom0, is suspended; each frame is offline-pending,
   its M2P entry names a GPFN whose P2M entry names the frame back (patch 1, checked);
2. the grant check (patch 2): a frame named by a live grant entry stays pending;
3. one vectorised scan of every L1-L4 table frame of the guest finds each entry mapping a
   target (Xen's private L4 slots excluded);
4. those entries are cleared with ``MMU_PT_UPDATE_PRESERVE_AD`` on the guest's tables,
   ``foreigndom = ((domid+1) << 16) | domid`` (patch 6); pinned targets are unpinned;
5. the content is snapshotted and ``XENMEM_exchange`` runs on the foreign domain with the
   real GPFNs (patch 5), so Xen sets ``M2P[new] = gpfn``;
6. the content goes into the new frame, the writable P2M (patch 3) is updated, the M2P is
   checked (and fixed with ``MMU_MACHPHYS_UPDATE`` if needed), every cleared entry is
   re-pointed at the new frame with its original flags, pins are restored;
7. on any failure before the exchange, every cleared entry is restored bit for bit.

Differences from upstream, on purpose: entries are cleared to 0 (non-present, frame 0) rather
than by dropping only ``_PAGE_PRESENT``, so no L1TF-unsafe entry is ever written (PRESERVE_AD
still keeps the A/D bits); restored entries keep every flag (7.A2); the GPFN passed to
XENMEM_exchange is the real one (7.A3); page-table frames (L1-L3) are exchanged too (7.A7).
L4 tables (Xen's private slots, possibly a vCPU's CR3) and the P2M's frame lists are refused
up front.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..abi import domctl as D
from ..abi import errno as E
from ..abi import grant as G
from ..abi import pte as P
from ..abi import sysctl as S
from ..abi import xen as X
from .hypervisor import Hypervisor
from . import rollforward
from .fixed import below_bits, fixed_range, in_fixed_range
from .membership import frame_filter, member_frames
from .outcomes import Kind, Outcome, Reason, not_pending

_U = np.uint64
L4_XEN_SLOTS = slice(256, 272)


@dataclass
class PteRef:
    table: int   # MFN of the table frame
    index: int   # entry index 0..511
    value: int   # the entry as it was
    level: int   # level of the table holding it

    @property
    def ptr(self) -> int:
        return (self.table << 12) | (self.index * 8)


@dataclass
class GuestView:
    """What the toolstack learns about a guest before touching it."""

    domid: int
    p2m: np.ndarray            # pfn -> mfn (int64; -1 invalid)
    p2m_frames: np.ndarray     # MFNs holding the P2M
    fl_frames: np.ndarray      # MFNs of the P2M frame list, in order
    fll: int                   # MFN of the frame-list list (named in shared_info)
    types: np.ndarray          # getpageframeinfo3 type per pfn
    stats: dict = field(default_factory=dict)
    #: pfns and levels of the page tables (found once; frames the exchange moves keep their
    #: pfn and level, so ``p2m[pfns]`` stays right)
    tables: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def table_pfns(self) -> tuple[np.ndarray, np.ndarray]:
        """pfns and levels of the guest's L1-L4 tables (pinned or validated).  XTAB, BROKEN
        and XALLOC have level bits 7, 5 and 6, and every invalid P2M entry was typed XTAB,
        so "level in 1..4" is the whole test (one unsigned compare: 0 - 1 wraps)."""
        if self.tables is None:
            idx, lv = [], []
            for s0 in range(0, self.types.size, 1 << 22):  # temporaries of 16 MiB, not n words
                lvl = (self.types[s0:s0 + (1 << 22)] >> np.uint32(28)) & np.uint32(7)
                i = np.flatnonzero((lvl - np.uint32(1)) < np.uint32(4))
                idx.append(i + s0)
                lv.append(lvl[i].astype(np.int64))
            self.tables = (np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64),
                           np.concatenate(lv) if lv else np.zeros(0, dtype=np.int64))
        return self.tables

    def table_mfns(self) -> tuple[np.ndarray, np.ndarray]:
        idx, lvl = self.table_pfns()
        return self.p2m[idx], lvl


#: P2M frames mapped at a time by :func:`load_guest` (32 MiB)
P2M_CHUNK = 8192


def load_guest(hv: Hypervisor, domid: int) -> tuple[GuestView | None, Outcome | None]:
    """Map the guest's P2M (read-only snapshot) and the type of every frame."""
    rc, frames, n = hv.pv_p2m_frames(domid)
    if rc:
        return None, Outcome(-1, Kind.REFUSED, Reason.NO_P2M, f"cannot locate d{domid}'s P2M ({E.name(rc)})",
                             domid=domid, errno=-rc)
    # mapped and copied a run of frames at a time (a 256 GiB guest's P2M is 512 MiB: mapped
    # whole, it would sit in memory twice); INVALID_MFN (2^64 - 1) read as a signed 64-bit
    # number is -1: no pass needed
    frames = np.asarray(frames, dtype=np.int64)
    p2m = np.empty(n, dtype=np.int64)
    for s0 in range(0, frames.size, P2M_CHUNK):
        m = hv.map_foreign(domid, frames[s0:s0 + P2M_CHUNK], False)
        if isinstance(m, int):
            return None, Outcome(-1, Kind.REFUSED, Reason.NO_P2M, f"cannot map d{domid}'s P2M ({E.name(m)})",
                                 domid=domid, errno=-m)
        part = m.array.reshape(-1)[:n - s0 * 512]
        p2m[s0 * 512:s0 * 512 + part.size] = part.view(np.int64)
        m.unmap()
    rc, fl, fll = hv.pv_p2m_frame_lists(domid)
    if rc:
        return None, Outcome(-1, Kind.REFUSED, Reason.NO_P2M, f"cannot read d{domid}'s P2M frame list",
                             domid=domid, errno=-rc)
    types = np.full(n, D.XEN_DOMCTL_PFINFO_XTAB, dtype=np.uint32)
    valid = p2m >= 0
    ok = slice(None) if valid.all() else np.flatnonzero(valid)  # usually every pfn is backed
    todo = n if isinstance(ok, slice) else ok.size
    for s in range(0, todo, 1 << 20):
        part = slice(s, s + (1 << 20)) if isinstance(ok, slice) else ok[s:s + (1 << 20)]
        rc, t = hv.page_types(domid, p2m[part])
        if rc:
            return None, Outcome(-1, Kind.REFUSED, Reason.NO_P2M, f"getpageframeinfo3 failed ({E.name(rc)})",
                                 domid=domid, errno=-rc)
        types[part] = t
    return GuestView(domid, p2m, frames, fl, fll, types), None


def refresh(hv: Hypervisor, survey: GuestView, mfns) -> GuestView | None:
    """The view of a suspended guest from a ``survey`` (:func:`load_guest`) taken before it
    was suspended, without typing every pfn again: the frames that were page tables are
    typed again now (those no longer tables drop out, so nothing that became data is ever
    written as a table), the P2M's frame lists and the targets' P2M entries and types are
    read now.  A table the guest made since the survey is missing from it: an entry there
    holds a reference, so XENMEM_exchange refuses the frame and it is rolled back (then
    retried with a full view).  ``None``: take a full view instead."""
    domid = survey.domid
    rc, frames, n = hv.pv_p2m_frames(domid)
    if rc or n != survey.p2m.size:
        return None
    rc, fl, fll = hv.pv_p2m_frame_lists(domid)
    if rc:
        return None
    p2m = survey.p2m.copy()
    g = hv.m2p(np.asarray(mfns, dtype=np.int64)).view(np.int64)
    g = np.unique(g[(g >= 0) & (g < n)])
    if g.size:
        rows = np.unique(g // 512)
        m = hv.map_foreign(domid, np.asarray(frames, dtype=np.int64)[rows], False)
        if isinstance(m, int):
            return None
        cur = m.array.view(np.int64)
        p2m[g] = cur[np.searchsorted(rows, g // 512), g % 512]
        m.unmap()
    idx = np.union1d(survey.table_pfns()[0], g)
    idx = idx[p2m[idx] >= 0]
    types = np.full(n, D.XEN_DOMCTL_PFINFO_XTAB, dtype=np.uint32)
    rc, t = hv.page_types(domid, p2m[idx])
    if rc:
        return None
    types[idx] = t
    lvl = (t >> np.uint32(28)) & np.uint32(7)
    tab = (lvl - np.uint32(1)) < np.uint32(4)
    return GuestView(domid, p2m, frames, fl, fll, types, stats={"refreshed": int(idx.size)},
                     tables=(idx[tab], lvl[tab].astype(np.int64)))


#: page-table frames mapped at a time by the scan (16 MiB: the temporaries stay in cache
#: and a 64 GiB guest's 33k tables never sit in memory all at once)
SCAN_CHUNK = 4096
#: ... and compared 1024 frames (4 MiB) at a time (measured on 4-16 GiB guests: 1 MiB blocks
#: took 10-15% longer, the Python steps between them adding up; 8-16 MiB no better)
SCAN_BLOCK = 1024


def scan(hv: Hypervisor, view: GuestView, targets: np.ndarray) -> tuple[int, list[PteRef]]:
    """One pass over every table frame of the guest: each present entry whose frame field
    names a target (vectorised over the stacked tables, mapped a chunk at a time and read
    in place: only the few hits are copied out before a mapping goes)."""
    tabs, lvls = view.table_mfns()
    tu = np.asarray(targets, dtype=np.uint64).ravel()
    if tabs.size == 0 or tu.size == 0:
        return 0, []
    hits_r: list[np.ndarray] = [np.zeros(0, dtype=np.int64)]
    hits_v: list[np.ndarray] = [np.zeros(0, dtype=np.uint64)]
    filt = frame_filter(tu)  # once for every block
    for s0 in range(0, tabs.size, SCAN_CHUNK):
        m = hv.map_foreign(view.domid, tabs[s0:s0 + SCAN_CHUNK], False)
        if isinstance(m, int):
            return m, []
        ents = m.array
        for b0 in range(0, ents.shape[0], SCAN_BLOCK):  # temporaries of 4 MiB
            blk = ents[b0:b0 + SCAN_BLOCK]
            flat = np.flatnonzero(member_frames(blk, tu, 12, P.MFN_MASK_X86, filt))
            if flat.size:
                hits_v.append(blk.reshape(-1)[flat])
                hits_r.append(flat + (s0 + b0) * 512)
        m.unmap()
    flat, vals = np.concatenate(hits_r), np.concatenate(hits_v)
    rows, cols = np.divmod(flat, 512)
    # present entries only; Xen's private L4 slots are not the guest's
    keep = ((vals & _U(P._PAGE_PRESENT)) != 0) & \
        ~((lvls[rows] == 4) & (cols >= L4_XEN_SLOTS.start) & (cols < L4_XEN_SLOTS.stop))
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    view.stats["scanned_bytes"] = int(tabs.size) * 4096
    view.stats["scanned_tables"] = int(tabs.size)
    return 0, [PteRef(t, c, v, lv) for t, c, v, lv in
               zip(tabs[rows].tolist(), cols.tolist(), vals.tolist(), lvls[rows].tolist())]


def _no_hook(step: str, **info) -> None:
    """No listener between the steps (no journal, no fault injection)."""


def _reqs(refs: list[PteRef], values) -> np.ndarray:
    """``mmu_update`` requests writing ``values`` into the entries ``refs`` (PRESERVE_AD)."""
    a = np.zeros((len(refs), 2), dtype=np.uint64)
    if refs:
        a[:, 0] = np.fromiter((r.table for r in refs), dtype=np.uint64, count=len(refs)) << _U(12)
        a[:, 0] |= np.fromiter((r.index for r in refs), dtype=np.uint64, count=len(refs)) * _U(8)
        a[:, 0] |= _U(X.MMU_PT_UPDATE_PRESERVE_AD)
        a[:, 1] = values
    return a


def _restore(hv: Hypervisor, domid: int, refs: list[PteRef]) -> int:
    """Put entries back exactly as they were (upper levels last, so tables revalidate with
    their own entries already in place)."""
    try:  # read-compare-write, retried: idempotent
        rollforward.roll_back(hv, domid, [(r.table, r.index, r.value, r.level) for r in refs], [])
    except rollforward.Incomplete as e:
        return e.errno or -E.EFAULT
    return 0


def _status(hv: Hypervisor, mfn: int, tries: int = 3) -> int:
    """The frame's query status word, -1 if it cannot be read (a query changes nothing, so a
    failed one is retried: after an exchange it decides whether the outcome says offlined)."""
    for _ in range(tries):
        rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
        if rc == 0 and st is not None:
            return int(st[0])
        if rc == -E.EINVAL:  # not a valid RAM frame: asking again changes nothing
            break
    return -1


def _statuses(hv: Hypervisor, mfns) -> dict[int, int]:
    """Status words of many frames: nearby frames in one range query (a query changes
    nothing; a range that fails -- a hole in it -- is asked frame by frame).  A range starts
    at a frame and takes the next ones while each is within 64 frames of the one before and
    within 1000 of the range's first; the ranges are found with numpy, one step per range."""
    vals = sorted({int(m) for m in mfns})
    out = {m: -1 for m in vals if not 0 <= m <= S.MFN_FIELD_MAX}  # not even a sysctl field
    ms = np.array([m for m in vals if m not in out], dtype=np.int64)
    st = np.full(ms.size, -1, dtype=np.int64)
    runs = np.split(np.arange(ms.size), np.flatnonzero(np.diff(ms) > 64) + 1) if ms.size else []
    for run in runs:
        a, b = int(run[0]), int(run[-1]) + 1
        while a < b:
            e = a + int(np.searchsorted(ms[a:b], ms[a] + 1000))  # first beyond the span
            s0, e0 = int(ms[a]), int(ms[e - 1])
            rc, got = hv.page_offline_op(S.sysctl_query_page_offline, s0, e0) if e - a > 1 else (-1, None)
            if rc == 0 and got is not None and len(got) == e0 - s0 + 1:
                st[a:e] = np.asarray(got, dtype=np.int64)[ms[a:e] - s0]
            else:
                st[a:e] = [_status(hv, m) for m in ms[a:e].tolist()]
            a = e
    out.update(zip(ms.tolist(), st.tolist()))
    return out


def exchange_pages(hv: Hypervisor, domid: int, mfns: list[int], view: GuestView | None = None,
                   hook=None, survey: GuestView | None = None,
                   prefound: list[PteRef] | None = None) -> list[Outcome]:
    """Exchange each of ``mfns`` (offline-pending frames of suspended PV guest ``domid``).
    ``hook(step, **info)`` is called between steps (fault injection, journaling).
    ``view``: the guest as loaded while suspended; ``survey``: as loaded before it was
    suspended (:func:`refresh` brings it up to date at a fraction of a full load -- the
    suspended time of a large guest is then not spent typing every pfn).  ``prefound``:
    every entry mapping any of ``mfns`` as of now, found by the pre-scan (:mod:`.prescan`);
    it stands in for the first group's scan (a frame still referenced afterwards is tried
    once more with a full view)."""
    hook = hook or _no_hook
    info = hv.domain_info(domid)
    mfns = [int(m) for m in mfns]

    def all_(kind, reason, detail):
        return [Outcome(m, kind, reason, detail, domid=domid) for m in mfns]

    if info is None:
        return all_(Kind.REFUSED, Reason.NO_DOMAIN, f"no domain {domid}")
    if domid == 0:
        return all_(Kind.REFUSED, Reason.DOM0, "dom0's pages are never exchanged (dom0 is not suspended)")
    if domid >= X.DOMID_FIRST_RESERVED:
        return all_(Kind.REFUSED, Reason.SYSTEM_DOMAIN, f"d{domid} is a system domain")
    if info.hvm:
        return all_(Kind.REFUSED, Reason.HVM, "HVM guest: its frames are retired by migration")
    if not (info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend):
        return all_(Kind.REFUSED, Reason.NOT_SUSPENDED, f"d{domid} is not suspended")
    surveyed = prefound is not None
    if view is None and survey is not None and survey.domid == domid:
        view = refresh(hv, survey, mfns)
        surveyed = view is not None
    if view is None:
        view, err = load_guest(hv, domid)
        if err is not None:
            return [Outcome(m, err.kind, err.reason, err.detail, domid=domid, errno=err.errno) for m in mfns]
    hook("loaded", view=view)
    out: dict[int, Outcome] = {}
    m2p = hv.m2p(np.array(mfns, dtype=np.int64))
    # Without the grant table no frame can be shown ungranted: a failed read must not
    # read as "no grants" (an exchanged granted frame leaves the grantee a dangling grant).
    grc, grants = hv.grant_entries(domid)
    if grc:
        grants = np.zeros(0, dtype=np.uint64)
    g_live = (grants & _U(G.GTF_type_mask)) != 0
    g_frame = (grants >> _U(32)).astype(np.int64)
    special = set(view.fl_frames.tolist()) | {view.fll}
    granted: dict[int, list[int]] = {}
    for ref, fr in zip(np.flatnonzero(g_live).tolist(), g_frame[g_live].tolist()):
        granted.setdefault(fr, []).append(ref)
    sts = _statuses(hv, mfns)
    cand: list[tuple[int, int, int]] = []  # (mfn, gpfn, level)
    for mfn, g in zip(mfns, m2p.tolist()):
        st = sts[mfn]
        refusal = not_pending(mfn, st, domid)
        if refusal is not None:
            out[mfn] = refusal
            continue
        if g == X.INVALID_M2P_ENTRY or g >= view.p2m.size or view.p2m[g] != mfn:
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.M2P_MISMATCH,
                               f"M2P names gpfn {g:#x}, whose P2M entry does not name this frame "
                               f"(not a frame of d{domid})", domid=domid, status=st)
            continue
        if grc:
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.GRANTED,
                               f"cannot read d{domid}'s grant table ({E.name(grc)}): a grant of the "
                               "frame cannot be ruled out", domid=domid, gpfn=g, status=st, errno=-grc)
            continue
        refs = granted.get(mfn)
        if refs:
            w = int(grants[refs[0]])
            out[mfn] = Outcome(mfn, Kind.PENDING, Reason.GRANTED,
                               f"granted to d{(w >> 16) & 0xFFFF} (grant ref {refs[0]})",
                               domid=domid, gpfn=g, status=st, extra={"grant_refs": list(refs)})
            continue
        t = int(view.types[g])
        lvl = (t & D.XEN_DOMCTL_PFINFO_LTABTYPE_MASK) >> 28
        if t in (D.XEN_DOMCTL_PFINFO_XTAB, D.XEN_DOMCTL_PFINFO_BROKEN, D.XEN_DOMCTL_PFINFO_XALLOC):
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.M2P_MISMATCH, f"page type {D.pfinfo_name(t)}",
                               domid=domid, gpfn=g, status=st)
            continue
        if lvl == 4:
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.CR3_ROOT,
                               "an L4 table (page-table root: Xen's private slots, possibly a vCPU's CR3)",
                               domid=domid, gpfn=g, status=st)
            continue
        if mfn in special:
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.P2M_FRAME,
                               "a frame of the P2M's frame list (named in shared_info)", domid=domid,
                               gpfn=g, status=st)
            continue
        cand.append((mfn, g, lvl))
    # Data frames as one group; page-table frames one by one (their scan depends on the others).
    groups = [[c for c in cand if c[2] == 0]] + [[c] for c in sorted((c for c in cand if c[2]), key=lambda c: c[2])]
    repointed: dict[int, list[PteRef]] = {}
    for grp in groups:
        if not grp:
            continue
        for o in _exchange_group(hv, view, grp, hook, prefound, repointed=repointed):
            out[o.mfn] = o
        prefound = None  # later groups see the tables this one moved: scanned again
        if any(c[2] for c in grp):
            # types changed (a table frame moved, P2M updated in the view): type the tables
            # again for the next group
            nv = refresh(hv, view, [c[0] for g2 in groups for c in g2])
            if nv is None:
                nv, err = load_guest(hv, domid)
            if nv is not None:
                view = nv
    moved = [o for o in out.values() if o.kind == Kind.EXCHANGED and o.new_mfn is not None]
    if moved:
        for o in move_off_fixed(hv, view, moved, hook, repointed):
            out[o.mfn] = o
    if surveyed:
        # a frame still referenced may be mapped from a table made after the survey: once
        # more with a full view (a rolled-back frame is exactly as it was)
        again = [m for m in mfns if out[m].kind == Kind.ROLLED_BACK and out[m].reason == Reason.REFERENCED]
        if again:
            for o in exchange_pages(hv, domid, list(dict.fromkeys(again)), hook=hook):
                out[o.mfn] = o
    if any(o.kind in (Kind.FAILED, Kind.ROLLED_BACK) for o in out.values()) \
            and hv.domain_info(domid) is None:
        out = {m: _domain_gone(hv, o, domid) for m, o in out.items()}
    return [out[m] for m in mfns]


def move_off_fixed(hv: Hypervisor, view: GuestView, done: list[Outcome], hook,
                   repointed: dict[int, list[PteRef]] | None = None) -> list[Outcome]:
    """Exchange again, while the guest is still suspended, every page whose new frame lies in
    Xen's fixed range: Xen's freed init region (and unused BSS) go back to the heap at the
    heads of the lists, so XENMEM_exchange readily hands them out, yet ``offline_page``
    refuses any frame there for ever (``is_xen_fixed_mfn``: EPERM) -- a failing frame there
    could never be retired.  The second exchange asks for frames below that zone (address
    bits) and goes through the same steps as the first (entries cleared and re-pointed with
    their flags, journaled); if it cannot be done the page stays where the first exchange put
    it, whole, and the outcome says so.  ``repointed``: {new frame: the entries the first
    exchange cleared and re-pointed at it, as they were before} -- every entry mapping it now
    (the guest is still suspended and the frame came fresh from Xen's heap), named here in the
    tables as they are now -- so the data frames need no scan of the tables (a frame
    XENMEM_exchange still finds referenced is rolled back and tried once more with a scan)."""
    rng = fixed_range(hv)
    bad = [o for o in done if in_fixed_range(int(o.new_mfn), rng)]
    if not bad:
        return []
    bits = below_bits(rng)
    lv = {o.mfn: int(o.extra.get("level", 0)) for o in bad}
    out: list[Outcome] = []
    res: dict[int, Outcome] = {}
    if bits:
        grp = [(int(o.new_mfn), int(o.gpfn), lv[o.mfn]) for o in bad]
        data = [c for c in grp if c[2] == 0]
        groups = ([data] if data else []) + [[c] for c in grp if c[2]]
        # a table the first exchange moved is named by its new frame
        newof = {o.mfn: int(o.new_mfn) for o in done if o.kind == Kind.EXCHANGED and o.new_mfn is not None}
        keep = P.PTE_FLAGS_MASK
        for g in groups:
            # the data frames' entries are known; a table group moves a table that later
            # groups' entries may sit in: those scan (as exchange_pages' later groups do)
            pre = None if g is not data or repointed is None else \
                [PteRef(newof.get(r.table, r.table), r.index, (r.value & keep) | (c[0] << 12), r.level)
                 for c in g for r in repointed.get(c[0], ())]
            for r in _exchange_group(hv, view, g, hook, pre, address_bits=bits):
                res[r.mfn] = r
            again = [c for c in g if pre is not None and res[c[0]].kind == Kind.ROLLED_BACK
                     and res[c[0]].reason == Reason.REFERENCED]
            if again:
                for r in _exchange_group(hv, view, again, hook, address_bits=bits):
                    res[r.mfn] = r
    note = (f"lies in Xen's fixed range {rng[0]:#x}-{rng[1] - 1:#x}: it can never be offlined "
            "on this Xen; migrate or exchange to move the data off it")
    for o in bad:
        f = int(o.new_mfn)
        r = res.get(f)
        extra = dict(o.extra)
        if r is not None and r.kind == Kind.EXCHANGED:
            extra["moved_off_fixed"] = f
            out.append(Outcome(o.mfn, Kind.EXCHANGED, Reason.NONE,
                               f"exchanged: gpfn {o.gpfn:#x} now at mfn {int(r.new_mfn):#x} (the first "
                               f"new frame, {f:#x}, lay in Xen's fixed range: exchanged again)",
                               domid=o.domid, gpfn=o.gpfn, new_mfn=r.new_mfn, ptes=o.ptes, status=o.status,
                               extra=extra))
        elif r is not None and r.kind == Kind.FAILED:
            # the page is on its way from f: ``xenpage recover`` completes it from the journal
            out.append(Outcome(o.mfn, Kind.FAILED, r.reason,
                               f"exchanged into {f:#x} (in Xen's fixed range), then moving it off "
                               f"failed: {r.detail}", domid=o.domid, gpfn=o.gpfn, new_mfn=r.new_mfn or f,
                               status=o.status, errno=r.errno))
        else:
            extra["fixed"] = True
            why = f" (exchanging it again failed: {r.detail})" if r is not None else ""
            out.append(Outcome(o.mfn, o.kind, o.reason, f"{o.detail}; the new frame {note}{why}",
                               domid=o.domid, gpfn=o.gpfn, new_mfn=o.new_mfn, ptes=o.ptes, status=o.status,
                               extra=extra))
    return out


def _domain_gone(hv: Hypervisor, o: Outcome, domid: int) -> Outcome:
    """The guest was destroyed while we worked on it: its memory went with it (nothing left
    to complete or restore) and its offline-pending frames were offlined as they were freed."""
    if o.kind not in (Kind.FAILED, Kind.ROLLED_BACK):
        return o
    st = _status(hv, o.mfn)
    off = st >= 0 and bool(st & S.PG_OFFLINE_STATUS_OFFLINED)
    return Outcome(o.mfn, Kind.OFFLINED if off else Kind.PENDING, Reason.NO_DOMAIN,
                   f"d{domid} was destroyed meanwhile: its memory was released"
                   + (" and this frame offlined" if off else ""), domid=domid, gpfn=o.gpfn,
                   status=st if st >= 0 else None)


def _exchange_group(hv: Hypervisor, view: GuestView, grp: list[tuple[int, int, int]], hook,
                    prefound: list[PteRef] | None = None, address_bits: int = 0,
                    repointed: dict[int, list[PteRef]] | None = None) -> list[Outcome]:
    """Exchange one group under the suspend; ``repointed``, if given, receives {new frame:
    the entries re-pointed at it, as they were before the clear} (:func:`move_off_fixed`
    needs no scan for those)."""
    domid = view.domid
    fd = X.foreigndom(domid, domid)
    targets = np.array([c[0] for c in grp], dtype=np.int64)
    t0 = time.perf_counter()
    if prefound is not None:
        mine = set(targets.tolist())
        rc, refs = 0, [r for r in prefound if (r.value >> 12) & P.MFN_MASK_X86 in mine]
    else:
        rc, refs = scan(hv, view, targets)
    scan_s = time.perf_counter() - t0
    if rc:
        return [Outcome(m, Kind.REFUSED, Reason.CLEAR_FAILED, f"cannot map page tables ({E.name(rc)})",
                        domid=domid, gpfn=g) for m, g, _ in grp]
    by_target: dict[int, list[PteRef]] = {int(m): [] for m in targets}
    for r in refs:
        by_target[(r.value >> 12) & P.MFN_MASK_X86].append(r)
    hook("scanned", refs=refs)
    # Clear (upper levels first, so a table frame is devalidated before its mappings go).
    clear = sorted(refs, key=lambda r: -r.level)
    hook("clearing", refs=clear, grp=grp)  # before: the write-ahead journal records them
    rc, done = (0, 0)
    if clear:
        rc, done = hv.mmu_update(_reqs(clear, 0), fd)
    if rc:
        rrc = _restore(hv, domid, clear[:done])
        kind = Kind.ROLLED_BACK if not rrc else Kind.FAILED
        return [Outcome(m, kind, Reason.CLEAR_FAILED if not rrc else Reason.RESTORE_FAILED,
                        f"clearing the guest's entries failed ({E.name(rc)}) after {done} of {len(clear)}",
                        domid=domid, gpfn=g, errno=-rc) for m, g, _ in grp]
    hook("cleared", refs=clear)
    pinned = {m for m, g, lvl in grp if lvl and int(view.types[g]) & D.XEN_DOMCTL_PFINFO_LPINTAB}
    unpinned = []
    hook("unpinning", mfns=sorted(pinned), grp=grp)
    for m in sorted(pinned):
        rc, _ = hv.mmuext_op([(X.MMUEXT_UNPIN_TABLE, m)], domid)
        if rc == 0:
            unpinned.append(m)
    hook("unpinned", mfns=unpinned)
    # Snapshot the contents as late as possible, just before the exchange.
    snap = hv.map_foreign(domid, targets, False)
    if isinstance(snap, int):
        urc = _undo(hv, domid, clear, unpinned, grp)
        return [Outcome(m, Kind.FAILED if urc else Kind.ROLLED_BACK,
                        Reason.RESTORE_FAILED if urc else Reason.EXCHANGE_FAILED,
                        f"cannot map the frame ({E.name(snap)})",
                        domid=domid, gpfn=g, errno=-snap) for m, g, _ in grp]
    snap_rows = snap.array.copy()  # one copy, rows in the order of ``targets``
    snap.unmap()
    # {frame: its row} for a listener (the journal); the copy below takes the array itself
    content = dict(zip(targets.tolist(), snap_rows)) if hook is not _no_hook else {}
    if hook is not _no_hook:  # (copies of the P2M's frame lists: only for a listener)
        hook("snapshot", content=content, grp=grp, p2m_frames=view.p2m_frames.copy(),
             fl_frames=view.fl_frames.copy())  # before XENMEM_exchange
    results: dict[int, Outcome] = {}
    pending = list(grp)
    exchanged: list[tuple[int, int, int, int]] = []  # (old, gpfn, level, new)
    while pending:
        ins, outs = [c[0] for c in pending], [c[1] for c in pending]
        rc, nr, outl = (hv.memory_exchange(domid, ins, outs, address_bits) if address_bits
                        else hv.memory_exchange(domid, ins, outs))
        for i in range(nr):
            m, g, lvl = pending[i]
            exchanged.append((m, g, lvl, int(outl[i])))
        if rc == 0 and nr == len(pending):
            break
        if nr < len(pending):
            m, g, lvl = pending[nr]
            mine = by_target[m]
            rrc = _restore(hv, domid, mine)
            if m in unpinned:
                rrc = rrc or _undo(hv, domid, [], [m], [(m, g, lvl)])
            reason = Reason.REFERENCED if rc == -E.EINVAL else Reason.EXCHANGE_FAILED
            why = ("still referenced by another domain or by Xen (steal_page refused: mapped by "
                   "another domain, a foreign mapping, or a vCPU)" if rc == -E.EINVAL else
                   f"XENMEM_exchange failed ({E.name(rc)})")
            results[m] = Outcome(m, Kind.ROLLED_BACK if not rrc else Kind.FAILED,
                                 reason if not rrc else Reason.RESTORE_FAILED, why, domid=domid, gpfn=g,
                                 errno=-rc, ptes=len(mine))
            pending = pending[nr + 1:]
        else:
            pending = []
    hook("exchanged", exchanged=exchanged)
    if not exchanged:
        return [results[m] for m, g, _ in grp]
    # From here on there is no way back (the old frames are gone): complete, retrying each
    # idempotent step; if one keeps failing the journal keeps what ``xenpage recover`` needs.
    refs_by = {old: [(r.table, r.index, r.value, r.level) for r in by_target[old]]
               for old, g, lvl, new in exchanged}
    rrc = 0
    fix: list[tuple[int, int]] = []
    try:
        row_of = {m: i for i, m in enumerate(targets.tolist())}
        rows = snap_rows[[row_of[old] for old, g, lvl, new in exchanged]]
        frames, fixed = rollforward.complete(hv, domid, exchanged, content, refs_by, unpinned,
                                             view.p2m_frames, view.fl_frames, hook, fresh=True,
                                             rows=rows)
        if frames is not view.p2m_frames:
            view.p2m_frames[:] = frames
        ex = np.array(exchanged, dtype=np.int64).reshape(-1, 4)
        view.p2m[ex[:, 1]] = ex[:, 3]
        fix = [(n, 0) for n in fixed]
        if repointed is not None:  # as cleared (move_off_fixed names them as they are now)
            for old, g, lvl, new in exchanged:
                repointed[new] = by_target[old]
    except rollforward.Incomplete as e:
        rrc = e.errno or -E.EFAULT
        failed_step = e.step
    hook("repointed", complete=not rrc)
    total_s = time.perf_counter() - t0
    sts = _statuses(hv, [old for old, g, lvl, new in exchanged])
    fixed_new = {n for n, _ in fix}
    for old, g, lvl, new in exchanged:
        st = sts[old]
        if rrc:
            results[old] = Outcome(old, Kind.FAILED, Reason.RESTORE_FAILED,
                                   f"exchanged into {new:#x} but completing it failed at the {failed_step} "
                                   f"step ({E.name(rrc)}): run 'xenpage recover'", domid=domid, gpfn=g,
                                   new_mfn=new, status=st)
        else:
            results[old] = Outcome(old, Kind.EXCHANGED, Reason.NONE,
                                   f"exchanged: gpfn {g:#x} now at mfn {new:#x}", domid=domid, gpfn=g,
                                   new_mfn=new, ptes=len(by_target[old]), status=st,
                                   extra={"scan_s": scan_s, "toolstack_s": total_s,
                                          "level": lvl, "m2p_fixed": new in fixed_new,
                                          "offlined": st >= 0 and bool(st & S.PG_OFFLINE_STATUS_OFFLINED)})
    return [results[m] for m, g, _ in grp]


def _undo(hv: Hypervisor, domid: int, cleared: list[PteRef], unpinned: list[int], grp) -> int:
    lv = {m: lvl for m, g, lvl in grp}
    try:
        rollforward.roll_back(hv, domid, [(r.table, r.index, r.value, r.level) for r in cleared],
                              [(m, lv[m]) for m in unpinned])
    except rollforward.Incomplete as e:
        return e.errno or -E.EFAULT
    return 0
