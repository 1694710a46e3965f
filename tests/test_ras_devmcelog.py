"""dom0's ``/dev/mcelog`` read natively (``xenpage.ras.devmcelog``) and every record's
identity: a machine check seen twice -- replayed, or through stdin and then from the log --
counts once.

The device exists only in a Xen dom0; here the source talks to :class:`XenMcelogDriver`, a
model of Linux's ``drivers/xen/mcelog.c`` character device (its ``read()`` takes only a
buffer of the whole log and empties it, ``-EINVAL`` otherwise; ``MCE_GETCLEAR_FLAGS``
returns and clears the overflow bit, set when a 33rd record arrives; unknown ioctls are
``-ENOTTY``).  The lab (tests_xen/) reads the real one."""

from __future__ import annotations

import errno
import json

import pytest
from hypothesis import given, strategies as st

import simworld
from xenpage.abi import mca as A
from xenpage.abi import mce as M
from xenpage.ras.devmcelog import DeviceError, DevMcelog, decode_records
from xenpage.ras.service import RetireService
from xenpage.ras.sources import format_mcelog, parse_mcelog
from xenpage.ras.store import Store
from xenpage.ras.thresholds import Policy

from test_ras_cli import PV, js, run  # noqa: F401  (the in-process CLI fixture)

CE = A.MCI_STATUS_VAL | A.MCI_STATUS_EN | A.MCI_STATUS_MISCV | A.MCI_STATUS_ADDRV | 0x9F
UC = CE | A.MCI_STATUS_UC | A.MCI_STATUS_S


class XenMcelogDriver:
    """The xen-mcelog driver as user space sees it (``xen_mce_chrdev_read``,
    ``xen_mce_chrdev_ioctl``, ``xen_mce_log``)."""

    FD = 7

    def __init__(self, record_len: int = M.XEN_MCE_RECORD_LEN, log_len: int = M.XEN_MCE_LOG_LEN):
        self.record_len, self.log_len = record_len, log_len
        self.entries: list[bytes] = []
        self.flags = 0
        self.reads: list[int] = []

    def log(self, **fields) -> None:
        if len(self.entries) >= self.log_len:
            self.flags |= 1 << M.MCE_OVERFLOW
            return
        self.entries.append(M.pack(self.record_len, finished=1, **fields))

    def open(self, path, flags):
        return self.FD

    def ioctl(self, fd, request):
        assert fd == self.FD
        if request == M.MCE_GET_RECORD_LEN:
            return self.record_len
        if request == M.MCE_GET_LOG_LEN:
            return self.log_len
        if request == M.MCE_GETCLEAR_FLAGS:
            f, self.flags = self.flags, 0
            return f
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")

    def read(self, fd, n):
        self.reads.append(n)
        if n < self.log_len * self.record_len:
            raise OSError(errno.EINVAL, "Invalid argument")  # "only supports full reads"
        out, self.entries = b"".join(self.entries), []
        return out

    def source(self) -> DevMcelog:
        return DevMcelog("/dev/mcelog", ioctl=self.ioctl, reader=self.read, opener=self.open,
                         closer=lambda fd: None)


def test_decode_a_record_as_the_driver_fills_it():
    """convert_log's fields: bank registers, TSC, bank, CPU, socket, APIC id, MCG_CAP; no
    time (the driver never sets it)."""
    data = M.pack(status=CE, misc=0x86, addr=0x3F100040, mcgstatus=0, tsc=0x1234, bank=8,
                  extcpu=1, cpu=1, socketid=0, apicid=2, mcgcap=0x1000C02, cpuvendor=1, finished=1)
    assert len(data) == 112
    (r,) = decode_records(data, 112)
    assert (r.status, r.misc, r.addr, r.tsc, r.bank, r.cpu, r.apicid, r.mcgcap) == \
        (CE, 0x86, 0x3F100040, 0x1234, 8, 1, 2, 0x1000C02)
    assert r.time is None and r.kind() == "ce" and r.mfn == 0x3F100 and r.source == "/dev/mcelog#0"
    assert r.cpufamily is None  # cpuid is not filled by xen-mcelog
    assert r.identity() != "" and r.defect() is None


