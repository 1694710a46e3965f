"""Machine-check records as dom0 sees them: mcelog's decoded log, ``--raw`` and mce-inject
input, Xen console lines, syslog prefixes; reading a growing log across restarts."""

from __future__ import annotations

import io

from hypothesis import given, strategies as st

from xenpage.abi import mca as A
from xenpage.abi.mca import McRecord
from xenpage.ras.sources import (McelogFile, McelogParser, format_mcelog, parse_mcelog,
                                 read_stream, skipgunk)
from xenpage.ras.store import Store

# mcelog's daemon output for a Haswell-EP corrected memory error (decoded form)
DECODED = """\
Hardware event. This is not a software error.
MCE 0
CPU 0 BANK 8 TSC 1d6aa7a8d4f1e
MISC 2140040486 ADDR 1ffc0c0c0
TIME 1512573542 Wed Dec  6 15:19:02 2017
MCG status:
MCi status:
Corrected error
Error enabled
MCi_MISC register valid
MCi_ADDR register valid
MCA: MEMORY CONTROLLER RD_CHANNEL2_ERR
Transaction: Memory read error
STATUS 8c00004000010092 MCGSTATUS 0
MCGCAP 7000c16 APICID 0 SOCKETID 0
CPUID Vendor Intel Family 6 Model 63
Hardware event. This is not a software error.
MCE 1
CPU 2 BANK 8
MISC 2140040486 ADDR 2abc0c0c0
TIME 1512573600 Wed Dec  6 15:20:00 2017
STATUS cc00008000010092 MCGSTATUS 0
MCGCAP 7000c16 APICID 2 SOCKETID 1
CPUID Vendor Intel Family 6 Model 63
"""


def test_decoded_log():
    a, b = parse_mcelog(DECODED, "mcelog")
    assert (a.cpu, a.bank, a.addr, a.misc, a.time) == (0, 8, 0x1FFC0C0C0, 0x2140040486, 1512573542.0)
    assert a.status == 0x8C00004000010092 and a.corrected and a.has_addr and a.memory
    assert a.corrected_count == 1 and a.mfn == 0x1FFC0C
    assert (a.cpuvendor, a.cpufamily, a.cpumodel, a.socketid) == ("Intel", 6, 63, 0)
    assert a.source == "mcelog:1" and a.raw.startswith("Hardware event")
    assert (b.cpu, b.socketid, b.mfn, b.corrected_count) == (2, 1, 0x2ABC0C, 2)
    assert b.status & A.MCI_STATUS_OVER
    assert a.row is None    # a Haswell: no i10nm decode


RAW = """\
CPU 1
BANK 13
TSC 0x0
RIP 0x00:0x0
MISC 0x86
ADDR 0x3f100040
STATUS 0x9c00000000800091
MCGSTATUS 0x0
PROCESSOR 0:0x606a6
TIME 1704067200
SOCKETID 0
APICID 1
MCGCAP 0x9000c1c

CPU 1 BANK 13
STATUS 0xbd80000000a00091
ADDR 0x3f200000
MISC 0x86
"""


def test_raw_and_mce_inject_format():
    a, b = parse_mcelog(RAW)
    assert (a.cpu, a.bank, a.addr, a.status, a.time) == (1, 13, 0x3F100040, 0x9C00000000800091, 1704067200.0)
    assert (a.cpufamily, a.cpumodel) == (6, 0x6A)      # PROCESSOR vendor:cpuid
    assert a.channel == 1 and a.row is not None        # i10nm bank 13..: decoded from MISC
    assert b.uncorrected and b.mfn == 0x3F200 and b.time is None


