"""Per-frame counts and page leaky buckets as numpy columns (``xenpage.ras.pagecounts``):
the column-wise accounting of a batch against mcelog's bucket (``Bucket.account``) record by
record -- repeats of a frame in one batch, records older than the bucket's time stamp, long
gaps that age the count away, capacities from 1 up -- and the table's log (last row of a
frame wins), ``forget`` and ``row_of``/``restore``."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from xenpage.ras.pagecounts import DTYPE, PageCounts
from xenpage.ras.policy import Bucket
from xenpage.ras.thresholds import Rate

RATES = st.sampled_from([Rate(1, 86400), Rate(2, 86400), Rate(3, 60), Rate(10, 3600),
                         Rate(50, 86400), Rate(7, 1)])
RECORDS = st.lists(st.tuples(st.sampled_from([0x10, 0x11, 0x12, 0x3F100, 1 << 39]),
                             st.integers(1, 4),
                             st.one_of(st.integers(0, 400_000).map(float),
                                       st.integers(0, 40).map(lambda k: k * 30.0),
                                       st.integers(0, 20).map(lambda k: k * 43200.0),
                                       st.floats(0, 1e10, allow_nan=False))),
                   max_size=60)


def _scalar(batches, rate):
    buckets: dict[int, Bucket] = {}
    over = []
    for recs in batches:
        for m, inc, t in recs:
            over.append(buckets.setdefault(m, Bucket()).account(rate, inc, t))
    return buckets, over


@settings(max_examples=150, deadline=None)
@given(st.lists(RECORDS, min_size=1, max_size=4), RATES)
def test_column_wise_accounting_equals_mcelogs_bucket(batches, rate):
    pc = PageCounts()
    over = []
    for recs in batches:
        if not recs:
            continue
        mfns = [m for m, _, _ in recs]
        slots = pc.slots(mfns)
        o = pc.account(slots, np.array([i for _, i, _ in recs], np.int64),
                       np.array([t for _, _, t in recs], np.float64), rate)
        over += o.tolist()
    buckets, want = _scalar(batches, rate)
    assert over == want
    assert pc.buckets() == buckets
    for m, b in buckets.items():
        assert pc.bucket(m) == b


def test_the_log_keeps_the_last_row_of_a_frame():
    pc = PageCounts()
    pc.count_event(0x10, "ce")
    pc.count_event(0x20, "uc")
    first = pc.changes()
    assert first["mfn"].tolist() == [0x10, 0x20] and len(pc.changes()) == 0
    pc.set_bucket(0x10, Bucket(1, 0, 5.0, 1))
    second = pc.changes()
    back = PageCounts.from_log([first, second])
    assert back.events(0x10) == (1, 0) and back.events(0x20) == (0, 1)
    assert back.bucket(0x10) == Bucket(1, 0, 5.0, 1) and back.bucket(0x20) == Bucket()
    assert back.rows().tobytes() == pc.rows().tobytes()


def test_forget_drops_the_bucket_keeps_the_event_counts():
    pc = PageCounts()
    pc.count_event(0x10, "ce")
    pc.set_bucket(0x10, Bucket(1, 2, 3.0, 4))
    pc.forget([0x10, 0x99])
    assert pc.bucket(0x10) == Bucket() and pc.events(0x10) == (1, 0) and pc.find(0x99) is None


def test_restore_puts_back_the_row():
    pc = PageCounts()
    pc.count_event(0x10, "ce")
    row = pc.row_of(0x10)
    pc.count_event(0x10, "ce")
    pc.set_bucket(0x10, Bucket(1, 0, 9.0, 1))
    pc.restore(0x10, row)
    assert pc.events(0x10) == (1, 0) and pc.bucket(0x10) == Bucket()
    pc.restore(0x30, None)
    assert pc.events(0x30) == (0, 0) and pc.bucket(0x30) == Bucket()


def test_the_table_grows_past_its_first_size():
    pc = PageCounts()
    mfns = list(range(5000, 0, -1))
    s = pc.slots(mfns)
    assert len(pc) == 5000 and len(set(s.tolist())) == 5000
    pc.count_ce(s)
    pc.count_ce(s[:10])
    assert pc.events(5000) == (2, 0) and pc.events(1) == (1, 0)
    assert pc.rows().dtype == DTYPE and pc.rows()["mfn"].tolist() == sorted(mfns)


def test_a_window_that_has_just_passed_ages_the_count():
    """``elapsed >= agetime`` ages (mcelog's ``bucket_age``): 2 / 24h, errors exactly 24h apart
    never overflow; 1 s less and they do -- in one batch and across two."""
    rate = Rate(2, 86400)
    for times, want in (([0.0, 86400.0], [False, False]), ([0.0, 86399.0], [False, True])):
        pc = PageCounts()
        s = pc.slots([0x10, 0x10])
        assert pc.account(s, np.array([1, 1]), np.array(times), rate).tolist() == want
        assert _scalar([[(0x10, 1, t) for t in times]], rate)[1] == want
        pc = PageCounts()
        got = [pc.account(pc.slots([0x10]), np.array([1]), np.array([t]), rate)[0]
               for t in times]
        assert got == want