def test_decode_uapi_length_and_cpuid():
    """A native kernel's 128-byte records (and a CPUID signature, as mcelog decodes it)."""
    data = M.pack(128, status=CE, addr=0x1000, tsc=5, bank=13, cpuid=0x606A6, cpuvendor=0,
                  time=1700000000, microcode=0xD0003A5) * 3 + b"\0" * 50
    recs = decode_records(data, 128)
    assert len(recs) == 3  # a trailing partial record is not a record
    assert (recs[0].cpuvendor, recs[0].cpufamily, recs[0].cpumodel) == ("Intel", 6, 0x6A)
    assert recs[2].time == 1700000000.0 and recs[2].source == "/dev/mcelog#2"


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**52 - 1),
                          st.integers(0, 2**64 - 1), st.integers(0, 255), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**64 - 1)), max_size=40))
def test_decode_round_trip(rows):
    data = b"".join(M.pack(status=s, addr=a, misc=m, bank=b, extcpu=c, tsc=t) for s, a, m, b, c, t in rows)
    recs = decode_records(data, 112)
    assert [(r.status, r.addr, r.misc, r.bank, r.cpu, r.tsc or 0) for r in recs] == rows


def test_device_reads_whole_log_and_empties_it():
    drv = XenMcelogDriver()
    src = drv.source()
    assert (src.record_len, src.log_len) == (112, 32)
    assert src.read() == []
    drv.log(status=CE, addr=0x5000, tsc=1, bank=7)
    drv.log(status=CE, addr=0x6000, tsc=2, bank=7)
    a = src.read()
    assert [r.mfn for r in a] == [5, 6] and drv.reads[-1] == 32 * 112
    assert src.read() == []  # read() emptied the driver's log
    drv.log(status=CE, addr=0x7000, tsc=3, bank=7)
    (c,) = src.read()
    assert c.source == "/dev/mcelog#2" and "overflow" not in c.extra


def test_device_overflow_is_reported():
    drv = XenMcelogDriver()
    for i in range(40):
        drv.log(status=CE, addr=0x1000 * (i + 1), tsc=i + 1, bank=7)
    src = drv.source()
    recs = src.read()
    assert len(recs) == 32 and src.overflows == 1 and all(r.extra["overflow"] for r in recs)
    assert drv.flags == 0  # GETCLEAR cleared it


def test_not_a_device():
    drv = XenMcelogDriver()

    def ioctl(fd, req):
        raise OSError(errno.ENOTTY, "Inappropriate ioctl for device")
    with pytest.raises(DeviceError, match="not a machine-check log device"):
        DevMcelog("/x", ioctl=ioctl, reader=drv.read, opener=drv.open, closer=lambda fd: None)
    with pytest.raises(DeviceError, match="No such file.*xen-mcelog"):
        DevMcelog("/nonexistent/mcelog")


def _hv():
    from xenpage.backends.sim import SimHypervisor, build_host
    return SimHypervisor(build_host())   # the CLI's default host: PV is a frame of domu1


def test_device_records_retire_a_frame_on_the_simulator():
    """/dev/mcelog-shaped records of two corrected errors on a PV guest's frame cross
    mcelog's default threshold (2 / 24h): the frame is exchanged and offlined."""
    hv = _hv()
    mfn = int(PV, 16)
    drv = XenMcelogDriver()
    drv.log(status=CE, addr=mfn << 12, misc=0x86, tsc=100, bank=7)
    drv.log(status=CE, addr=(mfn << 12) | 0x40, misc=0x86, tsc=200, bank=7)
    store = Store()
    svc = RetireService(store, Policy())
    svc.process(hv, drv.source().read())
    f = store.frame(mfn)
    assert f is not None and f.state == "retired" and f.outcome == "exchanged"
    assert svc.stats.corrected == 2 and svc.stats.thresholds == 1
    assert simworld.problems(hv.host) == []


# -- identity ---------------------------------------------------------------------------------

