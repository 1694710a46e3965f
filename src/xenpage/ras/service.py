"""The page-retirement service: machine-check records in; thresholds, decisions, actions
through the toolstack, outcomes -- all recorded; pending frames retried with backoff; the
retired-page list replayed when the service starts.

Every frame's story is told in Xen's own terms: the state the page-offline query reports
before and after each action -- ``online`` (in use or free), ``offlining`` (offline-pending:
``PGC_state_offlining``), ``offlined`` (``PGC_state_offlined``), each ``+broken`` when
``PGC_broken`` is set -- one log line per transition.

Rules that keep the service from doing harm:

* a frame Xen already marked broken and that still has an owner is never offlined again:
  ``offline_page`` answers ``PG_OFFLINE_AGAIN`` and crashes the owner (xen-semantics 1.5);
  the service only waits (queries) until the owner frees it;
* ``hard`` (mark broken) goes through Xen's machine-check path on the simulator, which
  crashes a PV owner -- it is only done when the policy says so (``hard``, or
  ``soft-then-hard`` once soft failed); on real Xen it never fakes a machine check: the frame
  is retired by every means (exchange, live migration) and kept as broken by policy
  (:mod:`.actions`);
* an uncorrected error is acted on by Xen itself before dom0 hears of it; the service records
  what Xen did and follows the frame until it is offlined.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import sys
import time as _time
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import itemgetter
from typing import Callable, Iterable

import numpy as np

from ..abi import sysctl as S
from ..abi.mca import McRecord
from ..toolstack.offline import mem_offline
from ..toolstack.outcomes import Kind, Reason
from ..toolstack.retire import RetireOptions
from .columns import columns
from .devmcelog import McBatch, merged
from .policy import Accountant, Trigger
from .store import Frame, Store
from .thresholds import Action, Policy

#: reasons of a pending outcome that no retry of the exchange can change soon
_WAIT_ONLY = {Reason.DOM0.value, Reason.SYSTEM_DOMAIN.value, Reason.XEN_HEAP.value,
              Reason.ANONYMOUS.value, Reason.OWNER_CRASHED.value}


def xen_state(rc: int, status: int | None) -> str:
    """The page-offline query's answer in Xen's state names."""
    if rc < 0 or status is None or status == S.STATUS_UNTOUCHED:
        return "invalid"
    if status & S.PG_OFFLINE_STATUS_OFFLINED:
        s = "offlined"
    elif status & S.PG_OFFLINE_STATUS_OFFLINE_PENDING:
        s = "offlining"
    else:
        s = "online"
    if status & S.PG_OFFLINE_STATUS_BROKEN:
        s += "+broken"
    return s


def query(hv, mfn: int) -> tuple[int, int | None]:
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    return rc, (int(st[0]) if st is not None else None)


def parse_badpage_value(value: str) -> set[int]:
    """The frames of a ``badpage=`` value this service wrote (``0x..`` and ``0x..-0x..``)."""
    out: set[int] = set()
    for item in filter(None, (value or "").split(",")):
        a, _, b = item.partition("-")
        try:
            lo = int(a, 0)
            hi = int(b, 0) if b else lo
        except ValueError:
            continue
        out.update(range(lo, max(lo, hi) + 1))
    return out


def boot_badpages(hv) -> set[int]:
    """The frames the running Xen was booted with in ``badpage=`` (its command line,
    ``XENVER_commandline``): withheld from its heap since boot (``init_boot_pages``), they stay
    in use with no owner, which the page-offline query reports as online."""
    try:
        cmdline = hv.physinfo().extra.get("xen_commandline") or ""
    except Exception:  # a backend that cannot tell: nothing is known withheld
        return set()
    out: set[int] = set()
    for word in cmdline.split():
        if word.startswith("badpage="):
            out |= parse_badpage_value(word[len("badpage="):])
    return out


# -- logging --------------------------------------------------------------------------------

_PRIO = {"error": 3, "warning": 4, "notice": 5, "info": 6, "debug": 7}


class Log:
    """Structured log lines: ``key=value`` text (with ``<N>`` syslog priorities when stdout
    goes to the journal) or one JSON object per line."""

    def __init__(self, stream=None, as_json: bool = False, journal: bool | None = None,
                 clock: Callable[[], float] = _time.time, verbose: bool = False):
        self.stream = stream if stream is not None else sys.stdout
        self.as_json = as_json
        self.journal = bool(os.environ.get("JOURNAL_STREAM")) if journal is None else journal
        self.clock = clock
        self.verbose = verbose
        self.lines: list[dict] = []
        self.keep = False

    def __call__(self, event: str, level: str = "info", **kv) -> None:
        if level == "debug" and not self.verbose:
            return
        rec = {"time": round(self.clock(), 3), "level": level, "event": event, **kv}
        if self.keep:
            self.lines.append(rec)
        if self.stream is False:
            return
        if self.as_json:
            line = json.dumps(rec, default=str, sort_keys=False)
        else:
            parts = [f"xenpage-retired: {event}"]
            for k, v in kv.items():
                if v is None or v == "":
                    continue
                v = str(v)
                parts.append(f"{k}={json.dumps(v) if (' ' in v or '=' in v or not v) else v}")
            line = " ".join(parts)
            if self.journal:
                line = f"<{_PRIO.get(level, 6)}>" + line
        self.stream.write(line + "\n")
        self.stream.flush()


def sd_notify(message: str) -> bool:
    """Tell systemd (``Type=notify``) how the service is doing; no-op outside systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError:
        return False


