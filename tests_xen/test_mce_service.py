"""The retirement service on real Xen, fed by machine checks the emulated hardware raises
(group ``mce``, issue 14).

Boots the lab's rebuilt Xen 4.17, which has upstream's bank-mask fix
(``lab/xen-rebuilt/build.sh``: without it Xen 4.13-4.20 scan no MCA bank, tests_xen/README.md)
on QEMU's ``-cpu Haswell-noTSX`` (Xen
takes Intel's machine-check path), with QEMU's monitor on a socket.  ``xenpage retired`` runs
in dom0 as the service: its own state directory, its default source (``/dev/mcelog``, read
natively), mcelog's threshold (2 corrected errors in 24 h).  The test asks the host (a console
note ``mce-inject ...``, turned by ``lab/xenlab.py`` into the monitor's ``mce`` command) to
write an MCi bank of the emulated CPU with a memory error at a frame's machine address.  From
there on nothing is the project's until dom0 reads ``/dev/mcelog``: Xen's poller (corrected
errors) or #MC handler (uncorrected) -> ``XEN_MC_fetch`` -> the xen-mcelog driver -> the
service -> threshold -> ``mem-offline`` (exchange) of the memtest guest's frame.

* corrected errors on two memtest frames, one below then one above the threshold: the frame
  stays online after the first, is exchanged after the second; memtest reports nothing; the
  time from injection to "retired" is recorded;
* an uncorrected memory error (SRAO, memory scrub) on a free frame and on a memtest frame:
  what Xen did (its page-offline status, the guest's fate) and what the service recorded.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import OUT, domid_of, p2m, run, status, xenpage_cmd
from xenpage.abi import mca as A
from xenpage.abi import sysctl as S
from xenpage.backends.xen.quirks import free_frames_followed_by_owned
from xenpage.ras.service import xen_state
from xenpage.toolstack.pcpu import off_pcpu0

STATE = Path("/tmp/xenpage-mce-state")
#: a corrected memory read error: VAL EN MISCV ADDRV, MCACOD 0x9f (memory, channel unspecified)
CE = A.MCI_STATUS_VAL | A.MCI_STATUS_EN | A.MCI_STATUS_MISCV | A.MCI_STATUS_ADDRV | 0x9F
#: an uncorrected, software-recoverable, action-optional memory scrub error (SRAO, MCACOD 0xc0)
UC = (A.MCI_STATUS_VAL | A.MCI_STATUS_UC | A.MCI_STATUS_EN | A.MCI_STATUS_MISCV
      | A.MCI_STATUS_ADDRV | A.MCI_STATUS_S | 0xC0)
#: MCi_MISC: physical address mode (2), least significant valid bit 6
MISC = 0x86
#: MCG_STATUS of the #MC: MCIP | RIPV
MCG_UC = 0x5
CE_BANK = 1
UC_BANK = 1
WAIT = float(os.environ.get("LAB_MCE_WAIT", "120"))


def note(text: str) -> None:
    sys.path.insert(0, "/xenpage/lab/dom0")
    import labproto
    labproto.note(text)


def inject(status_: int, addr: int, mcg: int = 0, bank: int = CE_BANK, broadcast: bool = False) -> float:
    """Ask the host to write an MCi bank of CPU 0 (``-b``: raise #MC on every CPU, as Xen's
    Intel handler expects of a broadcast machine check)."""
    t = time.time()
    note(f"mce-inject {'-b ' if broadcast else ''}0 {bank} {status_:#x} {mcg:#x} {addr:#x} {MISC:#x}")
    return t


def db() -> sqlite3.Connection:
    return sqlite3.connect(f"file:{STATE / 'retired.db'}?mode=ro", uri=True, timeout=30)


def events_on(mfn: int) -> list[tuple]:
    with db() as c:
        return c.execute("SELECT id, logged, kind, source, status FROM events WHERE mfn=? ORDER BY id",
                         (mfn,)).fetchall()


def frame_row(mfn: int) -> dict | None:
    with db() as c:
        c.row_factory = sqlite3.Row
        r = c.execute("SELECT * FROM frames WHERE mfn=?", (mfn,)).fetchone()
        return dict(r) if r else None


def wait_for(cond, timeout: float = WAIT, step: float = 0.5):
    end = time.time() + timeout
    while True:
        v = cond()
        if v or time.time() > end:
            return v
        time.sleep(step)


@pytest.fixture(scope="module")
def service():
    """``xenpage retired`` as the service: default source, its own state directory."""
    STATE.mkdir(parents=True, exist_ok=True)
    log = open(OUT / "mce-service.log", "w")
    argv = xenpage_cmd() + ["--backend", "xen", "--state-dir", str(STATE), "retired",
                            "--policy", "mcelog", "--interval", "1", "--verbose"]
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, text=True)
    started = wait_for(lambda: "xenpage-retired: started" in (OUT / "mce-service.log").read_text()
                       or p.poll() is not None, timeout=300)
    text = (OUT / "mce-service.log").read_text()
    assert started and p.poll() is None, f"the service did not start: {text[-2000:]}"
    assert "sources=/dev/mcelog" in text, text[-2000:]
    yield p
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(60)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    log.close()


def _memtest_frames(xen, memtest, n: int) -> list[tuple[int, int]]:
    pfns = memtest.pfns()
    table = p2m(xen, memtest.domid)
    picks = [pfns[i] for i in (700, 1700, 2700, 3700)[:n]]
    return [(pfn, int(table[pfn])) for pfn in picks]


def _clean(memtest, mark: int) -> tuple:
    hb = memtest.wait_heartbeats(1, after=mark, timeout=120)
    return hb, memtest.bad_lines(mark)


def test_corrected_errors_retire_a_memtest_frame(xen, memtest, service, rec):
    mark = memtest.mark()
    res = []
    for pfn, mfn in _memtest_frames(xen, memtest, 2):
        assert status(xen, mfn) == 0
        addr = (mfn << 12) | 0x40
        t1 = inject(CE, addr)
        ev = wait_for(lambda: len(events_on(mfn)) >= 1)
        seen1 = time.time() - t1
        assert ev, f"no record of the first corrected error on {mfn:#x} within {WAIT:.0f} s"
        time.sleep(2)   # the service acts within a poll of the record: it must not
        below = {"frame": frame_row(mfn), "xen": xen_state(0, status(xen, mfn))}
        assert below["frame"] is None and status(xen, mfn) == 0, below
        t2 = inject(CE, addr + 0x40)
        done = wait_for(lambda: (frame_row(mfn) or {}).get("state") == "retired")
        to_retired = time.time() - t2
        fr = frame_row(mfn)
        st = status(xen, mfn)
        new = int(p2m(xen, memtest.domid)[pfn])
        r = {"pfn": pfn, "mfn": mfn, "new_mfn": new, "first_record_s": round(seen1, 2),
             "injection_to_retired_s": round(to_retired, 2), "frame": fr,
             "xen_status": st, "events": events_on(mfn)}
        res.append(r)
        rec.add("mce-ce", **r)
        assert done, f"{mfn:#x} not retired {WAIT:.0f} s after the second error: {fr}"
        assert fr["outcome"] == "exchanged" and st & S.PG_OFFLINE_STATUS_MASK == S.PG_OFFLINE_OFFLINED
        assert new != mfn
    hb, bad = _clean(memtest, mark)
    rec.add("mce-ce-memtest", heartbeats=hb[-3:], bad=bad)
    assert hb and all(h[2] == 0 and h[3] == 0 for h in hb) and not bad


def _free_frame(xen) -> int | None:
    """A free frame that ends its free buddy: probed with an offline and an online (only
    frames Xen reports online: the probe's online would put a retired frame back -- the
    first run took the frame the corrected errors had just retired)."""
    for mfn in free_frames_followed_by_owned(xen, limit=30):
        if status(xen, mfn) != 0:
            continue
        with off_pcpu0(xen):
            rc, st = xen.page_offline_op(S.sysctl_page_offline, mfn, mfn)
        xen.page_offline_op(S.sysctl_page_online, mfn, mfn)
        if rc == 0 and int(st[0]) & S.PG_OFFLINE_STATUS_MASK == S.PG_OFFLINE_OFFLINED:
            return mfn
    return None


def _uncorrected(xen, mfn: int, rec, what: str, domid: int | None = None) -> dict:
    t = inject(UC, mfn << 12, mcg=MCG_UC, bank=UC_BANK, broadcast=True)
    ev = wait_for(lambda: any(e[2] == "uc" for e in events_on(mfn)))
    took = time.time() - t
    fr = wait_for(lambda: frame_row(mfn), timeout=30)
    st = status(xen, mfn)
    r = {"what": what, "mfn": mfn, "record_s": round(took, 2), "events": events_on(mfn),
         "frame": fr, "xen_status": st, "xen_state": xen_state(0, st),
         "xl_list": run(["xl", "list"], timeout=60).stdout,
         "xl_dmesg": [ln for ln in run(["xl", "dmesg"], timeout=60).stdout.splitlines()
                      if "MCE" in ln or "mce" in ln.lower() or "offline" in ln.lower()][-30:]}
    if domid is not None:
        r["guest_alive"] = domid_of("memtest") == domid
    rec.add("mce-uc", **r)
    assert ev, f"no uncorrected record on {mfn:#x} within {WAIT:.0f} s: {r['xl_dmesg'][-5:]}"
    return r


def test_uncorrected_error_on_a_free_frame(xen, service, rec):
    mfn = _free_frame(xen)
    if mfn is None:
        pytest.skip("no free frame that ends its buddy")
    r = _uncorrected(xen, mfn, rec, "free")
    # Xen's mc_memerr_dhandler offlines it as broken; the service records that, nothing more
    assert r["xen_status"] & S.PG_OFFLINE_STATUS_BROKEN, r
    assert r["frame"] and r["frame"]["action"] == "hard" and r["frame"]["broken"] == 1, r


def test_uncorrected_error_on_a_memtest_frame(xen, memtest, service, rec):
    (pfn, mfn), = _memtest_frames(xen, memtest, 4)[3:]
    mark = memtest.mark()
    r = _uncorrected(xen, mfn, rec, "memtest", domid=memtest.domid)
    hb, bad = _clean(memtest, mark)
    rec.add("mce-uc-memtest", heartbeats=hb[-3:], bad=bad, guest_alive=r.get("guest_alive"))
    # whatever Xen did with the guest, the service's row says what Xen's status says
    assert r["xen_status"] & S.PG_OFFLINE_STATUS_BROKEN, r
    assert r["frame"] is not None and r["frame"]["action"] == "hard" and r["frame"]["broken"] == 1, r
    out = OUT / "mce-service-db.json"
    with db() as c:
        out.write_text(json.dumps({t: c.execute(f"SELECT * FROM {t}").fetchall()
                                   for t in ("frames", "decisions", "outcomes")}, default=str))
