"""Leaky buckets (mcelog's leaky-bucket.c, which rasdaemon's page isolation repeats) and the
triggers they raise per frame, DRAM row and bank."""

from __future__ import annotations

from hypothesis import given, strategies as st

from xenpage.abi import mca as A
from xenpage.abi.mca import McRecord
from xenpage.ras.policy import Accountant, Bucket, unit_key
from xenpage.ras.thresholds import Action, Policy, Rate


class CBucket:
    """mcelog's C, transcribed: bucket_age + __bucket_account (unsigned arithmetic)."""

    def __init__(self, capacity, agetime, t0):
        self.capacity, self.agetime = capacity, agetime
        self.count = self.excess = 0
        self.tstamp = t0

    def account(self, inc, t):
        if self.capacity == 0:
            return 0
        diff = t - self.tstamp
        if diff >= self.agetime:
            age = int((diff / float(self.agetime)) * self.capacity) & 0xFFFFFFFF
            self.tstamp = t
            self.count = 0 if age > self.count else self.count - age
            self.excess = 0
        self.count += inc
        if self.count >= self.capacity:
            self.excess += self.count
            self.count = 0
            return 1
        return 0


@given(cap=st.integers(1, 60), age=st.integers(1, 10 ** 5),
       steps=st.lists(st.tuples(st.integers(0, 3 * 10 ** 5), st.integers(1, 5)), max_size=60))
def test_bucket_is_mcelogs(cap, age, steps):
    rate = Rate(cap, age)
    b, c = Bucket(), None
    t = 1_000_000
    for dt, inc in steps:
        t += dt
        if c is None:
            c = CBucket(cap, age, t)  # rasdaemon: the first event starts the window
        assert b.account(rate, inc, t) == bool(c.account(inc, t))
        assert (b.count, b.excess, b.tstamp) == (c.count, c.excess, c.tstamp)


def test_bucket_overflow_and_leak():
    r = Rate(2, 86400)
    b = Bucket()
    assert not b.account(r, 1, 0)
    assert b.account(r, 1, 10)          # 2 in 24h
    assert b.count == 0 and b.excess == 2
    assert not b.account(r, 1, 100)
    # a day later the bucket has leaked: one more error does not overflow
    assert not b.account(r, 1, 100 + 2 * 86400)
    assert b.count == 1


def test_bucket_older_event_restarts_window():
    r = Rate(3, 100)
    b = Bucket()
    b.account(r, 1, 1000)
    b.account(r, 1, 500)  # out of order
    assert b.tstamp == 500 and b.count == 2


def ce(mfn, t=0.0, cnt=0, row=None, **loc):
    st_ = (A.MCI_STATUS_VAL | A.MCI_STATUS_EN | A.MCI_STATUS_ADDRV | A.MCI_STATUS_MISCV
           | (cnt << A.MCI_STATUS_CEC_SHIFT) | 0x90)
    return McRecord(status=st_, addr=mfn << 12, time=t, row=row, **loc)


LOC = dict(socketid=0, channel=1, rank=2, bankgroup=3, dram_bank=1)


def test_page_trigger_counts_corrected_count_field():
    acc = Accountant(Policy(page=Rate(5, 86400)))
    assert acc.account_ce(ce(0x100, cnt=3), 0) == []      # 1 + 3
    trig = acc.account_ce(ce(0x100, cnt=0), 1)            # 5
    assert [t.mfns for t in trig] == [[0x100]] and trig[0].unit == "page"
    assert trig[0].action == Action.SOFT


def test_uncorrected_and_addressless_records_are_not_counted():
    acc = Accountant(Policy(page=Rate(1, 86400)))
    uc = ce(0x100)
    uc.status |= A.MCI_STATUS_UC
    assert acc.account_ce(uc, 0) == []
    noaddr = ce(0x100)
    noaddr.status &= ~A.MCI_STATUS_ADDRV
    assert acc.account_ce(noaddr, 0) == []


def test_disabled_policy_counts_nothing():
    acc = Accountant(Policy(enabled=False, page=Rate(1, 86400)))
    assert acc.account_ce(ce(0x100), 0) == [] and acc.buckets == {} and acc.pages.buckets() == {}


def test_row_trigger_names_frames_seen_in_the_row():
    p = Policy(page_action=Action.OFF, row_action=Action.SOFT, row=Rate(3, 86400))
    acc = Accountant(p)
    assert acc.account_ce(ce(0x10, row=7, **LOC), 0) == []
    assert acc.account_ce(ce(0x12, row=7, **LOC), 1) == []
    assert acc.account_ce(ce(0x14, row=8, **LOC), 2) == []   # another row
    trig = acc.account_ce(ce(0x10, row=7, **LOC), 3)
    assert len(trig) == 1 and trig[0].unit == "row" and trig[0].mfns == [0x10, 0x12]
    assert trig[0].key == unit_key("row", ce(0, row=7, **LOC))


def test_row_scope_all_uses_the_address_map():
    p = Policy(page_action=Action.OFF, row_action=Action.SOFT, row=Rate(1, 86400), unit_scope="all")
    acc = Accountant(p, expand=lambda unit, rec: [0x10, 0x11, 0x12])
    trig = acc.account_ce(ce(0x11, row=7, **LOC), 0)
    assert trig[0].mfns == [0x10, 0x11, 0x12]


def test_bank_trigger_and_undecoded_location():
    p = Policy(page_action=Action.OFF, bank_action=Action.ACCOUNT, bank=Rate(2, 86400))
    acc = Accountant(p)
    assert acc.account_ce(ce(0x10), 0) == []          # no location: no bank bucket
    assert acc.account_ce(ce(0x10, row=1, **LOC), 0) == []
    trig = acc.account_ce(ce(0x20, row=9, **LOC), 1)
    assert trig[0].unit == "bank" and trig[0].mfns == [0x10, 0x20]
    assert trig[0].action == Action.ACCOUNT


def test_forget_drops_counts_and_row_membership():
    p = Policy(page=Rate(5, 86400), row_action=Action.SOFT, row=Rate(5, 86400))
    acc = Accountant(p)
    acc.account_ce(ce(0x10, row=7, **LOC), 0)
    acc.account_ce(ce(0x12, row=7, **LOC), 0)
    acc.dirty.clear()
    acc.forget([0x10])
    assert 0x10 not in acc.pages.buckets() and 0x12 in acc.pages.buckets()
    assert acc.pages.bucket(0x10) == Bucket()
    key = unit_key("row", ce(0, row=7, **LOC))
    assert acc.unit_frames[key] == [0x12]
    acc.forget([0x12])
    assert key not in acc.unit_frames and key not in acc.buckets
