"""A real reboot with the service's ``badpage=`` (group ``reboot``, issue 14): two boots.

Boot 1 (``XENPAGE_REBOOT_PHASE=1``): the service (``xenpage retired``, its own state
directory, policy ``first-error``) reads an mcelog-format log naming two free frames (each the
last of its free buddy, see ``backends/xen/quirks.py``) and a frame of the memtest guest: all
three retired (offlined; the guest's exchanged).  ``xenpage badpages --boot-option`` gives the
option; the option and the state directory go back to the host (``reboot-state.tar``,
``badpage.txt``).

Boot 2 (``XENPAGE_REBOOT_PHASE=2``, ``tests_xen/run_lab.py`` puts the option on Xen's command
line and the state directory into the payload): Xen's command line carries it; each frame as
``xenpage mem-status`` and stock ``xen-hptool mem-status`` report it after the boot; the
service's replay (``xenpage retired --no-follow``) -- what it finds and whether it changes
anything (decisions, outcomes, frame rows, Xen's status).
"""

from __future__ import annotations

import io
import json
import os
import sqlite3
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import OUT, hptool, p2m, status, xenpage
from xenpage.abi import mca as A
from xenpage.abi import sysctl as S
from xenpage.abi.mca import McRecord
from xenpage.backends.xen.quirks import free_frames_followed_by_owned
from xenpage.ras.service import xen_state
from xenpage.ras.sources import format_mcelog
from xenpage.toolstack.pcpu import off_pcpu0

PHASE = os.environ.get("XENPAGE_REBOOT_PHASE", "")
STATE = Path("/tmp/xenpage-reboot-state")
CARRIED = Path("/xenpage/reboot-state.tar")
CE = A.MCI_STATUS_VAL | A.MCI_STATUS_EN | A.MCI_STATUS_MISCV | A.MCI_STATUS_ADDRV | 0x9F

pytestmark = pytest.mark.skipif(PHASE not in ("1", "2"), reason="run by tests_xen/run_lab.py --group reboot")


def export(name: str, data: bytes) -> None:
    (OUT / name).write_bytes(data)
    sys.path.insert(0, "/xenpage/lab/dom0")
    import labproto
    labproto.export_bytes(name, data)


def tables() -> dict:
    c = sqlite3.connect(f"file:{STATE / 'retired.db'}?mode=ro", uri=True)
    try:
        return {t: c.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("frames", "decisions", "outcomes")}
    finally:
        c.close()


def _free_frames(xen, n: int) -> list[int]:
    out = []
    for mfn in free_frames_followed_by_owned(xen, limit=40):
        if status(xen, mfn) != 0:   # the probe's online would put a retired frame back
            continue
        with off_pcpu0(xen):
            rc, st = xen.page_offline_op(S.sysctl_page_offline, mfn, mfn)
        xen.page_offline_op(S.sysctl_page_online, mfn, mfn)
        if rc == 0 and int(st[0]) & S.PG_OFFLINE_STATUS_MASK == S.PG_OFFLINE_OFFLINED:
            out.append(mfn)
            if len(out) == n:
                break
    return out


@pytest.mark.skipif(PHASE != "1", reason="boot 1")
def test_boot1_retire_and_take_the_boot_option(xen, memtest, rec):
    frees = _free_frames(xen, 2)
    assert len(frees) == 2, f"free frames that end their buddy: {frees}"
    pfn = memtest.pfns()[2000]
    guest = int(p2m(xen, memtest.domid)[pfn])
    frames = frees + [guest]
    log = "".join(format_mcelog(McRecord(status=CE, addr=(m << 12) | 0x80, misc=0x86, bank=7, cpu=0,
                                         time=1764900000.0 + i, tsc=0x1000 + i), i)
                  for i, m in enumerate(frames))
    src = Path("/tmp/reboot-mcelog.txt")
    src.write_text(log)
    STATE.mkdir(parents=True, exist_ok=True)
    r = xenpage("--state-dir", STATE, "retired", "--from", src, "--no-follow", "--policy", "first-error",
                timeout=900)
    t = tables()
    states = {row[0]: row[1] for row in t["frames"]}
    st = {m: status(xen, m) for m in frames}
    opt = xenpage("--state-dir", STATE, "badpages", "--boot-option")
    rec.add("reboot-boot1", frames=[hex(m) for m in frames], guest_pfn=pfn, service_exit=r.rc,
            service_out=r.stdout[-3000:], states={hex(k): v for k, v in states.items()},
            xen={hex(m): xen_state(0, v) for m, v in st.items()}, boot_option=opt.stdout.strip(),
            new_guest_mfn=int(p2m(xen, memtest.domid)[pfn]))
    assert r.rc == 0, r.stderr[-2000:]
    assert all(states.get(m) == "retired" for m in frames), states
    assert all(v & S.PG_OFFLINE_STATUS_MASK == S.PG_OFFLINE_OFFLINED for v in st.values()), st
    assert opt.rc == 0 and opt.stdout.startswith("badpage=0x")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        tf.add(STATE, arcname="state")
    export("reboot-state.tar", buf.getvalue())
    export("badpage.txt", opt.stdout.strip().encode())
    export("reboot-frames.json", json.dumps([hex(m) for m in frames]).encode())


