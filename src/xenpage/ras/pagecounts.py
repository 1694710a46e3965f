"""Per-frame error counts and mcelog's page leaky buckets, as numpy columns.

One row per frame that ever had a stored machine-check event with an address: how many
corrected (``ce``) and uncorrected (``uc``) events the list holds for it, and the state of
its page bucket (:class:`~xenpage.ras.policy.Bucket`: ``count``, ``excess``, ``tstamp`` --
NaN for a bucket never accounted, mcelog's unset time stamp -- and ``total``).  A frame
whose bucket was never accounted has the bucket ``Bucket()``.

The service accounts a whole batch of corrected errors at once (:meth:`PageCounts.account`):
mcelog's ``__bucket_account`` applied to each record in order, computed column-wise -- one
numpy step per *occurrence rank* (a frame's first record in the batch, its second, ...), so
the frames of one step are distinct and a storm on one frame costs one step per record of
it, never one per record of the batch.  The outcome is the same, value for value, as
:meth:`Bucket.account` record by record (a test holds them together).

Rows are found through a dict from MFN to row (C-level lookups: ``map`` over the batch's
MFNs), so a new frame is appended, never inserted.  Rows changed since the last
:meth:`changes` are marked; the store appends them to its log (:mod:`.store`).
"""

from __future__ import annotations

from itertools import compress, repeat

import numpy as np

from .policy import Bucket
from .thresholds import Rate

#: one row of the table, as the store keeps it (little-endian, fixed layout)
DTYPE = np.dtype([("mfn", "<u8"), ("ce", "<i8"), ("uc", "<i8"), ("count", "<i8"),
                  ("excess", "<i8"), ("tstamp", "<f8"), ("total", "<i8")])

#: an aged-away count larger than any count the bucket can hold (capacities stay below 2^62)
_AGE_MAX = float(1 << 62)


