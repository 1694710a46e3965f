"""The retired-page list: SQLite in the state directory (``retired.db``).

It keeps every machine-check event the service saw, every decision (with the event and the
threshold that led to it), every outcome (Xen's state before and after, the toolstack's
typed outcome), the current state of each frame the service acted on, the leaky buckets and
the read position in each source -- so a restart forgets nothing, and a reboot (which makes
Xen forget every offlined frame) is answered by replaying the list.

Frame states:

=========  ==============================================================================
retired    Xen has the frame offlined (or withheld it at boot: ``badpage=``)
pending    decided, not yet offlined: offline-pending in Xen (owner still has it), or an
           exchange to retry; retried with backoff
failed     cannot be retired (Xen's image, not RAM, ...): the reason says why
accounted  the threshold was crossed under ``action = account``: recorded, nothing done
=========  ==============================================================================

Schema 2 (written since the service handles ``/dev/mcelog`` batches column-wise): the
``events`` table has no index on ``mfn`` -- an index keyed by frame is written at random
places, the costliest part of storing a record; what needed it reads ``page_log`` instead --
and every frame's event counts and page leaky bucket
(:class:`~xenpage.ras.pagecounts.PageCounts`) are kept in ``page_log``: each transaction
that changed some appends one row, ``data`` holding the changed frames' rows as
:data:`xenpage.ras.pagecounts.DTYPE` records (``rows`` of them); the last row of a frame wins.
Appending keeps the writes of a batch together at the end of the file.  The log is folded
into one snapshot when it holds more than twice the frames it describes
(:meth:`Store.save_pages`).  A schema-1 list is upgraded when opened, in one transaction
(:meth:`Store._upgrade`).

``badpage=`` (Xen's command line, ``docs/misc/xen-command-line.pandoc``): "List of
[ <integer> | <integer>-<integer> ]", read with ``simple_strtoul(p, &p, 0)`` -- so MFNs are
written in hex *with* ``0x`` (a bare ``3f100`` is not a number to it) -- into a
``char opt_badpage[100]``: at most 99 characters survive.  :meth:`Store.boot_option` writes
ranges, widens them over a few good frames when the list would not fit, and names the frames
it had to leave out.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time as _time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from .. import statefiles
from ..abi.mca import McRecord
from .policy import Bucket

DB_NAME = "retired.db"
SCHEMA_VERSION = 2
#: Xen's opt_badpage[100]
BADPAGE_MAX_CHARS = 99
#: good frames a widened badpage= range may swallow, in all (1 MiB)
BADPAGE_MAX_WASTE = 256

STATES = ("retired", "pending", "failed", "accounted")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY, time REAL, logged REAL, source TEXT, kind TEXT, mfn INTEGER,
    addr INTEGER, status TEXT, count INTEGER, location TEXT, raw TEXT);
CREATE TABLE IF NOT EXISTS decisions(
    id INTEGER PRIMARY KEY, time REAL, mfn INTEGER, action TEXT, trigger TEXT, reason TEXT,
    event_id INTEGER);
CREATE INDEX IF NOT EXISTS decisions_mfn ON decisions(mfn);
CREATE TABLE IF NOT EXISTS outcomes(
    id INTEGER PRIMARY KEY, time REAL, mfn INTEGER, decision_id INTEGER, action TEXT,
    kind TEXT, reason TEXT, detail TEXT, xen_before TEXT, xen_after TEXT, state_before TEXT,
    state_after TEXT, domid INTEGER, data TEXT);
CREATE INDEX IF NOT EXISTS outcomes_mfn ON outcomes(mfn);
CREATE TABLE IF NOT EXISTS frames(
    mfn INTEGER PRIMARY KEY, state TEXT, action TEXT, reason TEXT, detail TEXT,
    xen_state TEXT, broken INTEGER, domid INTEGER, first_time REAL, last_time REAL,
    decided_time REAL, retired_time REAL, attempts INTEGER, next_retry REAL,
    errors INTEGER, uncorrected INTEGER, location TEXT, event_id INTEGER, source TEXT,
    outcome TEXT);
CREATE TABLE IF NOT EXISTS buckets(key TEXT PRIMARY KEY, count INTEGER, excess INTEGER,
    tstamp REAL, total INTEGER);
CREATE TABLE IF NOT EXISTS unit_frames(key TEXT, mfn INTEGER, PRIMARY KEY(key, mfn));
CREATE TABLE IF NOT EXISTS seen(ident TEXT PRIMARY KEY, event_id INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quarantine(id INTEGER PRIMARY KEY, logged REAL, source TEXT,
    reason TEXT, raw TEXT);
CREATE TABLE IF NOT EXISTS page_log(id INTEGER PRIMARY KEY, rows INTEGER, data BLOB);
"""