# -- the service ----------------------------------------------------------------------------

_INT64 = 1 << 63
#: frames a threshold never decides on again
_SETTLED = ("retired", "pending", "failed")


def _unstorable(row: tuple) -> str | None:
    """Why SQLite cannot store this row (what inserting it would raise), or None."""
    for v in row:
        if type(v) is int:
            if not -_INT64 <= v < _INT64:
                return "cannot be stored: OverflowError: Python int too large to convert to SQLite INTEGER"
        elif type(v) is str and not v.isascii():
            try:
                v.encode()
            except UnicodeEncodeError as e:
                return f"cannot be stored: {type(e).__name__}: {str(e)[:200]}"
    return None


class _Writes:
    """The batch's buffered writes: events (with ids given here, in order, as SQLite would),
    their identities, and the errors counted on frames (written to the frames of the list
    when flushed)."""

    def __init__(self, store: Store, idents: set[str]):
        self.store = store
        self.known = store.seen_among(idents) if idents else {}
        self.next_id = store.next_event_id()
        self.events: list[tuple] = []
        #: rows of events with no time and no raw text (``Store.add_events_untimed``)
        self.events_untimed: list[tuple] = []
        self.seen: list[tuple[str, int]] = []
        #: frames and times of the corrected errors counted, in order (arrays, or lists)
        self.count_m: list = []
        self.count_t: list = []

    def seen_event(self, ident: str) -> int | None:
        return self.known.get(ident)

    def event(self, row: tuple, ident: str) -> int:
        eid = self.next_id
        self.next_id += 1
        self.events.append((eid, *row))
        if ident:
            self.seen.append((ident, eid))
            self.known[ident] = eid
        return eid

    def count(self, mfn: int, t: float) -> None:
        self.count_m.append([mfn])
        self.count_t.append([t])

    def count_many(self, mfns: np.ndarray, times: np.ndarray) -> None:
        if len(mfns):
            self.count_m.append(mfns)
            self.count_t.append(times)

    def flush(self) -> None:
        if self.events:
            self.store.add_events(self.events)
            self.events = []
        if self.events_untimed:
            self.store.add_events_untimed(self.events_untimed)
            self.events_untimed = []
        if self.seen:
            self.store.add_seen(self.seen)
            self.seen = []
        if self.count_m:
            m = np.concatenate([np.asarray(x, dtype=np.uint64) for x in self.count_m])
            t = np.concatenate([np.asarray(x, dtype=np.float64) for x in self.count_t])
            self.count_m, self.count_t = [], []
            listed = set(self.store.listed_mfns())
            if listed:
                u, last, n = np.unique(m[::-1], return_index=True, return_counts=True)
                ul = u.tolist()
                keep = list(map(listed.__contains__, ul))
                if any(keep):
                    self.store.count_errors_many(zip(compress(n.tolist(), keep),
                                                     compress(t[::-1][last].tolist(), keep),
                                                     compress(ul, keep)))
        self.next_id = self.store.next_event_id()


@dataclass
class Stats:
    events: int = 0
    corrected: int = 0
    uncorrected: int = 0
    other: int = 0
    on_retired: int = 0
    thresholds: int = 0
    actions: dict = field(default_factory=dict)
    transitions: int = 0
    suspended_s: float = 0.0
    suspends: int = 0
    #: guests paused by live migration / in-place HVM exchange (the toolstack's simulated downtime)
    downtime_s: float = 0.0
    migrations: int = 0
    errors: int = 0
    #: records that could not be used or stored (kept in the store's quarantine table)
    quarantined: int = 0
    #: records seen before (same identity: replayed, or read from a second source): not counted
    duplicates: int = 0

    def to_json(self) -> dict:
        return dict(self.__dict__)