TWO = """\
Hardware event. This is not a software error.
MCE 0
CPU 1 BANK 7 TSC 1c0ffee
MISC 86 ADDR 3f100040
TIME 1764900000 Fri Dec  5 02:00:00 2025
STATUS 9c0000000000009f MCGSTATUS 0
Hardware event. This is not a software error.
MCE 1
CPU 1 BANK 7 TSC 2c0ffee
MISC 86 ADDR 3f100080
TIME 1764900060 Fri Dec  5 02:01:00 2025
STATUS 9c0000000000009f MCGSTATUS 0
"""


def test_identity_is_the_record_not_its_text():
    a, b = parse_mcelog(TWO, "x")
    assert a.tsc == 0x1C0FFEE and a.identity() != b.identity()
    # the same machine check written again (mcelog's format, another index) is the same one
    (a2,) = parse_mcelog(format_mcelog(a, 7))
    assert a2.identity() == a.identity()
    # registers a status does not declare valid are not part of it
    a3 = parse_mcelog(TWO.replace("MISC 86 ADDR", "ADDR"))[0]
    assert a3.identity() != a.identity()   # MISCV is set: MISC is part of the record
    # no time and no TSC: no identity (two such reports may be two errors)
    (c,) = parse_mcelog("CPU 0\nBANK 7\nSTATUS 9c0000000000009f\nADDR 1000\nMISC 86\n")
    assert c.identity() == ""


def test_replayed_records_count_once():
    hv = _hv()
    store = Store()
    svc = RetireService(store, Policy())
    recs = parse_mcelog(TWO, "a")
    svc.process(hv, recs[:1])
    svc.process(hv, parse_mcelog(TWO, "b")[:1])   # the same record again
    assert svc.stats.events == 1 and svc.stats.duplicates == 1
    assert store.frame(0x3F100) is None            # one error: below 2 / 24h
    svc.process(hv, recs[1:])
    assert store.frame(0x3F100).state == "retired" and svc.stats.thresholds == 1
    svc.process(hv, parse_mcelog(TWO, "c"))
    assert svc.stats.events == 2 and svc.stats.duplicates == 3 and svc.stats.thresholds == 1


def test_timeless_records_are_each_counted():
    """No time and no TSC: nothing tells two reports from one replayed, so each counts
    (the file's stored position is what keeps a log from being read twice)."""
    hv = _hv()
    store = Store()
    svc = RetireService(store, Policy())
    one = "CPU 0\nBANK 7\nSTATUS 9c0000000000009f\nADDR 3f100000\nMISC 86\n\n"
    svc.process(hv, parse_mcelog(one * 2))
    assert svc.stats.events == 2 and svc.stats.duplicates == 0


def test_stdin_then_the_file_counts_twice_not_four_times(tmp_path, run):  # noqa: F811
    """The issue's case: the same two records fed through stdin, then read from the log,
    used to count as four and fire the threshold again."""
    log = tmp_path / "mcelog"
    log.write_text(TWO)
    state = tmp_path / "state"
    a = js(run(state, "retire", "--from", "-", "--json", input=TWO))
    assert a["records"] == 2 and a["stats"]["events"] == 2 and a["stats"]["thresholds"] == 1
    b = js(run(state, "retire", "--from", log, "--json"))
    assert b["records"] == 2 and b["stats"]["duplicates"] == 2
    assert b["stats"]["events"] == 0 and b["stats"]["thresholds"] == 0
    st = js(run(state, "badpages", "--json"))
    (f,) = st["frames"]
    assert f["mfn_hex"] == PV and f["errors"] == 2 and st["events"] == {"ce": 2}
    p = run(state, "retire", "--from", "-", input=TWO)
    assert "2 records seen before" in p.stderr


def test_the_seen_table_survives_a_restart(tmp_path):
    hv = _hv()
    db = tmp_path / "retired.db"
    s1 = Store(db)
    RetireService(s1, Policy()).process(hv, parse_mcelog(TWO)[:1])
    s1.close()
    s2 = Store(db)
    svc = RetireService(s2, Policy())
    svc.process(hv, parse_mcelog(TWO)[:1])
    assert svc.stats.duplicates == 1 and s2.counts()["events"] == {"ce": 1}
    assert json.loads(json.dumps(svc.stats.to_json()))["duplicates"] == 1