def test_xen_console_and_syslog_prefixes():
    text = ("Dec  6 15:19:02 host mcelog: (XEN) MCE: The hardware reports a non fatal, correctable "
            "incident occurred on CPU 1.\n"
            "(XEN) Bank 2: d400008000040150 at    182c480179cf0\n"
            "<4>[ 12.345] mce: [Hardware Error]: CPU 3 BANK 5\n"
            "<4>[ 12.345] mce: [Hardware Error]: STATUS 9c00000000800090 MCGSTATUS 0\n"
            "<4>[ 12.345] mce: [Hardware Error]: ADDR 1000\n")
    a, b = parse_mcelog(text)
    assert (a.cpu, a.bank, a.status, a.addr) == (1, 2, 0xD400008000040150, 0x182C480179CF0)
    assert a.has_addr
    assert (b.cpu, b.bank, b.mfn) == (3, 5, 1)
    assert skipgunk("<4>[ 1.0] mce: [Hardware Error]: MISC 86") == "MISC 86"


def test_records_without_address_are_kept_but_not_actionable():
    (r,) = parse_mcelog("CPU 0 BANK 4\nSTATUS 9000000000000000\n")
    assert r.kind() == "other" and r.mfn is None


def test_unknown_lines_do_not_split_records():
    (r,) = parse_mcelog("CPU 0 BANK 13\nMemCtrl: Corrected read error\nsomething else\n"
                        "STATUS 9c00000000800090\nADDR 4000\n")
    assert r.mfn == 4


