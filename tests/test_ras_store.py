"""The retired-page list (SQLite) and the badpage= value it writes for Xen's command line
(``List of [ <integer> | <integer>-<integer> ]``, read with ``simple_strtoul(p, &p, 0)``
into ``char opt_badpage[100]``)."""

from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from xenpage.abi import mca as A
from xenpage.abi.mca import McRecord
from xenpage.hypervisor.mce import parse_badpage
from xenpage.ras.policy import Bucket
from xenpage.ras.store import (BADPAGE_MAX_CHARS, BADPAGE_MAX_WASTE, Frame, Store,
                               badpage_value)


def xen_frames(value: str) -> set[int]:
    out = set()
    for a, b in parse_badpage(value):
        out.update(range(a, b + 1))
    return out


def test_badpage_format():
    opt = badpage_value([0x3F100, 0x3F102, 0x3F103, 0x3F104, 0x0])
    assert opt.value == "0x0,0x3f100,0x3f102-0x3f104"
    assert opt.text == "badpage=0x0,0x3f100,0x3f102-0x3f104"
    assert xen_frames(opt.value) == {0, 0x3F100, 0x3F102, 0x3F103, 0x3F104}
    assert badpage_value([]).text == ""


def test_badpage_widens_to_fit():
    bad = [0x40000 + 2 * i for i in range(20)]             # 20 items: too long one by one
    opt = badpage_value(bad)
    assert len(opt.value) <= BADPAGE_MAX_CHARS and not opt.missing
    assert set(bad) <= xen_frames(opt.value)
    assert opt.widened == len(xen_frames(opt.value)) - len(bad) > 0


def test_badpage_drops_least_important_when_widening_is_too_costly():
    bad = [0x10000 * i + 1 for i in range(1, 30)]           # far apart: widening would cost GiBs
    prio = {bad[5]: (1, 1, 0)}                               # a broken frame: kept first
    opt = badpage_value(bad, prio)
    assert len(opt.value) <= BADPAGE_MAX_CHARS and opt.missing and opt.widened == 0
    got = xen_frames(opt.value)
    assert bad[5] in got and got | set(opt.missing) == set(bad)
    assert not got & set(opt.missing)


@given(st.lists(st.integers(0, 2 ** 30), max_size=80))
def test_badpage_roundtrip_through_xens_parser(bad):
    opt = badpage_value(bad)
    assert len(opt.value) <= BADPAGE_MAX_CHARS
    got = xen_frames(opt.value)
    want = set(bad) - set(opt.missing)
    assert want <= got                                         # every bad frame not reported missing
    assert len(got - set(bad)) == opt.widened <= BADPAGE_MAX_WASTE
    assert set(opt.missing) <= set(bad)
    assert opt.frames == len(want)


def rec(mfn, kind="ce", t=1.0):
    st_ = A.MCI_STATUS_VAL | A.MCI_STATUS_EN | A.MCI_STATUS_ADDRV | 0x90
    if kind == "uc":
        st_ |= A.MCI_STATUS_UC
    return McRecord(status=st_, addr=mfn << 12, time=t, source="test:1", channel=1)


def test_store_persists_everything(tmp_path):
    s = Store.in_state_dir(tmp_path)
    with s.batch():
        e = s.add_event(rec(0x100), 5.0)
        d = s.add_decision(6.0, 0x100, "soft", "page", "2 / 24h", e)
        s.add_outcome(7.0, 0x100, d, "soft", "exchanged", "", "moved", "online", "offlined",
                      None, "retired", 1)
        s.put_frame(Frame(0x100, "retired", action="soft", reason="2 / 24h", xen_state="offlined",
                          domid=1, errors=2, location={"channel": 1}, outcome="exchanged"))
        s.put_frame(Frame(0x200, "pending", broken=True, next_retry=50.0))
        s.save_buckets({"page:0x100": Bucket(1, 2, 3.0, 4)}, {"row:x": [0x100, 0x102]},
                       {"page:0x100", "frames:row:x"})
        s.set_source_position("/var/log/mcelog", {"ino": 7, "offset": 99})
    s.set_switch(False)
    s.close()
    s = Store.in_state_dir(tmp_path)
    f = s.frame(0x100)
    assert (f.state, f.domid, f.errors, f.location, f.outcome) == ("retired", 1, 2, {"channel": 1}, "exchanged")
    assert s.frame(0x200).broken and s.due(49.0) == [] and [x.mfn for x in s.due(50.0)] == [0x200]
    assert s.next_due() == 50.0
    b, uf = s.load_buckets()
    assert b["page:0x100"].to_row() == (1, 2, 3.0, 4) and uf == {"row:x": [0x100, 0x102]}
    assert s.source_position("/var/log/mcelog") == {"ino": 7, "offset": 99}
    assert not s.switch()
    h = s.history(0x100)
    assert [x["kind"] for x in h["events"]] == ["ce"] and h["outcomes"][0]["xen_after"] == "offlined"
    assert s.counts()["frames"]["retired"] == 1 and s.event_counts(0x100) == (1, 0)


def test_batch_rolls_back_on_error(tmp_path):
    s = Store(tmp_path / "r.db")
    with pytest.raises(RuntimeError):
        with s.batch():
            s.put_frame(Frame(0x1, "retired"))
            raise RuntimeError
    assert s.frame(0x1) is None