class PageCounts:
    """The per-frame table (see the module docstring)."""

    def __init__(self, rows: np.ndarray | None = None):
        n = 0 if rows is None else len(rows)
        self._a = np.zeros(max(1024, 2 * n), DTYPE)
        self._a["tstamp"] = np.nan
        #: the rows changed since the last changes(): arrays of row numbers (repeats allowed)
        self._dirty: list = []
        self.n = 0
        self.slot: dict[int, int] = {}
        if n:
            self._a[:n] = rows
            self.n = n
            self.slot = dict(zip(rows["mfn"].tolist(), range(n)))

    @classmethod
    def from_log(cls, parts: list[np.ndarray]) -> "PageCounts":
        """The table from its log: rows in the order written, the last one of a frame wins."""
        if not parts:
            return cls()
        rows = np.concatenate(parts)
        rev = rows[::-1]
        _, first = np.unique(rev["mfn"], return_index=True)
        return cls(rev[first])  # sorted by MFN

    def __len__(self) -> int:
        return self.n

    def rows(self) -> np.ndarray:
        """Every row, sorted by MFN (a copy)."""
        a = self._a[:self.n]
        return a[np.argsort(a["mfn"], kind="stable")]

    def changes(self) -> np.ndarray:
        """The rows changed since the last call, sorted by MFN; the marks are cleared."""
        if not self._dirty:
            return self._a[:0].copy()
        idx = np.unique(np.concatenate(self._dirty))
        self._dirty = []
        out = self._a[idx]
        return out[np.argsort(out["mfn"], kind="stable")]

    # -- rows -------------------------------------------------------------------------------
    def _grow(self, need: int) -> None:
        if need <= len(self._a):
            return
        a = np.zeros(max(need, 2 * len(self._a)), DTYPE)
        a["tstamp"] = np.nan
        a[:self.n] = self._a[:self.n]
        self._a = a

    def slots(self, mfns: list[int]) -> np.ndarray:
        """The rows of these frames (new rows for frames not in the table, in order)."""
        get = self.slot.get
        s = np.fromiter(map(get, mfns, repeat(-1)), np.int64, len(mfns))
        miss = s < 0
        if miss.any():
            ml = miss.tolist()
            new = list(dict.fromkeys(compress(mfns, ml)))
            n0 = self.n
            k = int(miss.sum())
            self._grow(n0 + len(new))
            self._a["mfn"][n0:n0 + len(new)] = new
            self.slot.update(zip(new, range(n0, n0 + len(new))))
            self.n = n0 + len(new)
            if len(new) == k:       # each new frame once: rows in order
                s[miss] = np.arange(n0, n0 + k)
            else:
                s[miss] = np.fromiter(map(self.slot.__getitem__, compress(mfns, ml)),
                                      np.int64, k)
        return s

    def find(self, mfn: int) -> int | None:
        return self.slot.get(mfn)

    # -- events -----------------------------------------------------------------------------
    def events(self, mfn: int) -> tuple[int, int]:
        """(corrected, uncorrected) events the list holds for the frame."""
        s = self.slot.get(mfn)
        if s is None:
            return 0, 0
        r = self._a[s]
        return int(r["ce"]), int(r["uc"])

    def count_event(self, mfn: int, kind: str) -> None:
        """One more stored event (``ce`` or ``uc``) on the frame."""
        s = int(self.slots([mfn])[0])
        self._a[kind][s] += 1
        self._dirty.append(np.array([s], np.int64))

    def count_ce(self, slots: np.ndarray) -> None:
        """One more corrected event per entry of ``slots`` (repeats add up)."""
        if len(slots):
            np.add.at(self._a["ce"], slots, 1)
            self._dirty.append(slots)

    def row_of(self, mfn: int) -> np.void | None:
        """A copy of the frame's row (None: no row), for :meth:`restore`."""
        s = self.slot.get(mfn)
        return None if s is None else self._a[s].copy()

    def restore(self, mfn: int, row: np.void | None) -> None:
        """Put back what :meth:`row_of` gave (counts and bucket as they were)."""
        s = int(self.slots([mfn])[0])
        if row is None:
            row = np.zeros((), DTYPE)
            row["mfn"], row["tstamp"] = mfn, np.nan
        self._a[s] = row
        self._dirty.append(np.array([s], np.int64))

    # -- buckets ----------------------------------------------------------------------------
    def bucket(self, mfn: int) -> Bucket:
        """The frame's page bucket (a copy; ``Bucket()`` for one never accounted)."""
        s = self.slot.get(mfn)
        if s is None:
            return Bucket()
        r = self._a[s]
        ts = float(r["tstamp"])
        return Bucket(int(r["count"]), int(r["excess"]), None if ts != ts else ts, int(r["total"]))

    def set_bucket(self, mfn: int, b: Bucket) -> None:
        s = int(self.slots([mfn])[0])
        a = self._a
        a["count"][s], a["excess"][s], a["total"][s] = b.count, b.excess, b.total
        a["tstamp"][s] = np.nan if b.tstamp is None else b.tstamp
        self._dirty.append(np.array([s], np.int64))

    def buckets(self) -> dict[int, Bucket]:
        """Every page bucket ever accounted, by frame."""
        a = self._a[:self.n]
        return {int(m): self.bucket(int(m)) for m in a["mfn"][~np.isnan(a["tstamp"])].tolist()}

    def forget(self, mfns) -> None:
        """Drop the buckets of these frames (their event counts stay: the events do)."""
        for m in mfns:
            s = self.slot.get(m)
            if s is not None:
                for k in ("count", "excess", "total"):
                    self._a[k][s] = 0
                self._a["tstamp"][s] = np.nan
                self._dirty.append(np.array([s], np.int64))

    def account(self, slots: np.ndarray, incs: np.ndarray, times: np.ndarray,
                rate: Rate) -> np.ndarray:
        """``Bucket.account(rate, inc, t)`` for each record in order (``slots[i]``,
        ``incs[i]``, ``times[i]``); True where the bucket overflowed."""
        k = len(slots)
        over = np.zeros(k, bool)
        if k == 0 or rate.capacity == 0:
            return over
        order = np.argsort(slots, kind="stable")
        ss = slots[order]
        head = np.ones(k, bool)
        head[1:] = ss[1:] != ss[:-1]
        starts = np.flatnonzero(head)
        rank = np.arange(k) - np.repeat(starts, np.diff(np.append(starts, k)))
        a = self._a
        cap, agetime = rate.capacity, rate.agetime
        for r in range(int(rank.max()) + 1):
            pos = order[rank == r] if r or len(starts) != k else order
            s = slots[pos]
            t = times[pos]
            ts0 = a["tstamp"][s]
            c = a["count"][s]
            e = a["excess"][s]
            fresh = np.isnan(ts0)
            with np.errstate(invalid="ignore"):
                older = t < ts0                          # an older event restarts the window
                diff = t - ts0
                aging = ~fresh & ~older & (diff >= agetime)
            if aging.any():
                age_f = np.zeros(len(s))
                age_f[aging] = np.minimum(diff[aging] / agetime * cap, _AGE_MAX)
                age = age_f.astype(np.int64)
                c = np.where(aging, np.where(age > c, 0, c - age), c)
                e = np.where(aging, 0, e)
            ts1 = np.where(fresh | older | aging, t, ts0)
            c = c + incs[pos]
            hit = c >= cap
            e = np.where(hit, e + c, e)
            a["count"][s] = np.where(hit, 0, c)
            a["excess"][s] = e
            a["tstamp"][s] = ts1
            a["total"][s] += incs[pos]
            over[pos] = hit
        self._dirty.append(slots)
        return over
