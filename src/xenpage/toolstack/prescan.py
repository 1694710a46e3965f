"""Find the page-table entries that map the frames to retire while the PV guest still runs:
the pre-copy idea applied to the scan, so that the time a guest stays suspended does not
grow with its size.

1. :func:`start`, the guest running: log-dirty on (``XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY``,
   as PV live migration turns it on), then the survey (its P2M and the type of every pfn,
   :func:`.exchange.load_guest`) and one scan of every page-table frame for the targets.
2. The guest is suspended (:mod:`.offline`).
3. :func:`finish`, suspended: the dirty bitmap is read and cleaned in Xen's packed form and
   log-dirty turned off.  The bitmap is indexed by *pfn* (``paging_mark_dirty`` looks the frame
   up in the M2P, even for a PV guest).  Xen marks a table's frame whenever it writes an entry
   for the guest (``mmu_update``, the writable-page-table emulation: both through
   ``sh_validate_guest_entry``), validates or devalidates it (``validate_page`` /
   ``devalidate_page``: so tables made since are dirty too), pins or unpins it, and every
   frame the guest writes.  The dirty pfns, the pfns of P2M rows that changed, and the targets'
   pfns are typed again; the tables among them are scanned again; the running scan's hits in
   every other table stand -- a PV guest cannot write its tables but through Xen, so a table
   not marked holds exactly what the scan read.
4. :func:`.exchange.exchange_pages` with that view and those entries: clear, exchange and
   re-point as before.

The full path is taken instead (the survey refreshed under the suspend, every table scanned)
when log-dirty cannot be turned on (already on: a live migration runs), reading the bitmap
fails, the P2M changed size, or more than :data:`FALLBACK_FRACTION` of the tables were
dirtied.  Log-dirty is always turned off again: right after the bitmap is read, and by
:func:`stop` on every other way out (``mem_offline`` calls it in a ``finally``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from ..abi import domctl as D
from ..abi import errno as E
from ..abi import hvm as H
from .exchange import GuestView, PteRef, exchange_pages, load_guest, scan
from .hypervisor import Hypervisor
from .outcomes import Outcome

#: off (``XENPAGE_PRESCAN=0``): the survey alone is taken while the guest runs, every table
#: scanned under the suspend (the path before the pre-scan; the benchmarks measure both)
ENABLED = os.environ.get("XENPAGE_PRESCAN", "1").strip().lower() not in ("0", "no", "off", "false")
#: rescan at most this share of the guest's tables; past it the full scan is as cheap
FALLBACK_FRACTION = 0.25
#: ... but never fall back for fewer dirty tables than this
FALLBACK_MIN = 1024


@dataclass
class PreScan:
    """What the running guest showed: its survey and the entries found in it."""

    hv: Hypervisor
    domid: int
    targets: np.ndarray
    survey: GuestView | None = None
    refs: list[PteRef] = field(default_factory=list)
    ref_pfns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: pfns of the P2M frames (sorted) and where each sits in the frame list; pfns of the
    #: frame-list frames -- read while running, so that under the suspend a P2M row is read
    #: again only when the bitmap names its frame
    p2m_pfns: tuple[np.ndarray, np.ndarray] | None = None
    fl_pfns: np.ndarray | None = None
    enabled: bool = False
    stats: dict = field(default_factory=dict)

    def fallback(self, why: str) -> None:
        self.stats.setdefault("fallback", why)


class _View(GuestView):
    """The pre-scan's view of the suspended guest: its list of tables is merged only when
    asked for (a batch of data frames never needs it)."""

    merge = None

    def table_pfns(self) -> tuple[np.ndarray, np.ndarray]:
        if self.tables is None and self.merge is not None:
            self.tables = self.merge()
        return super().table_pfns()


def start(hv: Hypervisor, domid: int, mfns) -> PreScan:
    """Log-dirty on, survey, scan -- while the guest runs.  Without log-dirty the survey alone
    is taken (the full path then refreshes it under the suspend)."""
    t0 = time.perf_counter()
    pre = PreScan(hv, domid, np.unique(np.asarray(mfns, dtype=np.int64)))
    if not ENABLED:
        rc = 0
        pre.fallback("pre-scan switched off")
    else:
        rc = hv.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)[0]
    if rc or not ENABLED:
        pre.fallback(f"log-dirty could not be enabled ({E.name(rc)})")
        pre.survey, _ = load_guest(hv, domid)
        pre.stats["prescan_s"] = time.perf_counter() - t0
        return pre
    pre.enabled = True
    try:
        pre.survey, err = load_guest(hv, domid)
        if err is not None:
            pre.fallback(f"no survey: {err.detail}")
            stop(pre)
            return pre
        ts = time.perf_counter()
        rc, refs = scan(hv, pre.survey, pre.targets)
        pre.stats["running_scan_s"] = time.perf_counter() - ts
        if rc:
            pre.fallback(f"running scan failed ({E.name(rc)})")
            stop(pre)
            return pre
    except BaseException:
        stop(pre)
        raise
    pre.refs = refs
    fp = pre.hv.m2p(pre.survey.p2m_frames).view(np.int64)
    order = np.argsort(fp, kind="stable")
    pre.p2m_pfns = (fp[order], order)
    pre.fl_pfns = pre.hv.m2p(np.append(pre.survey.fl_frames, pre.survey.fll)).view(np.int64)
    if refs:  # the pfn of each table with a hit (the survey's tables are few; hits fewer)
        tp, _ = pre.survey.table_pfns()
        tm = pre.survey.p2m[tp]
        order = np.argsort(tm, kind="stable")
        mf = np.array([r.table for r in refs], dtype=np.int64)
        pre.ref_pfns = tp[order[np.searchsorted(tm[order], mf)]]
    pre.stats["tables"] = int(pre.survey.table_pfns()[0].size)
    pre.stats["running_hits"] = len(refs)
    pre.stats["prescan_s"] = time.perf_counter() - t0
    return pre


def stop(pre: PreScan) -> int:
    """Log-dirty off, if this pre-scan turned it on (idempotent)."""
    if not pre.enabled:
        return 0
    rc = 0
    for _ in range(3):  # a guest must not be left in shadow mode because one call failed
        rc = pre.hv.logdirty_control(pre.domid, H.XEN_DOMCTL_SHADOW_OP_OFF)[0]
        if rc == 0 or rc == -E.ESRCH:
            break
    pre.enabled = False
    if rc and rc != -E.ESRCH:
        pre.stats["logdirty_off_rc"] = rc
    return rc


#: words of the dirty bitmap tested as one block (4 KiB: 32,768 pfns) before any is unpacked
BITMAP_BLOCK_WORDS = 512


def dirty_pfns(bits: np.ndarray, n: int) -> np.ndarray:
    """The pfns set in a packed log-dirty bitmap (bit ``p & 7`` of byte ``p >> 3``), below
    ``n``.  A bitmap after a short pre-scan is almost all zeros: one pass finds the 4 KiB
    blocks with a bit set (the largest word of each block), and only their non-zero words
    are unpacked -- an 8 MiB bitmap (a 256 GiB guest) costs one read, not a search per word."""
    b = np.asarray(bits, dtype=np.uint8).ravel()
    k = b.size // 8 * 8
    w = b[:k].view(np.uint64)
    nb = w.size // BITMAP_BLOCK_WORDS
    body = w[:nb * BITMAP_BLOCK_WORDS].reshape(nb, BITMAP_BLOCK_WORDS)
    blocks = np.flatnonzero(body.max(axis=1)) if nb else np.zeros(0, dtype=np.int64)
    r, c = np.nonzero(body[blocks])
    nz = np.concatenate([blocks[r] * BITMAP_BLOCK_WORDS + c,
                         nb * BITMAP_BLOCK_WORDS + np.flatnonzero(w[nb * BITMAP_BLOCK_WORDS:])])
    parts = []
    if nz.size:
        sub = np.unpackbits(w[nz].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        r, c = np.nonzero(sub)
        parts.append(nz[r] * 64 + c)
    if k < b.size:
        t = np.flatnonzero(np.unpackbits(b[k:], bitorder="little"))
        parts.append(t + k * 8)
    if not parts:
        return np.zeros(0, dtype=np.int64)
    pf = np.concatenate(parts).astype(np.int64)
    return pf[pf < n]


def finish(pre: PreScan) -> tuple[GuestView, list[PteRef]] | None:
    """Under the suspend: read and clean the bitmap, log-dirty off, bring the survey up to date
    for what was dirtied, rescan the dirty tables.  ``None``: take the full path."""
    hv, domid, survey = pre.hv, pre.domid, pre.survey
    if not pre.enabled or survey is None:
        stop(pre)
        return None
    t0 = time.perf_counter()
    n = int(survey.p2m.size)
    try:
        rc, bits, st = hv.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_CLEAN, n, packed=True)
    finally:
        stop(pre)
    if rc or bits is None:
        pre.fallback(f"reading the dirty bitmap failed ({E.name(rc)})")
        return None
    dirty = dirty_pfns(bits, n)
    pre.stats["dirty_pfns"] = int(dirty.size)
    rc, fl, fll = hv.pv_p2m_frame_lists(domid)
    if rc:
        pre.fallback(f"P2M frame list not read ({E.name(rc)})")
        return None
    fl = np.asarray(fl, dtype=np.int64)
    same = fll == survey.fll and np.array_equal(fl, survey.fl_frames) \
        and not np.isin(pre.fl_pfns, dirty).any()
    if same:  # the frame list was not written: the P2M is in the same frames
        frames = survey.p2m_frames
        fpfn, order = pre.p2m_pfns
        pos = np.minimum(np.searchsorted(fpfn, dirty), max(fpfn.size - 1, 0))
        rows = np.unique(order[pos[fpfn[pos] == dirty]]) if fpfn.size else np.zeros(0, np.int64)
    else:
        rc, frames, n2 = hv.pv_p2m_frames(domid)
        if rc or n2 != n:
            pre.fallback("the P2M changed size" if not rc else f"P2M not found ({E.name(rc)})")
            return None
        frames = np.asarray(frames, dtype=np.int64)
        old = np.asarray(survey.p2m_frames, dtype=np.int64)
        moved = frames != old if old.size == frames.size else np.ones(frames.size, bool)
        rows = np.flatnonzero(moved | np.isin(hv.m2p(frames).view(np.int64), dirty))
    pre.stats["p2m_rows_read"] = int(rows.size)
    p2m = survey.p2m
    changed = np.zeros(0, dtype=np.int64)
    if rows.size:
        m = hv.map_foreign(domid, frames[rows], False)
        if isinstance(m, int):
            pre.fallback(f"P2M not mapped ({E.name(m)})")
            return None
        pos = (rows[:, None] * 512 + np.arange(512)[None, :]).ravel()
        cur = m.array.reshape(-1).view(np.int64).copy()
        m.unmap()
        ok = pos < n
        pos, cur = pos[ok], cur[ok]
        diff = p2m[pos] != cur
        changed = pos[diff]
        p2m[changed] = cur[diff]
    g = hv.m2p(pre.targets).view(np.int64)
    g = g[(g >= 0) & (g < n)]
    check = np.union1d(np.union1d(dirty, changed), g)
    back = check[p2m[check] >= 0]
    rc, t = hv.page_types(domid, p2m[back]) if back.size else (0, np.zeros(0, dtype=np.uint32))
    if rc:
        pre.fallback(f"getpageframeinfo3 failed ({E.name(rc)})")
        return None
    lvl = (t >> np.uint32(28)) & np.uint32(7)
    tab = (lvl - np.uint32(1)) < np.uint32(4)
    again, again_lvl = back[tab], lvl[tab].astype(np.int64)
    old_pfns, old_lvls = survey.table_pfns()
    pre.stats["dirty_tables"] = int(again.size)
    if again.size > max(FALLBACK_MIN, FALLBACK_FRACTION * old_pfns.size):
        pre.fallback(f"{again.size} of {old_pfns.size} tables dirtied")
        return None
    types = survey.types
    types[check] = D.XEN_DOMCTL_PFINFO_XTAB
    types[back] = t

    def merged() -> tuple[np.ndarray, np.ndarray]:
        """The survey's tables (sorted) without the ones looked at again, with those that
        are tables now put in their places (one copy, no pass over the guest's pfns); only
        built if a page-table frame is among the targets or the full path is needed."""
        keep = np.ones(old_pfns.size, dtype=bool)
        at = np.searchsorted(old_pfns, check)
        hit = at < old_pfns.size
        hit[hit] = old_pfns[at[hit]] == check[hit]
        keep[at[hit]] = False
        kp, kl = old_pfns[keep], old_lvls[keep]
        ins = np.searchsorted(kp, again)
        return np.insert(kp, ins, again), np.insert(kl, ins, again_lvl)

    view = _View(domid, p2m, frames, fl, fll, types, stats={"prescan": True})
    view.merge = merged
    part = GuestView(domid, p2m, frames, view.fl_frames, fll, types, tables=(again, again_lvl))
    ts = time.perf_counter()
    rc, fresh = scan(hv, part, pre.targets)
    if rc:
        pre.fallback(f"rescan failed ({E.name(rc)})")
        return None
    gone = np.isin(pre.ref_pfns, check)  # dirtied, retyped or moved tables: rescanned
    stand = [r for r, x in zip(pre.refs, gone.tolist()) if not x]
    refs = stand + fresh
    pre.stats.update(rescan_s=time.perf_counter() - ts, rescanned_tables=int(again.size),
                     p2m_changed=int(changed.size), hits_kept=len(stand), hits_rescanned=len(fresh),
                     finish_s=time.perf_counter() - t0)
    return view, refs


def exchange(pre: PreScan, mfns, hook=None) -> list[Outcome]:
    """Exchange ``mfns`` of the suspended guest with what the pre-scan found (or by the full
    path, see the module's docstring)."""
    got = finish(pre)
    if got is None:
        pre.stats["path"] = "full"
        return exchange_pages(pre.hv, pre.domid, list(mfns), hook=hook, survey=pre.survey)
    pre.stats["path"] = "prescan"
    view, refs = got
    return exchange_pages(pre.hv, pre.domid, list(mfns), view=view, hook=hook, prefound=refs)