class RetireService:
    """Decides and acts for one host.  ``hard(hv, mfn) -> dict`` marks a frame broken (Xen's
    machine-check path); ``expand(unit, record) -> [mfn]`` lists the frames of a DRAM row or
    bank when the address map is known; ``clock`` gives the time of decisions and retries
    (records carry their own time for the buckets).  ``journal_dir``: where ``mem-offline``
    keeps its write-ahead journal (the CLI passes the state directory; None: none)."""

    def __init__(self, store: Store, policy: Policy, clock: Callable[[], float] = _time.time,
                 hard: Callable | None = None, log: Log | None = None, expand=None,
                 offline: Callable = mem_offline, journal_dir=None):
        self.store = store
        self.policy = policy
        self.clock = clock
        self.hard = hard
        self.log = log or Log(stream=False)
        self.offline = offline
        self.journal_dir = journal_dir
        self.expand = expand
        self._load_counts()
        self.stats = Stats()
        self._excluded = parse_badpage_value(store.last_boot_option())
        #: frames known retired, for the fast path of errors on retired frames
        self._retired = {f.mfn for f in store.frames(("retired",))}
        #: the off switch as read at the start of the batch being processed (None: read it)
        self._on: bool | None = None
        #: the write buffer of the batch being processed
        self._w: _Writes | None = None

    def _load_counts(self) -> None:
        """The accountant's state as the store holds it (at start, and after a batch whose
        transaction was rolled back)."""
        buckets, unit_frames = self.store.load_buckets()
        self.acct = Accountant(self.policy, buckets, unit_frames, expand=self.expand,
                               pages=self.store.load_pages())

    # -- switches -----------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        return self.policy.enabled and self.store.switch()

    def retired_mfns(self) -> set[int]:
        return set(self._retired)

    # -- records ------------------------------------------------------------------------
    def process(self, hv, records: Iterable[McRecord], batches: Iterable[McBatch] = ()) -> None:
        """Handle records, then retry what is due; one transaction.  The off switch is read
        once per batch.  A corrected error that crosses no threshold (most of them) is only
        written down: its event, identity and frame counts are buffered and written with one
        statement each per batch (:class:`_Writes`); anything that decides or acts first
        writes the buffer out, so it reads the list as if each record had been written at
        once.  ``batches``: ``/dev/mcelog`` reads, handled column-wise (:meth:`_batch`) with
        the same outcome as their records one by one."""
        records = records if isinstance(records, list) else list(records)
        batches = merged([b for b in batches if len(b)])
        try:
            with self.store.batch():
                self._on = self.enabled
                whys = [r.defect() for r in records]
                idents = [None if why is not None else (r.ident or r.identity())
                          for r, why in zip(records, whys)]
                known = {i for i in idents if i}
                cols = [columns(b) for b in batches]
                for c in cols:
                    known.update(c.ident)
                known.discard("")
                self._w = _Writes(self.store, known)
                try:
                    for rec, ident, why in zip(records, idents, whys):
                        self.handle_safely(hv, rec, ident, why)
                    for b, c in zip(batches, cols):
                        self._batch(hv, b, c)
                    self._w.flush()
                finally:
                    self._on = None
                    self._w = None
                self.retry_due(hv)
                self.store.save_buckets(self.acct.buckets, self.acct.unit_frames, self.acct.dirty)
                self.store.save_pages(self.acct.pages)
        except Exception:
            # the transaction is undone: so are the counts this batch made in memory
            try:
                self._load_counts()
                self._retired = {f.mfn for f in self.store.frames(("retired",))}
            except Exception:  # the store cannot be read now: the first error is the one
                pass
            raise

    def _batch(self, hv, b: McBatch, c) -> None:
        """A ``/dev/mcelog`` batch: what :meth:`handle_safely` does for each record, in
        order, with the columns of :func:`.columns.columns`.  A record the columns mark slow
        (a defect to quarantine, an uncorrected error) goes to :meth:`handle_safely`; the
        runs of records between them are handled column-wise (:meth:`_run`)."""
        n = len(c.ident)
        lo = 0
        for j in np.flatnonzero(c.slow).tolist() + [n]:
            if j > lo:
                self._run(hv, b, c, lo, j)
            if j < n:
                self.handle_safely(hv, b.record(j), c.ident[j] or None)
            lo = j + 1

    def _run(self, hv, b: McBatch, c, lo: int, hi: int) -> None:
        """Records ``lo:hi`` of a batch, none of them slow, column-wise: duplicates (an
        identity seen before, in the list or earlier in the batch) only counted as such; the
        others written down through the buffer (event, identity, errors counted on listed
        frames, the frames' event counts) and their corrected errors accounted in the page
        buckets for all of them at once (:meth:`.pagecounts.PageCounts.account`, which does
        not depend on any decision).  A threshold crossed is decided (:meth:`_crossed`)
        once the records up to it are in the buffer, as record by record."""
        w = self._w
        st = self.stats
        now = self.clock()
        known = w.known
        p = self.policy
        pages = self.acct.pages
        page_on = self._on and p.enabled and p.page_action != Action.OFF
        m = hi - lo
        idents = c.ident[lo:hi]
        dup = np.zeros(m, bool)
        hid = c.has_ident[lo:hi]
        if hid.any():
            ids = list(compress(idents, hid.tolist())) if not hid.all() else idents
            k = len(ids)
            first = dict(zip(reversed(ids), range(k - 1, -1, -1)))
            d = np.zeros(k, bool)
            if len(first) != k:     # an identity twice in the run: the later ones
                d |= np.fromiter(map(first.__getitem__, ids), np.int64, k) != np.arange(k)
            if not known.keys().isdisjoint(first):  # seen before (the list, this batch)
                d |= np.fromiter(map(known.__contains__, ids), bool, k)
            dup[np.flatnonzero(hid)] = d
        live = np.flatnonzero(~dup)                  # positions in lo:hi
        nl = len(live)
        eids = np.arange(w.next_id, w.next_id + nl)
        if nl:
            lids = itemgetter(*live.tolist())(idents) if nl > 1 else (idents[live[0]],)
            if hid.all():
                known.update(zip(lids, eids.tolist()))
            else:
                known.update((i, e) for i, e in zip(lids, eids.tolist()) if i)
        st.duplicates += m - nl
        st.events += nl
        ha = c.has_addr[lo:hi][live]
        na = int(ha.sum())
        st.other += nl - na
        st.corrected += na
        at = np.flatnonzero(ha)                      # indices into live of the counted ones
        pos = live[at] + lo                          # their records in the batch
        mf = c.mfn_a[pos]
        tt = c.time_a[pos]
        tt = np.where(np.isnan(tt), now, tt)
        slots = pages.slots(mf.tolist())
        if page_on:
            rate = p.page
            over = np.flatnonzero(pages.account(slots, c.inc_a[pos], tt, rate)).tolist()
        else:
            over = []
        retired = self._retired
        cl = ca = 0                                  # emitted: live[:cl], counted at[:ca]
        verbose = self.log.verbose
        dbg = lo                                     # verbose: the next record to describe
        settled: set[int] = set()
        if over and not verbose:
            # frames settled now stay settled in this batch (retired, pending and failed
            # only move among themselves): a threshold crossed on one is only counted and
            # logged (as _crossed does), in its place among the others, with no flush
            crossed = sorted(set(mf[over].tolist()))
            settled = set(self.store.frames_in_states(crossed, _SETTLED))
        for x in over + [None]:
            if x is not None and settled and int(mf[x]) in settled:
                mfn = int(mf[x])
                self._threshold_logged(Trigger("page", f"page:{mfn:#x}", p.page_action, [mfn],
                                               "", rate), c.source[int(pos[x])])
                continue
            el = nl if x is None else int(at[x]) + 1
            ea = na if x is None else x + 1
            if verbose:
                end = hi if x is None else int(pos[x]) + 1
                self._debug_lines(c, dbg, end, dup, lo)
                dbg = end
            if el > cl:
                self._emit(c, lo + live[cl:el], eids[cl:el], now)
            if ea > ca:
                msub = mf[ca:ea]
                w.count_many(msub, tt[ca:ea])
                pages.count_ce(slots[ca:ea])
                if retired:
                    st.on_retired += sum(map(retired.__contains__, msub.tolist()))
            cl, ca = el, ea
            if x is None:
                break
            mfn = int(mf[x])
            eid = int(eids[el - 1])
            w.next_id = eid + 1
            self._crossed(hv, b.record(int(pos[x])), [Trigger(
                "page", f"page:{mfn:#x}", p.page_action, [mfn],
                f"corrected errors on frame {mfn:#x} exceeded {rate}", rate)], eid)
            if el < nl and w.next_id != eids[el]:  # ids taken meanwhile: the rest follow them
                eids[el:] = np.arange(w.next_id, w.next_id + nl - el)
                known.update((idents[i], e) for i, e in zip(live[el:].tolist(),
                                                            eids[el:].tolist()) if idents[i])
        w.next_id = int(eids[-1]) + 1 if nl else w.next_id

    def _emit(self, c, pos: np.ndarray, eids: np.ndarray, now: float) -> None:
        """The ``events`` rows and identities of records ``pos`` of a batch, to the buffer."""
        w = self._w
        k = len(pos)
        a, z = int(pos[0]), int(pos[-1]) + 1
        if z - a == k:
            def g(col):
                return col[a:z]
        else:
            get = itemgetter(*pos.tolist())
            g = (lambda col: get(col)) if k > 1 else (lambda col: [col[a]])
        el = eids.tolist()
        if c.untimed:  # no time, no raw text: the rows leave both NULL
            w.events_untimed.extend(zip(el, repeat(now), g(c.source), g(c.kind), g(c.mfn),
                                        g(c.addr), g(c.status_hex), g(c.inc), g(c.location)))
        else:
            w.events.extend(zip(el, g(c.time), repeat(now), g(c.source), g(c.kind), g(c.mfn),
                                g(c.addr), g(c.status_hex), g(c.inc), g(c.location),
                                repeat(None)))
        if c.has_ident[pos].all():
            w.seen.extend(zip(g(c.ident), el))
        else:
            w.seen.extend((i, e) for i, e in zip(g(c.ident), el) if i)

    def _debug_lines(self, c, start: int, end: int, dup: np.ndarray, lo: int) -> None:
        """The debug lines (``event-duplicate``, ``event-ignored``) of records
        ``start:end`` of a batch, in order (only when the log is verbose)."""
        for i in range(start, end):
            if dup[i - lo]:
                self.log("event-duplicate", "debug", source=c.source[i],
                         first_event=self._w.known.get(c.ident[i]), ident=c.ident[i])
            elif not c.has_addr[i]:
                self.log("event-ignored", "debug", source=c.source[i],
                         reason="no valid address", status=c.status_hex[i])

    def _seen(self, ident: str) -> int | None:
        w = self._w
        if w is not None:
            return w.seen_event(ident)
        return self.store.first_seen(ident)

    def handle_safely(self, hv, rec: McRecord, ident: str | None = None,
                      why: str | None | bool = False) -> None:
        """:meth:`handle`, with a poison record quarantined instead of stopping the service:
        one that is not a machine check (:meth:`McRecord.defect`) before anything is done,
        one the store cannot hold (e.g. an integer SQLite cannot) with its writes undone.
        A record seen before (the same :meth:`McRecord.identity`: replayed, or read from a
        second source) is counted as a duplicate and nothing else.  ``ident``/``why``: the
        record's identity and defect when already known."""
        if why is False:
            why = rec.defect()
        if why is None:
            if ident is None:
                ident = rec.ident or rec.identity()
            if ident:
                first = self._seen(ident)
                if first is not None:
                    self.stats.duplicates += 1
                    self.log("event-duplicate", "debug", source=rec.source, first_event=first,
                             ident=ident)
                    return
            w = self._w
            if w is not None and rec.kind() != "uc":
                now = self.clock()
                row = self.store.event_row(rec, now)
                why = _unstorable(row)
                if why is None:
                    self._counted(hv, rec, ident, row, now)
                    return
            else:
                if w is not None:
                    w.flush()
                pages = self.acct.pages
                row = pages.row_of(rec.mfn) if rec.has_addr else None
                self.store.db.execute("SAVEPOINT record")
                try:
                    self.handle(hv, rec, ident)
                except (OverflowError, ValueError, sqlite3.Error) as e:
                    self.store.db.execute("ROLLBACK TO record")
                    if rec.has_addr:  # its counts in memory too
                        pages.restore(rec.mfn, row)
                    why = f"cannot be stored: {type(e).__name__}: {str(e)[:200]}"
                self.store.db.execute("RELEASE record")
                if w is not None:  # the record's event took the next id
                    w.next_id = self.store.next_event_id()
                    if why is None and ident:
                        w.known[ident] = w.next_id - 1
                if why is None:
                    return
        self.store.add_quarantined(rec, self.clock(), why)
        self.stats.quarantined += 1
        self.log("record-quarantined", "warning", source=rec.source, reason=why)

    def _counted(self, hv, rec: McRecord, ident: str, row: tuple, now: float) -> None:
        """A corrected error (or one without an address) through the write buffer: what
        :meth:`handle` does, with the writes batched."""
        w = self._w
        t = rec.time if rec.time is not None else now
        eid = w.event(row, ident)
        self.stats.events += 1
        if not rec.has_addr:
            self.stats.other += 1
            self.log("event-ignored", "debug", source=rec.source, reason="no valid address",
                     status=f"{rec.status:#x}")
            return
        mfn = rec.mfn
        w.count(mfn, t)
        self.acct.pages.count_event(mfn, "ce")
        self.stats.corrected += 1
        if mfn in self._retired:
            self.stats.on_retired += 1
        if not self._on:
            return
        trigs = self.acct.account_ce(rec, t)
        if trigs:
            self._crossed(hv, rec, trigs, eid)

    def _crossed(self, hv, rec: McRecord, trigs, eid: int) -> None:
        """Thresholds a buffered corrected error crossed: decided and acted on, the buffer
        written out first (a record the store cannot hold is quarantined, its writes
        undone)."""
        w = self._w
        if all(self.store.frame_state(m) in _SETTLED for trig in trigs for m in trig.mfns):
            self._triggered(hv, rec, trigs, eid, settled=True)  # only counted and logged
            return
        w.flush()
        self.store.db.execute("SAVEPOINT record")
        try:
            self._triggered(hv, rec, trigs, eid)
        except (OverflowError, ValueError, sqlite3.Error) as e:
            self.store.db.execute("ROLLBACK TO record")
            self.store.db.execute("RELEASE record")
            why = f"cannot be stored: {type(e).__name__}: {str(e)[:200]}"
            self.store.add_quarantined(rec, self.clock(), why)
            self.stats.quarantined += 1
            self.log("record-quarantined", "warning", source=rec.source, reason=why)
            return
        self.store.db.execute("RELEASE record")

    def handle(self, hv, rec: McRecord, ident: str | None = None) -> None:
        now = self.clock()
        t = rec.time if rec.time is not None else now
        eid = self.store.add_event(rec, now)
        if ident is None:
            ident = rec.ident or rec.identity()
        if ident:
            self.store.seen(ident, eid)
        self.stats.events += 1
        kind = rec.kind()
        if kind == "other":
            self.stats.other += 1
            self.log("event-ignored", "debug", source=rec.source, reason="no valid address",
                     status=f"{rec.status:#x}")
            return
        mfn = rec.mfn
        self.acct.pages.count_event(mfn, kind)
        listed = self.store.count_error(mfn, t, uncorrected=kind == "uc")
        if kind == "uc":
            self.stats.uncorrected += 1
            self._uncorrected(hv, rec, self.store.frame(mfn) if listed else None, eid, t)
            return
        self.stats.corrected += 1
        if mfn in self._retired:
            self.stats.on_retired += 1
        if not (self.enabled if self._on is None else self._on):
            return
        self._triggered(hv, rec, self.acct.account_ce(rec, t), eid)

    def _triggered(self, hv, rec: McRecord, trigs, eid: int, settled: bool = False) -> None:
        """Log each threshold crossed and decide for its frames not yet settled
        (``settled``: the caller found them all settled)."""
        mfn = rec.mfn
        for trig in trigs:
            self._threshold_logged(trig, rec.source)
            for m in ([] if settled else trig.mfns):
                if self.store.frame_state(m) in _SETTLED:
                    continue
                self.decide(hv, m, trig.action, trig.unit, trig.reason, eid, rec if m == mfn else None)

    def _threshold_logged(self, trig: Trigger, source: str) -> None:
        self.stats.thresholds += 1
        self.log("threshold", "notice", unit=trig.unit, key=trig.key, rate=str(trig.rate),
                 action=trig.action.value, mfns=",".join(f"{m:#x}" for m in trig.mfns),
                 source=source)

    def _uncorrected(self, hv, rec: McRecord, fr: Frame | None, eid: int, t: float) -> None:
        mfn = rec.mfn
        if not self.enabled:
            self.store.add_decision(self.clock(), mfn, "none", "uncorrected", "page retirement is off", eid)
            return
        rc, st = query(hv, mfn)
        xs = xen_state(rc, st)
        if rc == 0 and st is not None and st & S.PG_OFFLINE_STATUS_BROKEN:
            did = self.store.add_decision(self.clock(), mfn, "hard", "xen-mce",
                                          "uncorrected error: Xen's machine-check handler marked "
                                          "the frame broken", eid)
            f = fr or self._new_frame(mfn, rec, eid)
            f.action, f.decided_time = "hard", self.clock()
            f.reason = "uncorrected error: marked broken by Xen's machine-check handler"
            self._settle(hv, f, "hard", did, xs, xs, None, "xen-mce",
                         "Xen offlines it when its owner frees it" if "offlining" in xs
                         else "offlined by Xen")
            return
        if fr is not None and fr.state in ("retired", "pending"):
            return
        action = Action.SOFT if self.policy.page_action.acts else Action.ACCOUNT
        self.decide(hv, mfn, action, "uncorrected",
                    f"uncorrected error, and Xen reports the frame {xs}", eid, rec)

    # -- decisions ------------------------------------------------------------------------
    def _new_frame(self, mfn: int, rec: McRecord | None, eid: int | None) -> Frame:
        t = rec.time if rec is not None and rec.time is not None else self.clock()
        loc = rec.location() if rec is not None else {}
        ce, uc = self.acct.pages.events(mfn)
        return Frame(mfn, state="pending", first_time=t, last_time=t, errors=ce, uncorrected=uc,
                     location=loc, event_id=eid, source=rec.source if rec is not None else "")

    def decide(self, hv, mfn: int, action: Action, trigger: str, reason: str,
               eid: int | None, rec: McRecord | None = None) -> Frame:
        now = self.clock()
        f = self.store.frame(mfn)
        before = f.state if f is not None else None
        if f is None:
            f = self._new_frame(mfn, rec, eid)
            if rec is None:
                f.errors = 0
        did = self.store.add_decision(now, mfn, action.value, trigger, reason, eid)
        f.action, f.reason, f.decided_time = action.value, reason, now
        if action == Action.ACCOUNT or action == Action.OFF:
            f.state = "accounted"
            f.detail = f"action = {action.value}: threshold crossed, nothing done"
            self.store.put_frame(f)
            self.store.add_outcome(now, mfn, did, action.value, "accounted", "", f.detail, "", "",
                                   before, "accounted", None)
            self.log("accounted", "notice", mfn=f"{mfn:#x}", reason=reason)
            return f
        cap = self.policy.max_retired
        if cap and before not in ("retired", "pending"):
            n = sum(self.store.counts()["frames"][s] for s in ("retired", "pending"))
            if n >= cap:
                f.state, f.detail = "accounted", f"max-retired = {cap} reached: not retired"
                self.store.put_frame(f)
                self.store.add_outcome(now, mfn, did, action.value, "limit", "max-retired",
                                       f.detail, "", "", before, "accounted", None)
                self.log("limit", "warning", mfn=f"{mfn:#x}", max_retired=cap)
                return f
        f.state = before or "pending"
        self.act(hv, f, action, did, before)
        return f

    def act(self, hv, f: Frame, action: Action, did: int | None, before: str | None,
            trigger: str = "") -> None:
        """Carry out ``action`` on a frame and record the outcome."""
        mfn = f.mfn
        rc, st = query(hv, mfn)
        xb = xen_state(rc, st)
        if rc < 0:
            self._settle(hv, f, action.value, did, xb, xb, None, "refused",
                         "not a frame Xen can query (not RAM, or beyond the frame table)",
                         kind="refused", forced_state="failed")
            return
        if st & S.PG_OFFLINE_STATUS_OFFLINED:
            self._settle(hv, f, action.value, did, xb, xb, None, "already-offlined",
                         "Xen already has it offlined", kind="offlined")
            return
        if st & S.PG_OFFLINE_STATUS_BROKEN:
            self._settle(hv, f, action.value, did, xb, xb, None, "broken",
                         "broken and still in use: Xen offlines it when its owner frees it "
                         "(offlining it again would crash the owner)", kind="pending")
            return
        if action == Action.HARD:
            self._hard(hv, f, did, xb, "policy: hard")
            return
        outcome = self._soft(hv, f)
        if outcome is None:
            return
        o, data = outcome
        hard_now = action == Action.SOFT_THEN_HARD and (
            o.kind in (Kind.ROLLED_BACK, Kind.FAILED)
            or (o.kind == Kind.REFUSED and o.reason not in (Reason.XEN_IMAGE, Reason.NOT_RAM,
                                                            Reason.INVALID_MFN))
            or (o.kind == Kind.PENDING and f.attempts + 1 >= self.policy.soft_attempts
                and o.reason.value not in _WAIT_ONLY))
        rc2, st2 = query(hv, mfn)
        xa = xen_state(rc2, st2)
        if hard_now and self.hard is not None and not (st2 or 0) & S.PG_OFFLINE_STATUS_OFFLINED:
            self.store.add_outcome(self.clock(), mfn, did, "soft", o.kind.value, o.reason.value,
                                   o.detail, xb, xa, before, f.state, o.domid, data)
            self._hard(hv, f, did, xa, f"soft-then-hard: soft ended {o.kind.value}"
                       + (f" ({o.reason.value})" if o.reason.value else ""))
            return
        state = None
        if o.kind == Kind.REFUSED and o.reason in (Reason.XEN_IMAGE, Reason.NOT_RAM, Reason.INVALID_MFN):
            state = "failed"
        if o.reason == Reason.ANONYMOUS and mfn in self._excluded:
            state, detail = "retired", "withheld from Xen's heap at boot (badpage=)"
        else:
            detail = o.detail
        self._settle(hv, f, "soft", did, xb, xa, o.domid, o.reason.value or o.kind.value, detail,
                     kind=o.kind.value, forced_state=state, data=data)

    def _soft(self, hv, f: Frame):
        p = self.policy
        try:
            res = self.offline(hv, [f.mfn], retire=RetireOptions(
                hvm=p.hvm, fallback="migrate" if p.fallback == "migrate" else None),
                journal_dir=self.journal_dir)
        except Exception as e:  # SinglePcpuHost, a hung simulated host, a backend error
            self.stats.errors += 1
            self.log("action-failed", "error", mfn=f"{f.mfn:#x}", action="soft",
                     error=f"{type(e).__name__}: {e}")
            f.attempts += 1
            f.detail = f"{type(e).__name__}: {e}"
            f.next_retry = self.clock() + self._backoff(f.attempts)
            self.store.put_frame(f)
            return None
        o = res.outcomes[0]
        self.stats.actions["soft"] = self.stats.actions.get("soft", 0) + 1
        data = {"timings": res.timings}
        for g in res.timings.get("guests", {}).values():
            if g.get("suspended_s"):
                self.stats.suspended_s += g["suspended_s"]
                self.stats.suspends += 1
        down = (o.extra or {}).get("downtime_s")
        if down is not None:  # a live migration or an in-place HVM exchange
            self.stats.downtime_s += down
            self.stats.migrations += 1
        return o, data

    def _hard(self, hv, f: Frame, did: int | None, xb: str, why: str) -> None:
        if self.hard is None:
            self._settle(hv, f, "hard", did, xb, xb, None, "no-hard-action",
                         "no way to mark frames broken on this backend", kind="refused")
            return
        try:
            res = self.hard(hv, f.mfn) or {}
        except Exception as e:
            self.stats.errors += 1
            res = {"effect": "failed", "error": f"{type(e).__name__}: {e}"}
        self.stats.actions["hard"] = self.stats.actions.get("hard", 0) + 1
        rc, st = query(hv, f.mfn)
        xa = xen_state(rc, st)
        eff = res.get("effect", "")
        if res.get("broken_by_policy"):  # real Xen: retired by every means, no faked MCE
            how = res.get("kind", "")
            detail = {"offlined": f"broken by policy ({why}): {how}, Xen has it offlined",
                      "pending": f"broken by policy ({why}): {how}, offline-pending until "
                                 f"its owner d{res.get('owner')} frees it",
                      "failed": f"broken by policy ({why}), not retired: {res.get('error', '')}"
                      }.get(eff, f"broken by policy ({eff})")
            self._settle(hv, f, "hard", did, xb, xa, res.get("owner"), res.get("reason_code",
                         "broken-by-policy"), detail, kind=eff or "hard", data=res)
            return
        detail = {"offlined": "marked broken; it was free, so Xen offlined it",
                  "crashed": f"marked broken; its PV owner d{res.get('owner')} was crashed",
                  "vmce": f"marked broken; its owner d{res.get('owner')} got a vMCE",
                  "again": "already broken; Xen crashed its owner",
                  "failed": f"Xen could not mark it broken {res.get('error', '')}".strip()}.get(
            eff, f"marked broken ({eff})")
        self._settle(hv, f, "hard", did, xb, xa, res.get("owner"), why, detail,
                     kind=eff or "hard", data=res)

    def _backoff(self, attempts: int) -> float:
        p = self.policy
        return min(p.retry_max, p.retry_initial * (2 ** max(0, attempts - 1)))

    def _settle(self, hv, f: Frame, action: str, did: int | None, xb: str, xa: str,
                domid: int | None, reason: str, detail: str, kind: str = "",
                forced_state: str | None = None, data: dict | None = None) -> None:
        """Record an outcome and the frame's new state (from Xen's, unless forced)."""
        now = self.clock()
        before = f.state if self.store.frame(f.mfn) is not None else None
        if forced_state:
            state = forced_state
        elif xa.startswith("offlined"):
            state = "retired"
        elif xa.startswith("offlining") or kind in ("rolled-back", "pending", "exchanged"):
            state = "pending"
        elif xa == "invalid":
            state = "failed"
        else:
            state = "failed" if kind in ("refused", "failed") else "pending"
        f.state, f.xen_state, f.detail, f.outcome = state, xa, detail, reason
        f.broken = "broken" in xa
        if domid is not None:
            f.domid = domid
        if state == "retired":
            f.retired_time = f.retired_time or now
            f.next_retry = None
            self._retired.add(f.mfn)
        else:
            self._retired.discard(f.mfn)
        if state == "pending":
            f.attempts += 1
            f.next_retry = now + self._backoff(f.attempts)
        self.store.put_frame(f)
        self.store.add_outcome(now, f.mfn, did, action, kind, reason, detail, xb, xa, before,
                               state, domid, data)
        if (before, xb) != (state, xa):
            self.stats.transitions += 1
            self.log("transition", "warning" if state == "failed" else "notice",
                     mfn=f"{f.mfn:#x}", xen=f"{xb}->{xa}", state=f"{before or 'new'}->{state}",
                     action=action, outcome=kind, reason=reason, domid=domid, detail=detail)

    # -- retries and replay ---------------------------------------------------------------
    def retry_due(self, hv, now: float | None = None) -> int:
        """Retry the pending frames whose time has come; returns how many were tried."""
        now = self.clock() if now is None else now
        if not self.enabled:
            return 0
        due = self.store.due(now)
        for f in due:
            self._retry(hv, f)
        return len(due)

    def _retry(self, hv, f: Frame) -> None:
        rc, st = query(hv, f.mfn)
        xs = xen_state(rc, st)
        if rc < 0:
            self._settle(hv, f, "retry", None, xs, xs, None, "refused", "the frame cannot be queried",
                         kind="refused", forced_state="failed")
            return
        if st & S.PG_OFFLINE_STATUS_OFFLINED:
            self._settle(hv, f, "retry", None, xs, xs, None, "freed", "offlined (its owner freed it)",
                         kind="offlined")
            return
        if st & S.PG_OFFLINE_STATUS_BROKEN:
            self._settle(hv, f, "wait", None, xs, xs, None, "broken",
                         "broken, still in use: waiting for its owner to free it", kind="pending")
            return
        if f.outcome in _WAIT_ONLY and xs == "offlining":
            # nothing to redo: Xen offlines the frame when its owner frees it
            self._settle(hv, f, "wait", None, xs, xs, f.domid, f.outcome, f.detail, kind="pending")
            return
        # Never hard on a retry: the frame may be a different guest's memory by now (after a
        # reboot).  Only soft-then-hard may still escalate, after its soft attempts.
        action = Action.SOFT_THEN_HARD if f.action == Action.SOFT_THEN_HARD.value else Action.SOFT
        self.act(hv, f, action, None, f.state)

    def replay(self, hv) -> dict:
        """At start: what was retired is retired again (Xen forgets offlined frames at
        reboot unless ``badpage=`` withheld them); pending frames are retried now."""
        out = {"checked": 0, "still_offlined": 0, "withheld": 0, "retired_again": 0, "pending": 0}
        if not self.enabled:
            self.log("replay-skipped", "warning", reason="page retirement is off")
            return out
        withheld = boot_badpages(hv)
        with self.store.batch():
            now = self.clock()
            for f in self.store.frames(("retired", "pending")):
                out["checked"] += 1
                rc, st = query(hv, f.mfn)
                if rc == 0 and st is not None and st & S.PG_OFFLINE_STATUS_OFFLINED:
                    out["still_offlined"] += 1
                    continue
                if f.mfn in withheld and rc == 0 and st == 0:
                    # Xen kept it out of its heap from boot (badpage=): retired as it is;
                    # offlining it would only mark an unowned page offline-pending
                    out["withheld"] += 1
                    if f.state == "pending":  # e.g. dom0's: now out of everybody's reach
                        xs = xen_state(rc, st)
                        self._settle(hv, f, "soft", None, xs, xs, None, "withheld",
                                     "withheld from Xen's heap at boot (badpage=)",
                                     kind="withheld", forced_state="retired")
                    continue
                if f.state == "pending":
                    f.next_retry = now
                    self.store.put_frame(f)
                    out["pending"] += 1
                    continue
                did = self.store.add_decision(now, f.mfn, "soft", "replay",
                                              "retired before; Xen reports it "
                                              f"{xen_state(rc, st)} (restart or reboot)", None)
                self.act(hv, f, Action.SOFT, did, f.state)
                out["retired_again"] += 1
            self.retry_due(hv, now)
        self.log("replay", "info", **out)
        return out

    # -- status -------------------------------------------------------------------------------
    def status(self) -> dict:
        return status(self.store, self.policy)


def status(store: Store, policy: Policy | None = None) -> dict:
    frames = store.frames()
    by = {s: [f for f in frames if f.state == s] for s in ("retired", "pending", "failed", "accounted")}
    return {
        "enabled": store.switch() and (policy.enabled if policy else True),
        "switch": "on" if store.switch() else "off",
        "policy": policy.to_json() if policy else None,
        "counts": {k: len(v) for k, v in by.items()},
        "memory_retired_kib": 4 * len(by["retired"]),
        "frames": [f.to_json() for f in frames],
        "events": store.counts()["events"],
        "quarantined": store.quarantined(),
        "boot_option": store.boot_option().to_json(),
    }