def test_a_full_log_is_read_again():
    """32 records fill the driver's log; what came meanwhile is read in the same call."""
    drv = XenMcelogDriver()
    for i in range(32):
        drv.log(status=CE, addr=0x1000 * (i + 1), tsc=i + 1, bank=7)
    real_read = drv.read

    def read_then_more(fd, n):
        out = real_read(fd, n)
        if len(drv.reads) == 1:      # the hardware reports more while the first read runs
            for i in range(5):
                drv.log(status=CE, addr=0x100000 + 0x1000 * i, tsc=100 + i, bank=7)
        return out
    src = DevMcelog("/dev/mcelog", ioctl=drv.ioctl, reader=read_then_more, opener=drv.open,
                    closer=lambda fd: None)
    recs = src.read()
    assert len(recs) == 37 and len(drv.reads) == 2 and recs[-1].source == "/dev/mcelog#36"


def test_an_uncorrected_record_twice_in_one_batch_counts_once():
    """The slow path (an uncorrected error, Xen's handler acted) remembers the identity too."""
    hv = _hv()
    store = Store()
    svc = RetireService(store, Policy())
    (a,) = parse_mcelog(TWO.replace("9c0000000000009f", "bd000000000000c0"))[:1]
    (b,) = parse_mcelog(TWO.replace("9c0000000000009f", "bd000000000000c0"))[:1]
    svc.process(hv, [a, b])
    assert svc.stats.uncorrected == 1 and svc.stats.duplicates == 1
    assert store.counts()["events"] == {"uc": 1}


def _pv_reads(tscs, mfn=None):
    """One read of the device: corrected errors on the PV guest's frame, one per TSC."""
    drv = XenMcelogDriver()
    m = int(PV, 16) if mfn is None else mfn
    for t in tscs:
        drv.log(status=CE, addr=(m << 12) | 0x40, misc=0x86, tsc=t, bank=7)
    return drv.source().read_batches()


def test_a_frames_bucket_survives_a_restart_column_wise(tmp_path):
    """mcelog's 2 / 24h across a restart of the service: the first error's count is in the
    list (page_log), the second crosses the threshold in the new service."""
    hv = _hv()
    db = tmp_path / "retired.db"
    s1 = Store(db)
    RetireService(s1, Policy()).process(hv, [], _pv_reads([5]))
    s1.close()
    s2 = Store(db)
    svc = RetireService(s2, Policy())
    svc.process(hv, [], _pv_reads([6]))
    f = s2.frame(int(PV, 16))
    assert f is not None and f.state == "retired" and f.errors == 2
    assert svc.stats.thresholds == 1 and s2.counts()["events"] == {"ce": 2}
    assert simworld.problems(hv.host) == []


def test_a_batch_that_fails_leaves_no_count_behind(tmp_path):
    """The store fails in the middle of a batch (here: writing the identities): its
    transaction is undone, and so are the counts it made in memory -- the same records
    handled again count once and cross the threshold once."""
    import sqlite3
    hv = _hv()
    store = Store(tmp_path / "retired.db")
    svc = RetireService(store, Policy())
    real = store.add_seen

    def full(pairs):
        raise sqlite3.OperationalError("database or disk is full")
    store.add_seen = full
    batches = _pv_reads([5, 6])
    with pytest.raises(sqlite3.OperationalError):
        svc.process(hv, [], batches)
    assert store.counts()["events"] == {} and len(store.load_pages()) == 0
    assert svc.acct.pages.rows().tobytes() == store.load_pages().rows().tobytes()
    store.add_seen = real
    svc.process(hv, [], batches)
    f = store.frame(int(PV, 16))
    assert f is not None and f.state == "retired" and f.errors == 2
    assert store.counts()["events"] == {"ce": 2} and svc.acct.pages.events(int(PV, 16)) == (2, 0)
    assert simworld.problems(hv.host) == []
