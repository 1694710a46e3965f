"""The service's column-wise path for ``/dev/mcelog`` reads (``xenpage.ras.columns`` and
``RetireService._batch``) against its record-at-a-time path: the same records, in the same
order, on two equal simulated hosts with the same clock, leave the same retired-page list --
every table row for row -- the same statistics and the same host.  The records mix corrected
errors (storms that cross thresholds, on frames retired before), uncorrected ones, records
without an address, duplicates (the same identity twice), records without an identity, and
records the service must quarantine (an address past MAXPHYADDR, a socket id or a time no
``McRecord`` holds)."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import simworld
from xenpage.abi import mca as A
from xenpage.abi import mce as M
from xenpage.ras.devmcelog import McBatch, decode_batch, merged
from xenpage.ras.service import RetireService, query
from xenpage.ras.store import Store
from xenpage.ras.thresholds import Policy

from test_ras_cli import PV

CE = A.MCI_STATUS_VAL | A.MCI_STATUS_EN | A.MCI_STATUS_MISCV | A.MCI_STATUS_ADDRV | 0x9F
UC = CE | A.MCI_STATUS_UC | A.MCI_STATUS_S
NOADDR = A.MCI_STATUS_VAL | A.MCI_STATUS_EN | 0x9F
FRAMES = [int(PV, 16), int(PV, 16) + 1, 0x3F100, 0x3F101, 0x3F102, 0x20000]

_TABLES = {"events": "id", "decisions": "id", "outcomes": "id", "frames": "mfn",
           "buckets": "key", "unit_frames": "key, mfn", "seen": "ident", "quarantine": "id",
           "page_log": "id"}


def _hv():
    from xenpage.backends.sim import SimHypervisor, build_host
    return SimHypervisor(build_host())


class Clock:
    """Time moves between polls, not within one (the column-wise path reads the clock once
    per poll, the other once per record)."""

    def __init__(self):
        self.t = 1.7646e9

    def __call__(self):
        return self.t


def _record(kind: str, frame: int, tsc: int, cec: int, t: int):
    f = {"finished": 1, "bank": 7, "misc": 0x86, "extcpu": tsc % 2, "socketid": 0, "apicid": 0,
         "mcgcap": 0x1000C02, "tsc": tsc}
    if kind == "ce":
        f.update(status=CE | (cec << A.MCI_STATUS_CEC_SHIFT), addr=(frame << 12) | 0x40)
    elif kind == "uc":
        f.update(status=UC, addr=frame << 12, mcgstatus=5)
    elif kind == "noaddr":
        f.update(status=NOADDR, addr=0)
    elif kind == "farAddr":
        f.update(status=CE, addr=1 << 53)
    elif kind == "socket":
        f.update(status=CE, addr=frame << 12, socketid=300)
    elif kind == "time":
        f.update(status=CE, addr=frame << 12, time=1 << 63)
    elif kind == "noident":
        f.update(status=CE, addr=frame << 12, tsc=0)
    if t:
        f["time"] = f.get("time", t)
    return M.pack(**f)


def _run(data: bytes, reads: list[int], column_wise: bool, policy: Policy):
    hv = _hv()
    store = Store()
    svc = RetireService(store, policy, clock=Clock())
    rl = M.XEN_MCE_RECORD_LEN
    # two frames retired before (the storm's case: errors on retired frames)
    pre = b"".join(_record("ce", 0x3F100 + k, 10 + j, 0, 0) for k in range(2) for j in range(2))
    svc.process(hv, decode_batch(pre, rl, "/dev/mcelog", 10_000).records())
    i = 0
    for n in reads:
        chunk = data[i * rl:(i + n) * rl]
        batches = [decode_batch(chunk[j * rl:(j + 32) * rl], rl, "/dev/mcelog", i + j)
                   for j in range(0, n, 32)]
        svc.clock.t += 30
        if column_wise:
            svc.process(hv, [], batches)
        else:
            svc.process(hv, [r for b in batches for r in b.records()])
        i += n
    # outcomes' data holds the toolstack's measured timings: every other column is compared
    cols = {"outcomes": "id, time, mfn, decision_id, action, kind, reason, detail, xen_before, "
                        "xen_after, state_before, state_after, domid"}
    tables = {t: store.db.execute(f"SELECT {cols.get(t, '*')} FROM {t} ORDER BY {k}").fetchall()
              for t, k in _TABLES.items()}
    stats = svc.stats.to_json()
    stats.pop("suspended_s")  # measured
    # the per-frame counts and buckets: in memory as the list holds them
    assert svc.acct.pages.rows().tobytes() == store.load_pages().rows().tobytes()
    tables["pages"] = svc.acct.pages.rows().tobytes()  # bytes: NaN time stamps compare equal
    return tables, stats, hv


KINDS = st.sampled_from(["ce"] * 8 + ["uc", "noaddr", "farAddr", "socket", "time", "noident"])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(KINDS, st.sampled_from(FRAMES), st.integers(1, 60), st.integers(0, 3),
                          st.sampled_from([0, 0, 1764900000])), min_size=1, max_size=70),
       st.data(), st.sampled_from(["mcelog", "first-error", "account", "off"]))
def test_column_wise_equals_record_at_a_time(rows, data, preset):
    # duplicates: a record again (same TSC, registers and CPU: the same machine check)
    recs = [_record(*r) for r in rows]
    dups = data.draw(st.lists(st.integers(0, len(recs) - 1), max_size=5))
    for d in dups:
        recs.insert(data.draw(st.integers(d + 1, len(recs))), recs[d])
    blob = b"".join(recs)
    n = len(recs)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n), max_size=3))) | {n})
    reads = [b - a for a, b in zip([0] + cuts, cuts)]
    policy = Policy.named(preset)
    a_tables, a_stats, a_hv = _run(blob, reads, False, policy)
    b_tables, b_stats, b_hv = _run(blob, reads, True, policy)
    for t in (*_TABLES, "pages"):
        assert b_tables[t] == a_tables[t], t
    assert b_stats == a_stats
    assert simworld.problems(b_hv.host) == []
    assert [query(a_hv, m) for m in FRAMES] == [query(b_hv, m) for m in FRAMES]


def test_a_storm_crosses_the_threshold_column_wise():
    """Two corrected errors on a PV guest's frame in one read cross mcelog's 2 / 24h: the
    frame is exchanged -- through the column-wise path."""
    hv = _hv()
    mfn = int(PV, 16)
    data = _record("ce", mfn, 5, 0, 0) + _record("ce", mfn, 6, 0, 0)
    store = Store()
    svc = RetireService(store, Policy())
    svc.process(hv, [], [decode_batch(data, M.XEN_MCE_RECORD_LEN)])
    f = store.frame(mfn)
    assert f is not None and f.state == "retired" and f.outcome == "exchanged"
    assert (svc.stats.corrected, svc.stats.thresholds) == (2, 1)
    assert simworld.problems(hv.host) == []


def test_merged_reads():
    rl = M.XEN_MCE_RECORD_LEN
    one = _record("ce", 0x20000, 1, 0, 0)
    a = decode_batch(one * 32, rl, "/dev/mcelog", 0)
    b = decode_batch(one * 3, rl, "/dev/mcelog", 32)
    c = decode_batch(one, rl, "/dev/mcelog", 40)        # not consecutive
    d = decode_batch(one, rl, "/dev/mcelog", 41, overflow=True)
    out = merged([a, b, c, d])
    assert [(x.first, len(x), x.overflow) for x in out] == [(0, 35, False), (40, 1, False), (41, 1, True)]
    assert [r.source for r in out[0].records()][31:33] == ["/dev/mcelog#31", "/dev/mcelog#32"]
    assert isinstance(out[0], McBatch) and out[0].array.dtype == a.array.dtype
    assert np.array_equal(out[0].array["addr"], np.full(35, 0x20000040, dtype=np.uint64))