#: page_log rows a snapshot blob holds at most
_PAGE_CHUNK = 1 << 16


@dataclass
class Frame:
    mfn: int
    state: str = "pending"
    action: str = ""
    reason: str = ""
    detail: str = ""
    xen_state: str = ""
    broken: bool = False
    domid: int | None = None
    first_time: float | None = None
    last_time: float | None = None
    decided_time: float | None = None
    retired_time: float | None = None
    attempts: int = 0
    next_retry: float | None = None
    errors: int = 0
    uncorrected: int = 0
    location: dict = field(default_factory=dict)
    event_id: int | None = None
    source: str = ""
    #: the last outcome's reason code (exchanged, dom0, migration-needed, xen-mce, ...)
    outcome: str = ""

    COLUMNS = ("mfn", "state", "action", "reason", "detail", "xen_state", "broken", "domid",
               "first_time", "last_time", "decided_time", "retired_time", "attempts",
               "next_retry", "errors", "uncorrected", "location", "event_id", "source", "outcome")

    def row(self) -> tuple:
        d = self.__dict__
        return tuple(json.dumps(self.location, sort_keys=True) if c == "location" else
                     int(self.broken) if c == "broken" else d[c] for c in self.COLUMNS)

    @classmethod
    def from_row(cls, r) -> "Frame":
        d = dict(zip(cls.COLUMNS, r))
        d["location"] = json.loads(d["location"] or "{}")
        d["broken"] = bool(d["broken"])
        return cls(**d)

    def to_json(self) -> dict:
        d = asdict(self)
        d["mfn_hex"] = f"{self.mfn:x}"
        return d


@dataclass
class BootOption:
    value: str
    frames: int = 0
    #: good frames inside widened ranges
    widened: int = 0
    #: bad frames that did not fit in Xen's 99 characters
    missing: list[int] = field(default_factory=list)

    @property
    def text(self) -> str:
        return f"badpage={self.value}" if self.value else ""

    def to_json(self) -> dict:
        return {"option": self.text, "value": self.value, "chars": len(self.value),
                "max_chars": BADPAGE_MAX_CHARS, "frames": self.frames, "widened": self.widened,
                "missing": [f"{m:#x}" for m in self.missing]}


def _fmt_run(a: int, b: int) -> str:
    return f"{a:#x}" if a == b else f"{a:#x}-{b:#x}"


def badpage_value(bad: list[int], priority: dict[int, tuple] | None = None,
                  max_chars: int = BADPAGE_MAX_CHARS,
                  max_waste: int = BADPAGE_MAX_WASTE) -> BootOption:
    """A ``badpage=`` value naming every frame of ``bad`` that fits in ``max_chars``:
    exact ranges first; over the limit, the closest neighbours are merged (swallowing at most
    ``max_waste`` good frames in all); still over, the least important runs (by
    ``priority``: larger sorts first) are left out and reported missing."""
    bad = sorted(set(int(m) for m in bad))
    runs: list[list[int]] = []
    for m in bad:
        if runs and m == runs[-1][1] + 1:
            runs[-1][1] = m
        else:
            runs.append([m, m])

    def length(rs) -> int:
        return sum(len(_fmt_run(a, b)) for a, b in rs) + max(0, len(rs) - 1)

    waste = 0
    while length(runs) > max_chars and len(runs) > 1:
        gaps = [(runs[i + 1][0] - runs[i][1] - 1, i) for i in range(len(runs) - 1)]
        gap, i = min(gaps)
        if waste + gap > max_waste:
            break
        waste += gap
        runs[i][1] = runs[i + 1][1]
        del runs[i + 1]
    missing: list[int] = []
    if length(runs) > max_chars:
        pr = priority or {}
        bset = set(bad)

        def score(r):
            ms = [m for m in range(r[0], r[1] + 1) if m in bset]
            return max((pr.get(m, ()) for m in ms), default=())

        order = sorted(range(len(runs)), key=lambda i: (score(runs[i]), -runs[i][0]))
        keep = set(range(len(runs)))
        for i in order:
            if length([runs[j] for j in sorted(keep)]) <= max_chars:
                break
            keep.discard(i)
            missing += [m for m in range(runs[i][0], runs[i][1] + 1) if m in bset]
        runs = [runs[j] for j in sorted(keep)]
    value = ",".join(_fmt_run(a, b) for a, b in runs)
    covered = sum(1 for m in bad if any(a <= m <= b for a, b in runs))
    return BootOption(value, covered, waste, sorted(missing))


