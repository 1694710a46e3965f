"""In-place retirement of a translated (HVM or PVH) guest's offline-pending frames with stock
Xen 4.17 hypercalls -- no migration, no hypervisor extension.

``XENMEM_exchange`` refuses translated guests (``steal_page``: -EOPNOTSUPP), but a dom0
toolstack can give one of their gfns back and take a fresh frame for it, as a balloon driver
does from the inside:

1. **find** the gfn of each frame (the M2P: Xen keeps it for HAP guests) and check it before
   touching anything: the frame is offline-pending and owned by the guest, the gfn is RAM the
   guest can use (``getpageframeinfo3`` by gfn: not a hole, not broken), and **nothing else
   will use the frame behind the guest's back**: no grant of that gfn in the guest's grant
   table (a backend maps grants by gfn at any time, also while the guest is paused: between
   the decrease and the populate it would find a hole, afterwards a mapping of the old
   frame); a device model's map cache cannot be seen from here (QEMU maps 1 MiB buckets of
   guest memory in its own process): those frames are detected after the decrease (3);
   frames that fail a check are left pending, and ``--fallback=migrate`` migrates the guest;
   the guest needs allocation head-room (``max_pages - tot_pages``: libxl leaves 1 MiB) so
   that a gfn can be repopulated even while its old frame is still referenced;
2. **pause** the guest (all vCPUs descheduled) and **copy** the gfns' contents out
   (``read_pages``); the copy goes into the write-ahead journal (fsynced) -- between the
   decrease and the copy back, the journal holds the only copy of the page;
3. ``XENMEM_decrease_reservation`` of the gfns (``guest_remove_page``: the p2m entry goes, a
   superpage around it is split, the frame's allocation reference is dropped); the old
   frame's status must now be OFFLINED (``free_heap_pages`` offlined it); a frame still
   PENDING is held by someone (a device model's map cache, a backend's foreign mapping): Xen
   has asked the device model to invalidate its map cache (``p2m_remove_entry`` ->
   ``ioreq_request_mapcache_invalidate``; the request goes out on the guest's next
   hypercall), so the move rolls forward and the frame is reported as still pending --
   a frame Xen itself maps for the guest (``map_vcpu_info``, the event-channel FIFO pages:
   long-lived ``get_page_from_gfn`` + ``get_page_type`` references no dom0 interface shows)
   is the dangerous case: Xen keeps writing the old frame, so such a frame is left to a
   migration (``--fallback=migrate``), which makes the guest register them again;
4. ``XENMEM_populate_physmap`` at the same gfns (a fresh frame each; Xen writes no MFN back
   for a translated guest), **write** the contents back (``write_pages``), **verify** them by
   reading back (and, where the backend can tell the frame behind a gfn, that the new frame's
   M2P names the gfn);
5. **unpause** (always; retried) and report.

All of one guest's frames go under one pause, in chunks no larger than its head-room.  All
or nothing: before the decrease a failure changes nothing; after it every step is completed
(retried; a gfn left a hole is repopulated from the journal by ``xenpage recover``, the guest
kept paused until then: resuming it with a hole in its memory could corrupt it).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .fixed import below_bits, fixed_range
from ..statefiles import fsync_dir as _fsync_dir
from .. import statefiles
from ..abi import domctl as D
from ..abi import errno as E
from ..abi import grant as G
from ..abi import hvm as H
from ..abi import sysctl as S
from ..abi import xen as X
from .guest_type import domain_type, has_device_model
from .hypervisor import MigrationHypervisor
from .journal import _b64, _unb64, checkpoint, crash_point
from .outcomes import Kind, Outcome, Reason, not_pending

UNPAUSE_RETRIES = 3
RETRIES = 4
#: how long the toolstack lets the unpaused guest run before it asks again whether an old
#: frame that was still referenced has gone (the device model drops its map cache when the
#: guest next makes a hypercall)
SETTLE_S = 0.01
JOURNAL_NAME = "hvm-exchange.journal"


@dataclass
class HvmExchangeResult:
    outcomes: list[Outcome]
    #: time the guest was paused, on the host's clock (simulated on the simulator)
    downtime_s: float = 0.0
    paused: bool = False
    wall_s: float = 0.0
    stats: dict = field(default_factory=dict)


def _status(hv, mfn: int) -> int:
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    return -1 if rc or st is None else int(st[0])


def _offlined(st: int) -> bool:
    return st >= 0 and bool(st & S.PG_OFFLINE_STATUS_OFFLINED)


def _granted_gfns(hv, domid: int) -> tuple[int, set[int]]:
    """The gfns the guest's grant table names in a live entry (permit_access or transitive;
    a backend may map them whenever it likes): ``(rc, gfns)``."""
    rc, ents = hv.grant_entries(domid)
    if rc:
        return rc, set()
    e = np.asarray(ents, dtype=np.uint64)
    t = (e & np.uint64(G.GTF_type_mask)).astype(np.int64)
    live = (t == G.GTF_permit_access) | (t == G.GTF_transitive)
    return 0, set((e[live] >> np.uint64(32)).astype(np.int64).tolist())


# -- the write-ahead journal ------------------------------------------------------------------

def journal_path(journal_dir) -> Path:
    return Path(journal_dir) / JOURNAL_NAME


class _Journal:
    """One JSON line per step, fsynced, in ``<journal dir>/hvm-exchange.journal``:
    ``begin`` (guest, frames, gfns, whether xenpage paused it), ``snapshot`` (every page's
    512 words, before the decrease), ``unpausing``, then the file is removed.  On the
    simulator the host is saved first (what a real machine keeps by itself)."""

    def __init__(self, hv, journal_dir):
        self.hv = hv
        self.dir = Path(journal_dir)
        self.path = journal_path(journal_dir)

    def write(self, op: str, truncate: bool = False, **data) -> None:
        checkpoint(self.hv)
        crash_point("hvm-" + op, self.hv)
        statefiles.state_dir(self.dir)
        with statefiles.open_private(self.path, "w" if truncate else "a") as f:
            f.write(json.dumps({"op": op, **data}, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(self.dir)
        crash_point("hvm-" + op + "+", self.hv)

    def end(self) -> None:
        checkpoint(self.hv)
        crash_point("hvm-end", self.hv)
        statefiles.remove_durably(self.path)




class JournalError(Exception):
    """A damaged journal (other than a torn last line): nothing is done."""


def read_journal(journal_dir) -> list[dict]:
    p = journal_path(journal_dir)
    if not p.exists():
        return []
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and rec.get("op") in ("begin", "snapshot", "unpausing")
        except ValueError:
            ok = False
        if not ok:
            if i == len(lines) - 1 and not raw.endswith(b"\n"):
                break  # torn last line: never durable
            raise JournalError(f"{p}: record {i + 1} is damaged; nothing done")
        out.append(rec)
    if out and out[0]["op"] != "begin":
        raise JournalError(f"{p}: does not start with a 'begin' record; nothing done")
    return out


# -- the exchange ---------------------------------------------------------------------------------

def _retry(fn) -> int:
    rc = 0
    for _ in range(RETRIES):
        rc = fn()
        if rc == 0:
            return 0
    return rc


def _complete(hv, domid: int, gfns: np.ndarray, words: list[np.ndarray],
              only_holes: bool = False) -> tuple[int, str]:
    """Roll forward: every gfn of ``gfns`` that is a hole gets a fresh frame, every page is
    written with its journaled words and read back (``only_holes``: only the pages that were
    holes).  Idempotent.  ``(rc, step)``."""
    if only_holes:
        rc, t = hv.page_types(domid, gfns)
        if rc:
            return rc, "page types"
        keep = np.asarray(t, dtype=np.uint32) == D.XEN_DOMCTL_PFINFO_XTAB
        gfns = gfns[keep]
        words = [w for w, k in zip(words, keep.tolist()) if k]
        if gfns.size == 0:
            return 0, ""

    def populate() -> int:
        rc, t = hv.page_types(domid, gfns)
        if rc:
            return rc
        holes = gfns[np.asarray(t, dtype=np.uint32) == D.XEN_DOMCTL_PFINFO_XTAB]
        if holes.size == 0:
            return 0
        done, _ = hv.populate_physmap(domid, holes)
        return 0 if done == holes.size else (done if done < 0 else -E.ENOMEM)
    rc = _retry(populate)
    if rc:
        return rc, "populate_physmap"
    _off_fixed(hv, domid, gfns)

    def write() -> int:
        rc, data = hv.read_pages(domid, gfns)
        if rc:
            return rc
        for i, w in enumerate(words):
            data.set_words(i, w)
        return hv.write_pages(domid, gfns, data)
    rc = _retry(write)
    if rc:
        return rc, "write_pages"

    def check() -> int:
        rc, back = hv.read_pages(domid, gfns)
        if rc:
            return rc
        return 0 if all(np.array_equal(back.words(i), w) for i, w in enumerate(words)) else -E.EIO
    rc = _retry(check)
    return (rc, "read back") if rc else (0, "")


def exchange_hvm_pages(hv: MigrationHypervisor, domid: int, mfns: list[int],
                       journal_dir=None, hook=None) -> HvmExchangeResult:
    """Retire each of ``mfns`` (offline-pending frames of translated guest ``domid``) in place.
    ``journal_dir``: where the write-ahead journal goes (None: no journal).  ``hook(step,
    **info)`` runs between steps (fault injection)."""
    hook = hook or (lambda step, **kw: None)
    wall0 = time.perf_counter()
    mfns = [int(m) for m in mfns]
    if journal_dir is not None and journal_path(journal_dir).exists():
        recover(hv, journal_dir)
    info = hv.domain_info(domid)

    def all_(kind, reason, detail, **kw):
        return HvmExchangeResult([Outcome(m, kind, reason, detail, domid=domid, **kw) for m in mfns])

    if info is None:
        return all_(Kind.REFUSED, Reason.NO_DOMAIN, f"no domain {domid}")
    if not info.hvm:
        return all_(Kind.REFUSED, Reason.NONE, f"d{domid} is a PV guest (use the PV exchange)")
    if info.dying or info.shutdown:
        return all_(Kind.REFUSED, Reason.NO_DOMAIN, f"d{domid} is not running")
    gtype = domain_type(hv, info)
    dm = has_device_model(hv, domid)
    out: dict[int, Outcome] = {}
    cand: list[tuple[int, int]] = []  # (mfn, gfn)
    m2p = hv.m2p(np.array(mfns, dtype=np.int64))
    rc_g, granted = _granted_gfns(hv, domid)
    orders: dict[int, int] = {}
    first: list[tuple[int, int, int]] = []  # (mfn, gfn, status): pending, with a gfn
    for mfn, g in zip(mfns, m2p.tolist()):
        st = _status(hv, mfn)
        refusal = not_pending(mfn, st, domid)
        if refusal is not None:
            out[mfn] = refusal
            continue
        if st & S.PG_OFFLINE_STATUS_BROKEN:
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.BROKEN,
                               "the frame is broken (machine check): its content is lost, the guest "
                               "was told; it is offlined when the guest frees it or migrates",
                               domid=domid, status=st)
            continue
        if g == X.INVALID_M2P_ENTRY or g >= 1 << 40:
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.M2P_MISMATCH,
                               "the M2P names no gfn for this frame", domid=domid, status=st)
            continue
        first.append((mfn, int(g), st))
    # one getpageframeinfo3 (and one p2m probe, where the backend can tell) for the whole batch
    gl = [g for _, g, _ in first]
    rc_t, types = hv.page_types(domid, gl) if gl else (0, [])
    prc, pm, pt, po = hv.hvm_p2m(domid, gl) if gl else (-1, None, None, None)
    for i, (mfn, g, st) in enumerate(first):
        t = int(types[i]) if not rc_t else None
        if rc_t or t in (D.XEN_DOMCTL_PFINFO_XTAB, D.XEN_DOMCTL_PFINFO_BROKEN):
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.M2P_MISMATCH if t != D.XEN_DOMCTL_PFINFO_BROKEN
                               else Reason.BROKEN,
                               f"gfn {g:#x} (from the M2P) is "
                               + (f"not readable ({E.name(rc_t)})" if rc_t else
                                  "broken" if t == D.XEN_DOMCTL_PFINFO_BROKEN else "not the guest's RAM"),
                               domid=domid, gpfn=g, status=st, errno=-rc_t if rc_t else 0)
            continue
        if prc == 0:
            if int(pm[i]) != mfn or int(pt[i]) not in H.P2M_WRITABLE:
                out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.M2P_MISMATCH,
                                   f"the M2P names gfn {g:#x}, whose p2m entry is not this frame as RAM",
                                   domid=domid, gpfn=g, status=st)
                continue
            orders[g] = int(po[i])
        if rc_g or g in granted:
            out[mfn] = Outcome(mfn, Kind.PENDING, Reason.GRANTED,
                               f"gfn {g:#x} is granted (a backend may map it at any time)" if not rc_g
                               else f"the grant table cannot be read ({E.name(rc_g)})",
                               domid=domid, gpfn=g, status=st)
            continue
        cand.append((mfn, g))
    res = HvmExchangeResult([])
    res.stats.update(type=gtype, device_model=dm)
    if cand:
        headroom = info.max_pages - info.tot_pages
        if headroom <= 0:
            for mfn, g in cand:
                out[mfn] = Outcome(mfn, Kind.PENDING, Reason.NO_HEADROOM,
                                   f"d{domid} has no allocation head-room (tot_pages = max_pages = "
                                   f"{info.max_pages}): a gfn could not be repopulated while its old "
                                   "frame is still referenced (raise it with xl mem-max)",
                                   domid=domid, gpfn=g)
            cand = []
    if cand:
        _run(hv, domid, cand, headroom, journal_dir, hook, out, res, orders)
    for mfn, o in out.items():
        o.extra.setdefault("type", gtype)
    res.outcomes = [out[m] for m in mfns]
    res.wall_s = time.perf_counter() - wall0
    return res


def _run(hv, domid: int, cand: list[tuple[int, int]], headroom: int, journal_dir, hook,
         out: dict[int, Outcome], res: HvmExchangeResult, orders: dict[int, int]) -> None:
    hook("checked", cand=cand)
    jn = _Journal(hv, journal_dir) if journal_dir is not None else None
    gfns = np.array([g for _, g in cand], dtype=np.int64)
    t0 = hv.now()
    if jn:
        jn.write("begin", truncate=True, domid=domid, mfns=[m for m, _ in cand],
                 gfns=gfns.tolist(), paused_by_us=True)
    rc = hv.pause(domid)
    if rc:
        for mfn, g in cand:
            out[mfn] = Outcome(mfn, Kind.PENDING, Reason.SUSPEND_FAILED,
                               f"pausing d{domid} failed ({E.name(rc)})", domid=domid, gpfn=g, errno=-rc)
        if jn:
            jn.end()
        return
    res.paused = True
    keep_paused = False
    try:
        hook("paused")
        rc, data = hv.read_pages(domid, gfns)
        if rc:
            for mfn, g in cand:
                out[mfn] = Outcome(mfn, Kind.ROLLED_BACK, Reason.EXCHANGE_FAILED,
                                   f"copying gfn {g:#x} out failed ({E.name(rc)}); nothing changed",
                                   domid=domid, gpfn=g, errno=-rc)
            return
        words = [data.words(i) for i in range(len(data))]
        if jn:
            jn.write("snapshot", pages=[_b64(w) for w in words])
        hook("snapshot")
        step = max(1, headroom)
        for s in range(0, len(cand), step):
            chunk = cand[s:s + step]
            cg = gfns[s:s + step]
            cw = words[s:s + step]
            done = hv.decrease_reservation(domid, cg)
            crash_point("hvm-decreased", hv)  # the journal alone holds these pages now
            hook("decreased", done=done)
            n = max(done, 0)
            for mfn, g in chunk[n:]:
                out[mfn] = Outcome(mfn, Kind.ROLLED_BACK, Reason.EXCHANGE_FAILED,
                                   f"XENMEM_decrease_reservation of gfn {g:#x} did not take it "
                                   f"({E.name(done) if done < 0 else 'stopped there'}); nothing changed",
                                   domid=domid, gpfn=g, errno=-done if done < 0 else 0)
            if n == 0:
                continue
            # the old frames: offlined if nothing else held them
            st_after = [_status(hv, mfn) for mfn, _ in chunk[:n]]
            keep_paused = True  # until the given-back gfns hold their pages again
            rc, step_name = _complete(hv, domid, cg[:n], cw[:n])
            hook("completed", rc=rc)
            if rc:
                for mfn, g in chunk[:n]:
                    out[mfn] = Outcome(mfn, Kind.FAILED, Reason.RESTORE_FAILED,
                                       f"gfn {g:#x} was given back but {step_name} failed ({E.name(rc)}): "
                                       f"d{domid} stays paused; 'xenpage recover' completes it from the "
                                       "journal", domid=domid, gpfn=g, errno=-rc)
                for mfn, g in cand[s + len(chunk):]:  # the later chunks: not touched
                    out[mfn] = Outcome(mfn, Kind.ROLLED_BACK, Reason.EXCHANGE_FAILED,
                                       "not attempted: an earlier gfn of the batch could not be "
                                       "completed; nothing changed", domid=domid, gpfn=g)
                break
            keep_paused = False
            for (mfn, g), st in zip(chunk[:n], st_after):
                out[mfn] = _moved(hv, domid, mfn, g, st, orders.get(g))
        hook("before-unpause")
    finally:
        if res.paused and not keep_paused:
            if jn:
                jn.write("unpausing")
            for _ in range(UNPAUSE_RETRIES):
                if hv.unpause(domid) == 0:
                    break
            else:
                res.stats["unpause_failed"] = True
            res.downtime_s = hv.now() - t0
            if jn and not res.stats.get("unpause_failed"):
                jn.end()
        elif keep_paused:
            res.downtime_s = hv.now() - t0
    moved = [o for o in out.values() if o.kind in (Kind.EXCHANGED, Kind.PENDING) and "moved" in o.extra]
    late = [o for o in moved if not o.extra["offlined"]]
    if late and not keep_paused:
        hv.wait(SETTLE_S)  # the guest runs: its next hypercall carries the map-cache invalidate
    for o in moved:
        st = _status(hv, o.mfn)
        o.status = st
        o.extra["downtime_s"] = res.downtime_s
        if not o.extra["offlined"] and _offlined(st):
            o.extra["offlined"] = True
            o.extra["offlined_after_unpause"] = True
            o.kind, o.reason = Kind.EXCHANGED, Reason.NONE
            to = f"mfn {o.new_mfn:#x}" if o.new_mfn is not None else "a fresh frame"
            o.detail = (f"retired in place: gfn {o.gpfn:#x} given back, repopulated at {to} and its "
                        "content copied back; the old frame was still referenced when it left the "
                        "p2m (the device model's map cache, told to invalidate on the guest's next "
                        "hypercall) and was offlined once that reference went")
        if res.stats.get("unpause_failed"):
            o.kind, o.reason = Kind.FAILED, Reason.RESTORE_FAILED
            o.detail += f"; but d{domid} could not be unpaused"


def _off_fixed(hv, domid: int, gfns: np.ndarray) -> None:
    """Before the content is copied back: a gfn repopulated with a frame of Xen's fixed range
    (its freed init region heads the free lists; ``offline_page`` refuses it for ever) is
    given back and populated again below that zone (:mod:`.fixed`).  Best effort: if that
    fails, the gfn keeps a frame (the fixed one, or a fresh one the retry got) and the copy
    back proceeds."""
    rng = fixed_range(hv)
    if rng is None or not gfns.size:
        return
    rc, pm, _, _ = hv.hvm_p2m(domid, gfns.tolist())
    if rc:
        return
    bad = gfns[(pm >= rng[0]) & (pm < rng[1])]
    if not bad.size or not below_bits(rng):
        return
    if hv.decrease_reservation(domid, bad) != bad.size:
        return
    done, _ = hv.populate_physmap(domid, bad, below_bits(rng))
    if done != bad.size:  # nothing free below: take any frame rather than leave a hole
        rc, t = hv.page_types(domid, bad)
        if rc == 0:
            holes = bad[np.asarray(t, dtype=np.uint32) == D.XEN_DOMCTL_PFINFO_XTAB]
            if holes.size:
                hv.populate_physmap(domid, holes)


def _moved(hv, domid: int, mfn: int, g: int, st_after: int, order: int | None) -> Outcome:
    """The outcome of a gfn given back and repopulated with its content."""
    new = None
    extra: dict = {"moved": True, "offlined": _offlined(st_after), "p2m_type": "ram_rw"}
    if order is not None:
        extra["order_before"] = order
    rc, pm, pt, po = hv.hvm_p2m(domid, [g])
    if rc == 0:
        new = int(pm[0])
        extra["m2p_ok"] = int(hv.m2p(np.array([new]))[0]) == g
        extra["p2m_type"] = H.P2M_TYPE_NAMES.get(int(pt[0]), int(pt[0]))
    where = f"mfn {new:#x}" if new is not None else "a fresh frame"
    if extra["offlined"]:
        return Outcome(mfn, Kind.EXCHANGED, Reason.NONE,
                       f"retired in place: gfn {g:#x} given back (decrease_reservation), repopulated "
                       f"at {where} (populate_physmap) and its content copied back; old frame offlined",
                       domid=domid, gpfn=g, new_mfn=new, status=st_after, extra=extra)
    return Outcome(mfn, Kind.PENDING, Reason.REFERENCED,
                   f"gfn {g:#x} now at {where} with its content, but the old frame is still referenced "
                   "(a device model's map-cache entry in use, a backend's foreign mapping, or Xen's own "
                   "mapping of a page the guest registered -- vcpu_info, event-channel FIFO pages -- "
                   "which Xen keeps using through the old frame: live-migrate the guest, "
                   "--fallback=migrate); it stays offline-pending until that reference goes",
                   domid=domid, gpfn=g, new_mfn=new, status=st_after, extra=extra)


# -- recovery ---------------------------------------------------------------------------------------

@dataclass
class HvmRecovery:
    journal: bool = False
    domid: int | None = None
    completed: list[int] = field(default_factory=list)   # gfns written back
    unpaused: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"journal": self.journal, "domid": self.domid, "completed": self.completed,
                "unpaused": self.unpaused, "errors": self.errors, "ok": self.ok}

    def lines(self) -> list[str]:
        if not self.journal:
            return []
        out = [f"xenpage: recovering an interrupted in-place retirement of d{self.domid}"]
        if self.completed:
            out.append(f"xenpage: completed: {len(self.completed)} gfn(s) of d{self.domid} hold "
                       "their journaled content")
        if self.unpaused:
            out.append(f"xenpage: d{self.domid} unpaused")
        out += [f"xenpage: error: {e}" for e in self.errors]
        return out


def recover(hv, journal_dir) -> HvmRecovery:
    """Complete an in-place retirement the journal in ``journal_dir`` describes: once the
    pages were journaled (``snapshot``), every gfn that is a hole is repopulated and every
    page written with its journaled content (the guest was paused since, so the journal is
    its memory); then the guest is unpaused if xenpage paused it and has not unpaused it yet,
    and the journal removed (kept if something failed)."""
    recs = read_journal(journal_dir)
    res = HvmRecovery(journal=bool(recs))
    p = journal_path(journal_dir)
    if not recs:
        if p.exists():
            p.unlink()
        return res
    b = recs[0]
    domid = int(b["domid"])
    res.domid = domid
    info = hv.domain_info(domid)
    if info is None:  # the guest is gone, and its memory with it
        p.unlink()
        return res
    ops = {r["op"]: r for r in recs}
    if "snapshot" in ops and "unpausing" not in ops:
        gfns = np.array(b["gfns"], dtype=np.int64)
        words = [_unb64(x) for x in ops["snapshot"]["pages"]]
        # a guest someone else unpaused has run since: its pages are newer than the
        # journal's; only the gfns still holes take the journaled content
        rc, step = _complete(hv, domid, gfns, words, only_holes=not info.paused)
        if rc:
            res.errors.append(f"{step} of d{domid}'s gfns failed ({E.name(rc)})")
            return res
        res.completed = gfns.tolist()
    # (killed between 'unpausing' and the journal's removal, the guest may be unpaused
    # already; a guest left paused is the worse error)
    if b.get("paused_by_us") and hv.domain_info(domid).paused:
        for _ in range(UNPAUSE_RETRIES):
            if hv.unpause(domid) == 0:
                res.unpaused = True
                break
        else:
            res.errors.append(f"cannot unpause d{domid}")
            return res
    p.unlink()
    _fsync_dir(Path(journal_dir))
    return res