def test_clear_keeps_history_and_updates_boot_option(tmp_path):
    s = Store(tmp_path / "r.db")
    for m in (0x10, 0x11, 0x20):
        s.put_frame(Frame(m, "retired"))
    s.put_frame(Frame(0x30, "failed"))
    assert s.boot_option().value == "0x10-0x11,0x20"          # failed frames are not listed
    assert s.last_boot_option() == "0x10-0x11,0x20"        # no boot recorded: the list's
    s.record_boot_option("0x10")                             # booted with this
    assert s.last_boot_option() == "0x10" and s.boot_option().value == "0x10-0x11,0x20"
    assert s.clear([0x11, 0x99], 9.0, "DIMM replaced") == [0x11]
    assert s.boot_option().value == "0x10,0x20"
    assert s.history(0x11)["decisions"][0]["action"] == "clear"
    assert s.clear(None, 10.0, "all") == [0x10, 0x20, 0x30]
    assert s.boot_option().text == ""


def _as_schema_1(path):
    """Turn a list into what schema 1 wrote: an index on events.mfn, page buckets in
    ``buckets`` under ``page:`` keys, no ``page_log``."""
    import sqlite3
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript("DROP TABLE page_log; CREATE INDEX events_mfn ON events(mfn);"
                     "UPDATE meta SET value = '1' WHERE key = 'schema';")
    db.execute("INSERT INTO buckets(key, count, excess, tstamp, total) VALUES(?,?,?,?,?)",
               ("page:0x100", 1, 0, 3.0, 1))
    db.close()


def test_a_schema_1_list_is_upgraded_when_opened(tmp_path):
    from xenpage.ras.store import SCHEMA_VERSION
    s = Store.in_state_dir(tmp_path)
    with s.batch():
        for m, kind in ((0x100, "ce"), (0x100, "ce"), (0x100, "uc"), (0x200, "ce")):
            s.add_event(rec(m, kind), 5.0)
        s.add_event(McRecord(status=A.MCI_STATUS_VAL, time=1.0), 5.0)   # no address
        s.save_buckets({"row:x": Bucket(1, 0, 2.0, 1)}, {}, {"row:x"})
    s.close()
    _as_schema_1(tmp_path / "retired.db")
    s = Store.in_state_dir(tmp_path)
    assert s.meta("schema") == str(SCHEMA_VERSION) == "2"
    assert s.db.execute("SELECT name FROM sqlite_master WHERE name='events_mfn'").fetchone() is None
    pages = s.load_pages()
    assert pages.events(0x100) == (2, 1) and pages.events(0x200) == (1, 0) and len(pages) == 2
    assert pages.bucket(0x100) == Bucket(1, 0, 3.0, 1) and pages.bucket(0x200) == Bucket()
    b, _ = s.load_buckets()
    assert set(b) == {"row:x"}                       # the page buckets moved out
    assert s.history(0x100)["events"] and s.event_counts(0x100) == (2, 1)
    s.close()
    s = Store.in_state_dir(tmp_path)                  # once upgraded, opened as it is
    assert s.load_pages().rows().tobytes() == pages.rows().tobytes()


def test_a_schema_2_list_without_its_page_log_is_damaged(tmp_path):
    import sqlite3
    from xenpage.ras.store import StoreError
    Store.in_state_dir(tmp_path).close()
    db = sqlite3.connect(tmp_path / "retired.db", isolation_level=None)
    db.execute("DROP TABLE page_log")
    db.close()
    with pytest.raises(StoreError, match="page_log missing"):
        Store.in_state_dir(tmp_path)


def test_the_page_log_is_folded_when_it_outgrows_the_table(tmp_path, monkeypatch):
    from xenpage.ras import store as store_mod
    from xenpage.ras.pagecounts import PageCounts
    monkeypatch.setattr(store_mod, "_PAGE_CHUNK", 4)
    s = Store(tmp_path / "r.db")
    pc = PageCounts()
    for k in range(40):                               # the same 3 frames again and again
        with s.batch():
            pc.count_event(0x10 + k % 3, "ce")
            s.save_pages(pc)
    n = s.db.execute("SELECT COALESCE(SUM(rows), 0) FROM page_log").fetchone()[0]
    assert n <= 2 * 3 + 4
    assert s.load_pages().rows().tobytes() == pc.rows().tobytes()
    assert [pc.events(m)[0] for m in (0x10, 0x11, 0x12)] == [14, 13, 13]


def test_what_changes_the_list_is_synced_counting_is_not(tmp_path):
    s = Store(tmp_path / "r.db")
    synced = []
    s._fsync_wal = lambda: synced.append(1)
    with s.batch():
        s.add_event(rec(0x100), 5.0)
        s.add_seen([("x", 1)])
    assert synced == []
    with s.batch():
        s.add_event(rec(0x100), 6.0)
        s.add_decision(6.0, 0x100, "soft", "page", "2 / 24h", 2)
    assert synced == [1]
    with pytest.raises(RuntimeError):
        with s.batch():
            s.put_frame(Frame(0x1, "retired"))
            raise RuntimeError                        # rolled back: nothing to sync
    assert synced == [1]
    s.set_switch(False)                               # outside a transaction: at once
    assert synced == [1, 1]


@given(st.lists(st.text(min_size=1, max_size=6), max_size=12, unique=True),
       st.lists(st.text(min_size=1, max_size=6), max_size=12), st.data())
def test_seen_among_finds_exactly_the_stored_identities(stored, others, data):
    """Every identity asked for that the list holds, with its event -- whether it is the
    lowest, the highest or in between of those asked (the lookup is skipped when no stored
    identity lies in that range)."""
    asked = others + (data.draw(st.lists(st.sampled_from(stored), max_size=4)) if stored else [])
    s = Store()
    s.add_seen([(i, n) for n, i in enumerate(stored, 1)])
    want = {i: stored.index(i) + 1 for i in asked if i in stored}
    assert s.seen_among(set(asked)) == want