class StoreError(Exception):
    """The retired-page list cannot be used as it is (damaged, or from a newer xenpage):
    nothing was changed; the operator decides (``xenpage: <path>: <why>``, exit 2)."""


#: the tables every list written by this schema has
_TABLES = ("meta", "events", "decisions", "outcomes", "frames", "buckets", "unit_frames")


class Store:
    """The SQLite database of the service (``path`` may be ``":memory:"``).  An existing list
    is checked before anything is written to it (:meth:`_check`): damaged or newer ones
    raise :class:`StoreError`."""

    def __init__(self, path: str | Path = ":memory:"):
        self.path = str(path)
        self._depth = 0
        try:
            if self.path != ":memory:":
                statefiles.state_dir(Path(self.path).parent)
                if not os.path.lexists(self.path):  # 0600 from the start (its -wal/-shm too)
                    statefiles.open_private(self.path, "a").close()
                elif os.path.islink(self.path):
                    raise StoreError(f"{self.path}: a symbolic link: refused")
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            self.db.execute("PRAGMA busy_timeout=30000")
            self._check()
            if self.path != ":memory:":
                self.db.execute("PRAGMA journal_mode=WAL")
            # Durability (see _durable): WAL with synchronous=NORMAL never damages the file
            # and a committed transaction survives the process (kill -9: it is in the WAL);
            # a power loss may undo the last transactions.  For events, identities and
            # counts that is the price of not syncing every poll -- the machine loses the
            # driver's log and its RAM then too, and mcelog keeps its buckets in memory
            # only.  A transaction that decided, acted or changed the list (frames,
            # decisions, outcomes, the switch, the boot option) is synced when it commits,
            # as synchronous=FULL would: a frame Xen offlined is never forgotten.
            self.db.execute("PRAGMA synchronous=NORMAL")
            #: the open transaction wrote something that must survive a power loss
            self._sync = False
            self.db.executescript(_SCHEMA)
            if self.meta("schema") is None:
                self.set_meta("schema", str(SCHEMA_VERSION))
            elif self.meta("schema") == "1":
                self._upgrade()
            #: page_log rows since its last snapshot, as far as this process knows
            self._page_log_rows = 0
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: not a usable retired-page list ({e}); nothing was "
                             "changed -- move it away to start a new list") from None
        except OSError as e:  # the file, or the state directory it should be in
            raise StoreError(f"{e.filename or self.path}: {e.strerror or e}") from None

    def _check(self) -> None:
        """An existing list: readable by SQLite, every table there, a schema this xenpage
        knows, its JSON columns parseable."""
        names = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not names:
            return  # a new list
        ok = self.db.execute("PRAGMA quick_check").fetchone()[0]
        if ok != "ok":
            raise StoreError(f"{self.path}: damaged ({ok}); nothing was changed")
        if "meta" not in names:
            raise StoreError(f"{self.path}: not a retired-page list (no meta table); nothing was changed")
        v = self.meta("schema")
        try:
            ver = int(v) if v is not None else None
        except ValueError:
            ver = -1
        if ver is None or ver < 1:
            raise StoreError(f"{self.path}: damaged (schema version {v!r}); nothing was changed")
        if ver > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: written by a newer xenpage (schema {ver}; this one "
                             f"reads {SCHEMA_VERSION}); nothing was changed")
        missing = [t for t in _TABLES + (("page_log",) if ver >= 2 else ()) if t not in names]
        if missing:
            raise StoreError(f"{self.path}: damaged (table {', '.join(missing)} missing); "
                             "nothing was changed")
        bad = self.db.execute("SELECT mfn FROM frames WHERE location IS NOT NULL AND "
                              "json_valid(location) = 0 LIMIT 1").fetchone()
        if bad is None:
            bad = self.db.execute("SELECT key FROM meta WHERE (key LIKE 'source:%' OR "
                                  "key = 'boot_option') AND json_valid(value) = 0 LIMIT 1").fetchone()
        if bad is not None:
            raise StoreError(f"{self.path}: damaged (bad JSON in {bad[0]!r}); nothing was changed")

    def _upgrade(self) -> None:
        """Schema 1 -> 2, in one transaction: the index on ``events.mfn`` goes; every frame's
        event counts (from ``events``) and page bucket (from ``buckets``' ``page:`` keys)
        become ``page_log``'s first snapshot."""
        from .pagecounts import PageCounts
        with self.batch():
            self.db.execute("DROP INDEX IF EXISTS events_mfn")
            counts = {m: (ce, uc) for m, ce, uc in self.db.execute(
                "SELECT mfn, SUM(kind='ce'), SUM(kind='uc') FROM events WHERE mfn IS NOT NULL "
                "GROUP BY mfn")}
            pages = PageCounts()
            for m, (ce, uc) in sorted(counts.items()):
                s = int(pages.slots([m])[0])
                pages._a["ce"][s], pages._a["uc"][s] = ce, uc
            for k, c, e, ts, tot in self.db.execute(
                    "SELECT key, count, excess, tstamp, total FROM buckets WHERE key LIKE 'page:%'"):
                pages.set_bucket(int(k[len("page:"):], 16), Bucket(c, e, ts, tot))
            self.db.execute("DELETE FROM buckets WHERE key LIKE 'page:%'")
            self.db.execute("DELETE FROM page_log")
            self._write_pages(pages.rows())
            self.set_meta("schema", str(SCHEMA_VERSION))

    @classmethod
    def in_state_dir(cls, state_dir: str | Path) -> "Store":
        return cls(Path(state_dir) / DB_NAME)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def batch(self) -> Iterator["Store"]:
        """One transaction (nested calls join the outer one)."""
        if self._depth == 0:
            self.db.execute("BEGIN IMMEDIATE")
        self._depth += 1
        try:
            yield self
        except BaseException:
            self._depth -= 1
            if self._depth == 0:
                self._sync = False
                self.db.execute("ROLLBACK")
            raise
        self._depth -= 1
        if self._depth == 0:
            self.db.execute("COMMIT")
            if self._sync:
                self._sync = False
                self._fsync_wal()

    def _durable(self) -> None:
        """What was just written must survive a power loss: synced when its transaction
        commits (at once outside one)."""
        if self._depth:
            self._sync = True
        else:
            self._fsync_wal()

    def _fsync_wal(self) -> None:
        """``fsync`` the write-ahead log: what synchronous=FULL does at a commit in WAL mode
        (a checkpoint since then has synced the database file itself)."""
        if self.path == ":memory:":
            return
        try:
            fd = os.open(self.path + "-wal", os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- meta -------------------------------------------------------------------------------
    def meta(self, key: str, default: str | None = None) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return r[0] if r else default

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    def switch(self) -> bool:
        """The global off switch (persistent; a running service reads it every batch)."""
        return self.meta("enabled", "1") == "1"

    def set_switch(self, on: bool) -> None:
        self.set_meta("enabled", "1" if on else "0")
        self._durable()

    # -- events, decisions, outcomes ------------------------------------------------------
    @staticmethod
    def event_row(rec: McRecord, logged: float) -> tuple:
        """The ``events`` row of a record (without its id)."""
        loc = rec.location()
        # json.dumps(loc, sort_keys=True), spelt out: the values are integers
        text = "{" + ", ".join(f'"{k}": {loc[k]}' for k in sorted(loc)) + "}" if loc else "{}"
        return (rec.time, logged, rec.source, rec.kind(), rec.mfn, rec.addr, f"{rec.status:#x}",
                1 + rec.corrected_count, text, rec.raw[:2000] if rec.raw else None)

    def add_event(self, rec: McRecord, logged: float) -> int:
        cur = self.db.execute(
            "INSERT INTO events(time, logged, source, kind, mfn, addr, status, count, location, raw)"
            " VALUES(?,?,?,?,?,?,?,?,?,?)", self.event_row(rec, logged))
        return int(cur.lastrowid)

    def next_event_id(self) -> int:
        return int(self.db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM events").fetchone()[0])

    def add_events(self, rows: list[tuple]) -> None:
        """Events with their ids (``(id, *event_row)``), in one statement."""
        self.db.executemany(
            "INSERT INTO events(id, time, logged, source, kind, mfn, addr, status, count, "
            "location, raw) VALUES(?,?,?,?,?,?,?,?,?,?,?)", rows)

    def add_events_untimed(self, rows: list[tuple]) -> None:
        """Events with no time of their own and no raw text (``/dev/mcelog``'s): rows
        ``(id, logged, source, kind, mfn, addr, status, count, location)``; binding the two
        NULLs costs more than the rest of such a row."""
        self.db.executemany(
            "INSERT INTO events(id, logged, source, kind, mfn, addr, status, count, location) "
            "VALUES(?,?,?,?,?,?,?,?,?)", rows)

    def add_seen(self, pairs: list[tuple[str, int]]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO seen(ident, event_id) VALUES(?, ?)", pairs)

    def seen_among(self, idents: set[str]) -> dict[str, int]:
        """Which of these machine checks were handled before, and as which event."""
        ids = list(idents)
        if not ids:
            return {}
        # none of the list's identities lies between the lowest and the highest of these (the
        # usual case: identities begin with the time and the TSC): nothing to look up.  Python
        # orders str by code point, SQLite TEXT by UTF-8 bytes: the same order.
        if self.db.execute("SELECT 1 FROM seen WHERE ident BETWEEN ? AND ? LIMIT 1",
                           (min(ids), max(ids))).fetchone() is None:
            return {}
        if any("\x00" in i for i in ids):
            # SQLite's JSON text ends at an escaped NUL (json_each yields "a" for "a\u0000b"):
            # such identities are looked up as bound parameters, which keep every byte.
            out: dict[str, int] = {}
            for k in range(0, len(ids), 500):
                part = ids[k:k + 500]
                out.update(self.db.execute(
                    "SELECT ident, event_id FROM seen WHERE ident IN (%s)" % ",".join("?" * len(part)),
                    part).fetchall())
            return out
        return dict(self.db.execute(
            "SELECT s.ident, s.event_id FROM json_each(?) j JOIN seen s ON s.ident = j.value",
            (json.dumps(ids),)).fetchall())

    def count_errors(self, counts: dict[int, list]) -> None:
        """Corrected errors on frames of the list: ``{mfn: [count, last time]}``."""
        self.db.executemany("UPDATE frames SET errors=errors+?, last_time=? WHERE mfn=?",
                            [(c, t, m) for m, (c, t) in counts.items()])

    def count_errors_many(self, rows) -> None:
        """Corrected errors on frames of the list: ``(count, last time, mfn)`` rows."""
        self.db.executemany("UPDATE frames SET errors=errors+?, last_time=? WHERE mfn=?", rows)

    def listed_mfns(self) -> list[int]:
        """The frames of the list (any state)."""
        return [r[0] for r in self.db.execute("SELECT mfn FROM frames")]

    def frames_in_states(self, mfns: list[int], states: tuple[str, ...]) -> list[int]:
        """Which of these frames the list holds in one of these states."""
        out: list[int] = []
        for i in range(0, len(mfns), 500):
            part = mfns[i:i + 500]
            out += [r[0] for r in self.db.execute(
                "SELECT mfn FROM frames WHERE state IN (" + ",".join("?" * len(states))
                + ") AND mfn IN (" + ",".join("?" * len(part)) + ")", (*states, *part))]
        return out

    def frame_state(self, mfn: int) -> str | None:
        r = self.db.execute("SELECT state FROM frames WHERE mfn=?", (mfn,)).fetchone()
        return r[0] if r else None

    def count_error(self, mfn: int, t: float, uncorrected: bool = False) -> bool:
        """One more error on a frame of the list (its counts and last time); False when the
        frame is not in the list."""
        col = "uncorrected" if uncorrected else "errors"
        return self.db.execute(f"UPDATE frames SET last_time=?, {col}={col}+1 WHERE mfn=?",
                               (t, mfn)).rowcount > 0

    def seen(self, ident: str, event_id: int) -> bool:
        """Record that the machine check ``ident`` (:meth:`McRecord.identity`) was handled
        as event ``event_id``; False when it had been already (a replay, or the same record
        from a second source)."""
        cur = self.db.execute("INSERT OR IGNORE INTO seen(ident, event_id) VALUES(?, ?)",
                              (ident, event_id))
        return cur.rowcount == 0

    def first_seen(self, ident: str) -> int | None:
        """The event a machine check was first handled as, or None."""
        r = self.db.execute("SELECT event_id FROM seen WHERE ident=?", (ident,)).fetchone()
        return r[0] if r else None

    def add_quarantined(self, rec: McRecord, logged: float, reason: str) -> int:
        """A record that cannot be used or stored: kept (source, why, its text), never acted on."""
        raw = rec.raw if rec.raw else repr(rec)
        cur = self.db.execute("INSERT INTO quarantine(logged, source, reason, raw) VALUES(?,?,?,?)",
                              (logged, rec.source[:500], reason[:500], raw[:2000]))
        return int(cur.lastrowid)

    def quarantined(self) -> list[dict]:
        return [{"id": r[0], "logged": r[1], "source": r[2], "reason": r[3], "raw": r[4]}
                for r in self.db.execute("SELECT id, logged, source, reason, raw FROM quarantine ORDER BY id")]

    def add_decision(self, t: float, mfn: int, action: str, trigger: str, reason: str,
                     event_id: int | None) -> int:
        cur = self.db.execute(
            "INSERT INTO decisions(time, mfn, action, trigger, reason, event_id) VALUES(?,?,?,?,?,?)",
            (t, mfn, action, trigger, reason, event_id))
        self._durable()
        return int(cur.lastrowid)

    def add_outcome(self, t: float, mfn: int, decision_id: int | None, action: str, kind: str,
                    reason: str, detail: str, xen_before: str, xen_after: str,
                    state_before: str | None, state_after: str, domid: int | None,
                    data: dict | None = None) -> int:
        cur = self.db.execute(
            "INSERT INTO outcomes(time, mfn, decision_id, action, kind, reason, detail, xen_before,"
            " xen_after, state_before, state_after, domid, data) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (t, mfn, decision_id, action, kind, reason, detail, xen_before, xen_after,
             state_before, state_after, domid, json.dumps(data or {}, default=str)))
        self._durable()
        return int(cur.lastrowid)

    def history(self, mfn: int) -> dict:
        q = self.db.execute
        return {
            "events": [dict(zip(("id", "time", "source", "kind", "count"), r)) for r in
                       q("SELECT id, time, source, kind, count FROM events WHERE mfn=? ORDER BY id",
                         (mfn,))],
            "decisions": [dict(zip(("id", "time", "action", "trigger", "reason", "event_id"), r))
                          for r in q("SELECT id, time, action, trigger, reason, event_id FROM "
                                     "decisions WHERE mfn=? ORDER BY id", (mfn,))],
            "outcomes": [dict(zip(("id", "time", "decision_id", "action", "kind", "reason", "detail",
                                   "xen_before", "xen_after", "state_before", "state_after"), r))
                         for r in q("SELECT id, time, decision_id, action, kind, reason, detail, "
                                    "xen_before, xen_after, state_before, state_after FROM outcomes "
                                    "WHERE mfn=? ORDER BY id", (mfn,))],
        }

    def counts(self) -> dict:
        q = self.db.execute
        ev = dict(q("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())
        st = dict(q("SELECT state, COUNT(*) FROM frames GROUP BY state").fetchall())
        return {"events": ev, "frames": {s: st.get(s, 0) for s in STATES},
                "decisions": q("SELECT COUNT(*) FROM decisions").fetchone()[0],
                "quarantined": q("SELECT COUNT(*) FROM quarantine").fetchone()[0]}

    def event_counts(self, mfn: int) -> tuple[int, int]:
        """(corrected, uncorrected) events recorded for a frame: read from ``events`` (a scan:
        schema 2 has no index on ``mfn``; the service keeps these counts in
        :class:`~xenpage.ras.pagecounts.PageCounts`)."""
        r = self.db.execute("SELECT COALESCE(SUM(kind='ce'), 0), COALESCE(SUM(kind='uc'), 0) "
                            "FROM events WHERE mfn=?", (mfn,)).fetchone()
        return int(r[0]), int(r[1])

    def error_frames(self) -> list[tuple[int, int, int]]:
        """(mfn, corrected, uncorrected) of every frame with an event (a scan of ``events``)."""
        return [tuple(r) for r in self.db.execute(
            "SELECT mfn, SUM(kind='ce'), SUM(kind='uc') FROM events WHERE mfn IS NOT NULL "
            "GROUP BY mfn ORDER BY mfn")]

    # -- frames ---------------------------------------------------------------------------
    def frame(self, mfn: int) -> Frame | None:
        r = self.db.execute(f"SELECT {', '.join(Frame.COLUMNS)} FROM frames WHERE mfn=?",
                            (mfn,)).fetchone()
        return Frame.from_row(r) if r else None

    def put_frame(self, f: Frame) -> None:
        self.db.execute(f"INSERT OR REPLACE INTO frames({', '.join(Frame.COLUMNS)}) VALUES("
                        + ",".join("?" * len(Frame.COLUMNS)) + ")", f.row())
        self._durable()

    def frames(self, states: tuple[str, ...] | None = None) -> list[Frame]:
        sql = f"SELECT {', '.join(Frame.COLUMNS)} FROM frames"
        args: tuple = ()
        if states:
            sql += " WHERE state IN (" + ",".join("?" * len(states)) + ")"
            args = tuple(states)
        return [Frame.from_row(r) for r in self.db.execute(sql + " ORDER BY mfn", args)]

    def due(self, now: float) -> list[Frame]:
        return [Frame.from_row(r) for r in self.db.execute(
            f"SELECT {', '.join(Frame.COLUMNS)} FROM frames WHERE state='pending' AND "
            "(next_retry IS NULL OR next_retry <= ?) ORDER BY next_retry, mfn", (now,))]

    def next_due(self) -> float | None:
        r = self.db.execute("SELECT MIN(next_retry) FROM frames WHERE state='pending'").fetchone()
        return r[0] if r else None

    def clear(self, mfns: list[int] | None, t: float, reason: str) -> list[int]:
        """Forget frames (all when ``mfns`` is None): after a DIMM swap.  The history stays;
        a ``clear`` decision is recorded per frame."""
        with self.batch():
            if mfns is None:
                mfns = [r[0] for r in self.db.execute("SELECT mfn FROM frames ORDER BY mfn")]
            gone = []
            for m in mfns:
                if self.db.execute("DELETE FROM frames WHERE mfn=?", (m,)).rowcount:
                    gone.append(m)
                    self.add_decision(t, m, "clear", "operator", reason, None)
            return gone

    # -- buckets ----------------------------------------------------------------------------
    def load_buckets(self) -> tuple[dict, dict]:
        b = {k: Bucket(c, e, ts, tot) for k, c, e, ts, tot in
             self.db.execute("SELECT key, count, excess, tstamp, total FROM buckets")}
        uf: dict[str, list[int]] = {}
        for k, m in self.db.execute("SELECT key, mfn FROM unit_frames ORDER BY rowid"):
            uf.setdefault(k, []).append(m)
        return b, uf

    def save_buckets(self, buckets: dict, unit_frames: dict, dirty: set) -> None:
        put, gone = [], []
        get = buckets.get
        for k in dirty:
            b = get(k)
            if b is not None:
                put.append((k, b.count, b.excess, b.tstamp, b.total))  # Bucket.to_row()
            elif k.startswith("frames:"):
                key = k[len("frames:"):]
                self.db.execute("DELETE FROM unit_frames WHERE key=?", (key,))
                self.db.executemany("INSERT OR IGNORE INTO unit_frames(key, mfn) VALUES(?,?)",
                                    [(key, m) for m in unit_frames.get(key, [])])
            else:
                gone.append((k,))
        if gone:
            self.db.executemany("DELETE FROM buckets WHERE key=?", gone)
        if put:
            self.db.executemany("INSERT OR REPLACE INTO buckets(key, count, excess, tstamp, total)"
                                " VALUES(?,?,?,?,?)", put)
        dirty.clear()

    # -- per-frame counts and page buckets (page_log) ---------------------------------------
    def load_pages(self) -> PageCounts:
        """Every frame's event counts and page bucket, as the log holds them."""
        import numpy as np
        from .pagecounts import DTYPE as PAGE_DTYPE, PageCounts
        parts = [np.frombuffer(d, PAGE_DTYPE) for (d,) in
                 self.db.execute("SELECT data FROM page_log ORDER BY id")]
        self._page_log_rows = sum(len(p) for p in parts)
        return PageCounts.from_log(parts)

    def _write_pages(self, rows) -> None:
        import numpy as np
        for i in range(0, len(rows), _PAGE_CHUNK):
            part = np.ascontiguousarray(rows[i:i + _PAGE_CHUNK])
            self.db.execute("INSERT INTO page_log(rows, data) VALUES(?, ?)",
                            (len(part), part.tobytes()))

    def save_pages(self, pages: PageCounts) -> None:
        """Append the rows ``pages`` changed since it was last saved (one ``page_log`` row);
        a log holding more than twice the frames it describes is folded into a snapshot of
        what it holds (the log's own rows, not ``pages``: what another process appended
        stays), in the same transaction."""
        ch = pages.changes()
        if not len(ch):
            return
        self._write_pages(ch)
        self._page_log_rows += len(ch)
        if self._page_log_rows > 2 * len(pages) + _PAGE_CHUNK:
            folded = self.load_pages().rows()
            self.db.execute("DELETE FROM page_log")
            self._write_pages(folded)
            self._page_log_rows = len(folded)

    # -- sources ----------------------------------------------------------------------------
    def source_position(self, name: str) -> dict:
        v = self.meta("source:" + name)
        return json.loads(v) if v else {}

    def set_source_position(self, name: str, pos: dict) -> None:
        self.set_meta("source:" + name, json.dumps(pos, sort_keys=True))

    # -- Xen's command line -----------------------------------------------------------------
    def bad_frames(self) -> list[Frame]:
        """Frames Xen should never hand out again: retired and pending ones."""
        return self.frames(("retired", "pending"))

    def boot_option(self, max_chars: int = BADPAGE_MAX_CHARS) -> BootOption:
        """Xen's ``badpage=`` for the list as it is now (computed: reading writes nothing)."""
        fr = self.bad_frames()
        prio = {f.mfn: (int(f.broken), f.uncorrected, f.errors) for f in fr}
        return badpage_value([f.mfn for f in fr], prio, max_chars)

    def record_boot_option(self, value: str) -> None:
        """The ``badpage=`` value Xen was booted with (written by what boots it: the
        simulator's ``host reboot``)."""
        self.set_meta("boot_option", json.dumps({"value": value, "time": _time.time()}))
        self._durable()

    def last_boot_option(self) -> str:
        """The ``badpage=`` value of the last recorded boot; with none recorded, the list's
        own value (what a boot from ``badpages --boot-option`` was given)."""
        v = self.meta("boot_option")
        return json.loads(v)["value"] if v else self.boot_option().value