def rec_strategy():
    return st.builds(
        lambda mfn, uc, cnt, t, ch, row, rank, bg, bank, cpu: McRecord(
            status=(A.MCI_STATUS_VAL | A.MCI_STATUS_EN | A.MCI_STATUS_MISCV | A.MCI_STATUS_ADDRV
                    | (A.MCI_STATUS_UC if uc else 0) | (cnt << A.MCI_STATUS_CEC_SHIFT)
                    | (0x80 << 16) | A.mcacod_memory(1, ch % 3)),
            addr=mfn << 12 | 0x40, misc=0x86 | (row << 19) | (rank << 56) | ((bank & 3) << 42)
            | ((bg & 3) << 40), mcgstatus=5 if uc else 0, cpu=cpu, bank=13 + 4 * (ch // 3) + ch % 3,
            time=float(t), socketid=0, apicid=cpu, mcgcap=0x9000C1C, cpuvendor="Intel",
            cpufamily=6, cpumodel=0x6A, channel=ch, dimm=rank // 2, rank=rank, bankgroup=bg & 3,
            dram_bank=bank & 3, row=row, column=0),
        st.integers(0x100, 2 ** 30), st.booleans(), st.integers(0, 0x7FFF),
        st.integers(10 ** 9, 2 * 10 ** 9), st.integers(0, 5), st.integers(0, 2 ** 21 - 1),
        st.integers(0, 7), st.integers(0, 3), st.integers(0, 3), st.integers(0, 63))


@given(st.lists(rec_strategy(), min_size=1, max_size=5))
def test_format_parse_roundtrip(recs):
    text = "".join(format_mcelog(r, i) for i, r in enumerate(recs))
    got = parse_mcelog(text)
    assert len(got) == len(recs)
    for r, g in zip(recs, got):
        for k in ("status", "addr", "misc", "mcgstatus", "cpu", "bank", "time", "socketid",
                  "channel", "dimm", "rank", "bankgroup", "dram_bank", "row", "cpumodel"):
            assert getattr(g, k) == getattr(r, k), k
        assert g.kind() == r.kind() and g.mfn == r.mfn


def one(mfn, i=0, t=1704067200):
    r = McRecord(status=A.MCI_STATUS_VAL | A.MCI_STATUS_EN | A.MCI_STATUS_ADDRV | 0x90,
                 addr=mfn << 12, time=float(t + i))
    return format_mcelog(r, i)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_log_file_incremental_settle_and_restart(tmp_path):
    log = tmp_path / "mcelog"
    store = Store(tmp_path / "r.db")
    clk = Clock()
    log.write_text(one(0x10, 0) + one(0x11, 1))
    f = McelogFile(log, store=store, settle=1.0, clock=clk)
    got = f.read()
    # the first record is complete (the second began); the second waits for the writer
    assert [r.mfn for r in got] == [0x10]
    clk.t += 2.0
    assert [r.mfn for r in f.read()] == [0x11]          # settled
    assert f.read() == []
    with open(log, "a") as fh:
        fh.write(one(0x12, 2)[:40])                      # half a record, half a line
    clk.t += 5
    assert f.read() == []                                # an unfinished line is never taken
    with open(log, "a") as fh:
        fh.write(one(0x12, 2)[40:])
    clk.t += 0.1
    assert f.read() == []
    # a restarted service (a new reader, same store) resumes where the last one stopped
    g = McelogFile(log, store=store, settle=1.0, clock=clk)
    assert g.read() == []                                # not yet seen to have settled
    clk.t += 5
    got = g.read()
    nlines = one(0x10).count("\n")
    assert [r.mfn for r in got] == [0x12] and got[0].source.endswith(f":{2 * nlines + 1}")
    assert McelogFile(log, store=store, clock=clk).read(final=True) == []


def test_log_rotation_starts_over(tmp_path):
    log = tmp_path / "mcelog"
    store = Store(tmp_path / "r.db")
    log.write_text(one(0x10) + one(0x11, 1))
    assert len(McelogFile(log, store=store).read(final=True)) == 2
    log.rename(tmp_path / "mcelog.1")
    log.write_text(one(0x20))
    assert [r.mfn for r in McelogFile(log, store=store).read(final=True)] == [0x20]


def test_missing_log_reads_nothing(tmp_path):
    assert McelogFile(tmp_path / "nope").read(final=True) == []


def test_stream():
    recs = list(read_stream(io.StringIO(one(0x10) + one(0x20, 1))))
    assert [r.mfn for r in recs] == [0x10, 0x20]
    p = McelogParser("x")
    assert p.feed("CPU 0 BANK 1\n") == [] and p.feed("STATUS 9400000000000090 ADDR 1000\n") == []
    assert [r.mfn for r in p.finish()] == [1]


ODD = ["\x0b", "\x0c", "\r", "\u2028", "\x1c", "\x85"]


@given(st.lists(st.sampled_from(ODD + ["\xff-bytes"]), min_size=1, max_size=4),
       st.integers(min_value=1, max_value=4))
def test_odd_characters_never_stall_or_double_count(odd, restarts):
    """Lines holding characters str.splitlines() would split on (\\v, \\f, a lone \\r,
    U+2028 ...) or invalid UTF-8: every record after them is read once, the saved offset is
    the file's size in bytes, and restarted readers find nothing new (issue 19, item 5)."""
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as d:
        log = Path(d) / "mcelog"
        store = Store(Path(d) / "r.db")
        data = one(0x10).encode()
        for i, o in enumerate(odd):
            junk = (b"garbage \xff\xfe\xc3 line\n" if o == "\xff-bytes"
                    else f"syslog: noise{o}more{o}\n".encode())
            data += junk + one(0x20 + i, i + 1).encode()
        log.write_bytes(data)
        clk = Clock()
        got = McelogFile(log, store=store, settle=1.0, clock=clk).read(final=True)
        assert sorted(r.mfn for r in got) == sorted([0x10] + [0x20 + i for i in range(len(odd))])
        assert store.source_position(str(log))["offset"] == len(data)
        for _ in range(restarts):
            clk.t += 10
            assert McelogFile(log, store=store, settle=1.0, clock=clk).read() == []
            assert store.source_position(str(log))["offset"] == len(data)


def test_stream_cuts_lines_at_newline_only():
    raw = (one(0x10) + "noise\x0bwith\x0cform\rfeed\n" + one(0x11, 1)).encode() + b"\xff\n"
    recs = list(read_stream(io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8", errors="replace")))
    assert [r.mfn for r in recs] == [0x10, 0x11]
    assert [r.mfn for r in parse_mcelog(raw)] == [0x10, 0x11]