@pytest.mark.skipif(PHASE != "2", reason="boot 2")
def test_boot2_badpage_honoured_and_replay(xen, rec):
    assert CARRIED.exists(), "the host did not carry the state directory over"
    with tarfile.open(CARRIED) as tf:
        tf.extractall("/tmp/reboot-carried")
    STATE.parent.mkdir(parents=True, exist_ok=True)
    os.system(f"rm -rf {STATE} && cp -a /tmp/reboot-carried/state {STATE}")
    frames = [int(x, 16) for x in json.loads(os.environ["XENPAGE_REBOOT_FRAMES"])]
    from helpers import run
    xl = run(["xl", "info"], timeout=60).stdout
    xcmd = next((ln.split(":", 1)[1].strip() for ln in xl.splitlines() if ln.startswith("xen_commandline")), "")
    st0 = {m: status(xen, m) for m in frames}
    ours = {m: xenpage("mem-status", hex(m)) for m in frames}
    stock = {m: hptool("mem-status", hex(m)) for m in frames}
    before = tables()
    r = xenpage("--state-dir", STATE, "retired", "--no-follow", "--json", timeout=900)
    after = tables()
    st1 = {m: status(xen, m) for m in frames}
    replay = None
    for ln in r.stdout.splitlines():
        try:
            d = json.loads(ln)
        except ValueError:
            continue
        if d.get("event") == "replay":
            replay = d
    rec.add("reboot-boot2", xen_commandline=xcmd, badpage=os.environ.get("XENPAGE_REBOOT_BADPAGE"),
            frames=[hex(m) for m in frames],
            xen_before={hex(m): [v, xen_state(0, v)] for m, v in st0.items()},
            xen_after={hex(m): [v, xen_state(0, v)] for m, v in st1.items()},
            xenpage_mem_status={hex(m): [x.rc, x.stdout.strip(), x.stderr.strip()] for m, x in ours.items()},
            hptool_mem_status={hex(m): [x.rc, x.stdout.strip(), x.stderr.strip()] for m, x in stock.items()},
            replay=replay, service_exit=r.rc, service_out=r.stdout[-4000:],
            decisions_added=after["decisions"][len(before["decisions"]):],
            outcomes_added=[o[:13] for o in after["outcomes"][len(before["outcomes"]):]],
            frames_before=before["frames"], frames_after=after["frames"])
    assert os.environ.get("XENPAGE_REBOOT_BADPAGE", "x") in xcmd, xcmd
    assert r.rc == 0, r.stderr[-2000:]
    assert replay is not None and replay["checked"] == len(frames), replay
    # what the tools say, side by side, is recorded; the replay finds every frame retired
    # (withheld by Xen since boot, or offlined) and changes nothing: no decision, no outcome,
    # no frame row, no page-offline status
    assert replay["withheld"] + replay["still_offlined"] == len(frames), replay
    assert after["decisions"] == before["decisions"] and after["outcomes"] == before["outcomes"]
    assert after["frames"] == before["frames"]
    assert st1 == st0
    assert {row[0]: row[1] for row in after["frames"]} == {m: "retired" for m in frames}
