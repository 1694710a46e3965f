"""Leaky buckets per frame, DRAM row and bank, and the decisions they lead to.

The bucket is mcelog's (``leaky-bucket.c``), which rasdaemon's page isolation repeats: an
error adds to the count; when at least ``agetime`` has passed since the bucket's timestamp,
``elapsed / agetime * capacity`` errors leak away first and the timestamp moves to now; a
count reaching ``capacity`` overflows (the count moves into ``excess`` and restarts at 0).
mcelog adds ``1 + corrected-error-count`` of the record (the bank's count field covers
errors the hardware corrected without reporting each).  Times are the records' own, so a
log replayed later counts the same, and a clock is injected everywhere else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..abi.mca import McRecord
from .thresholds import Action, Policy, Rate


@dataclass
class Bucket:
    count: int = 0
    excess: int = 0
    tstamp: float | None = None
    total: int = 0

    def age(self, rate: Rate, now: float) -> None:
        if self.tstamp is None:
            self.tstamp = now
            return
        if now < self.tstamp:  # rasdaemon: an older event restarts the window there
            self.tstamp = now
            return
        diff = now - self.tstamp
        if diff >= rate.agetime:
            age = int(diff / rate.agetime * rate.capacity)
            self.count = 0 if age > self.count else self.count - age
            self.tstamp = now
            self.excess = 0

    def account(self, rate: Rate, inc: int, now: float) -> bool:
        """Add ``inc`` errors at ``now``; True when the bucket overflows."""
        if rate.capacity == 0:
            return False
        self.age(rate, now)
        self.count += inc
        self.total += inc
        if self.count >= rate.capacity:
            self.excess += self.count
            self.count = 0
            return True
        return False

    def to_row(self) -> tuple:
        return (self.count, self.excess, self.tstamp, self.total)


def unit_key(unit: str, rec: McRecord) -> str | None:
    """The bucket key of the DRAM row or bank of a record, when its location is decoded."""
    need = ("socketid", "channel", "rank", "bankgroup", "dram_bank")
    if any(getattr(rec, k) is None for k in need):
        return None
    base = (f"s{rec.socketid}.c{rec.channel}.r{rec.rank}.bg{rec.bankgroup}.b{rec.dram_bank}")
    if unit == "bank":
        return "bank:" + base
    if rec.row is None:
        return None
    return f"row:{base}.row{rec.row:#x}"


@dataclass
class Trigger:
    """A bucket overflowed: ``action`` is due for ``mfns`` (the frame; or the frames of the
    row/bank)."""

    unit: str  # page | row | bank
    key: str
    action: Action
    mfns: list[int]
    reason: str
    rate: Rate

    def to_json(self) -> dict:
        return {"unit": self.unit, "key": self.key, "action": self.action.value,
                "mfns": [f"{m:#x}" for m in self.mfns], "reason": self.reason,
                "rate": str(self.rate)}


@dataclass
class Accountant:
    """Counts corrected errors per frame / row / bank.  ``buckets`` (the DRAM rows' and
    banks'), ``unit_frames`` and ``pages`` (every frame's counts and page bucket:
    :class:`~xenpage.ras.pagecounts.PageCounts`) are the state the store persists (so a
    restart does not forget the counts)."""

    policy: Policy
    buckets: dict = field(default_factory=dict)
    unit_frames: dict = field(default_factory=dict)
    dirty: set = field(default_factory=set)
    #: the DRAM address map (simulated hosts): a row/bank key -> every frame of the unit
    expand: object = None
    pages: object = None

    def __post_init__(self) -> None:
        if self.pages is None:
            from .pagecounts import PageCounts
            self.pages = PageCounts()

    def bucket(self, key: str) -> Bucket:
        b = self.buckets.get(key)
        if b is None:
            b = self.buckets[key] = Bucket()
        return b

    def account_ce(self, rec: McRecord, t: float) -> list[Trigger]:
        """Account one corrected-error record; the overflows it causes."""
        p = self.policy
        out: list[Trigger] = []
        if not p.enabled or not rec.has_addr or rec.uncorrected:
            return out
        mfn = rec.mfn
        inc = 1 + rec.corrected_count
        if p.page_action != Action.OFF:
            key = f"page:{mfn:#x}"
            b = self.pages.bucket(mfn)
            hit = b.account(p.page, inc, t)
            self.pages.set_bucket(mfn, b)
            if hit:
                out.append(Trigger("page", key, p.page_action, [mfn],
                                   f"corrected errors on frame {mfn:#x} exceeded {p.page}", p.page))
        for unit, action, rate in (("row", p.row_action, p.row), ("bank", p.bank_action, p.bank)):
            if action == Action.OFF:
                continue
            key = unit_key(unit, rec)
            if key is None:
                continue
            seen = self.unit_frames.setdefault(key, [])
            if mfn not in seen:
                seen.append(mfn)
                self.dirty.add("frames:" + key)
            self.dirty.add(key)
            if self.bucket(key).account(rate, inc, t):
                mfns = list(seen)
                if p.unit_scope == "all" and self.expand is not None:
                    mfns = sorted(set(mfns) | set(self.expand(unit, rec)))
                out.append(Trigger(unit, key, action, mfns,
                                   f"corrected errors in DRAM {unit} {key.split(':', 1)[1]} "
                                   f"exceeded {rate}", rate))
        return out

    def forget(self, mfns) -> None:
        """Drop the counts of these frames (after a DIMM swap)."""
        ms = set(mfns)
        self.pages.forget(sorted(ms))
        for key, seen in list(self.unit_frames.items()):
            kept = [m for m in seen if m not in ms]
            if len(kept) != len(seen):
                self.dirty.add("frames:" + key)
                if kept:
                    self.unit_frames[key] = kept
                else:
                    del self.unit_frames[key]
                    if self.buckets.pop(key, None) is not None:
                        self.dirty.add(key)
