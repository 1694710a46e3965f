"""``mem-offline`` end to end (``xenpage.toolstack.offline.mem_offline`` and the real
``xenpage`` command in subprocesses): mark, suspend the owning PV guest once through
xenstore, exchange all its frames with one scan, resume it; xen-hptool's lines on their
streams, then ``xenpage:`` lines where hptool says nothing or something wrong.

Expected lines (xen-semantics.md 6.2, xen-lab.md):

* PV guest page exchanged -- stdout ``Prepare to offline MEMORY mfn X``, ``Memory mfn X
  offlined successfully, this page is DOM1 page and being swapped successfully, current state
  is [PG_OFFLINE_OFFLINED, PG_OFFLINE_OWNED]``, ``xenpage: d1 gpfn ... moved ...``; exit 0;
* not exchanged (granted, referenced elsewhere) -- stderr ``Memory mfn X offlined
  successfully , this page is DOM1 page yet failed to be exchanged. current state is
  [PG_OFFLINE_PENDING, PG_OFFLINE_OWNED]`` and the reason; exit 1;
* dom0 page -- stderr ``DOM0: No suspend port, try live migration``, ``Failed to suspend guest
  0 for mfn X`` (as the lab's real Xen 4.17 printed) and why; exit 1;
* ``--json``: one document with every outcome; ``START-END`` ranges; ``dump-p2m`` in
  xen-mfndump's format (the lab's ``xen-mfndump dump-p2m 1`` lines).
"""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import numpy as np
import pytest

from test_exchange import DEFAULT, SMALL, before, new_world, snap_diff, snapshot
from xenpage.abi import sysctl as S
from xenpage.backends.sim import host_path
from xenpage.guests import linux_pv as L
from xenpage.hypervisor import invariants
from xenpage.hypervisor.host import Host
from xenpage.toolstack.offline import mem_offline
from xenpage.toolstack.outcomes import Kind, Reason

SWAPPED = ("Memory mfn {m:x} offlined successfully, this page is DOM{d} page and being swapped "
           "successfully, current state is [PG_OFFLINE_OFFLINED, PG_OFFLINE_OWNED]")
NOT_SWAPPED = ("Memory mfn {m:x} offlined successfully , this page is DOM{d} page yet failed to be "
               "exchanged. current state is [PG_OFFLINE_PENDING, PG_OFFLINE_OWNED]")
MOVED = re.compile(r"xenpage: d(\d+) gpfn (0x[0-9a-f]+) moved from mfn (0x[0-9a-f]+) to mfn (0x[0-9a-f]+); "
                   r"(\d+) page-table entries re-pointed with their flags; old frame offlined")


# -- in process ---------------------------------------------------------------------------------------------

def test_many_pages_of_one_guest_under_one_suspend_and_one_scan():
    w = new_world(DEFAULT, hold_fixed=True)  # no new frame from Xen's fixed range to move again
    g = w.g
    pfns = g.kernel_only_pages()[200:232] + g.user_pages("private")[20:28] + g.user_pages("ro")
    b = before(w, pfns)
    steps = []
    res = mem_offline(w.hv, b.mfns, hook=lambda s, **kw: steps.append(s))
    assert [o.kind for o in res.outcomes] == [Kind.EXCHANGED] * len(pfns)
    assert (g.suspends, g.resumes) == (1, 1) and not g.suspended
    assert steps.count("scanned") == 1 and steps.count("exchanged") == 1
    t = res.timings["guests"][1]
    assert t["pages"] == len(pfns) and t["resume_rc"] == 0
    assert t["survey_s"] > 0  # the guest was surveyed before it was suspended
    assert 0 < t["toolstack_s"] < t["suspended_s"]
    assert t["suspended_s"] == pytest.approx(t["suspend_s"] + t["toolstack_s"] + t["resume_s"])
    assert res.report.exit_code == 0
    lines = res.report.stdout.splitlines()
    assert len(lines) == 3 * len(pfns) and res.report.stderr == ""
    p2m = np.asarray(w.h.pv_p2m(1))
    for i, (pf, m, o) in enumerate(zip(pfns, b.mfns, res.outcomes)):
        assert lines[3 * i:3 * i + 2] == [f"Prepare to offline MEMORY mfn {m:x}", SWAPPED.format(m=m, d=1)]
        d, gp, old, new, n = MOVED.fullmatch(lines[3 * i + 2]).groups()
        assert (int(d), int(gp, 16), int(old, 16), int(new, 16), int(n)) == (1, pf, m, o.new_mfn, len(b.refs[m]))
        assert int(p2m[pf]) == o.new_mfn and w.status(m) == S.PG_OFFLINE_STATUS_OFFLINED
    assert invariants.check(w.h) == [] and g.verify() == []
    g.step(200)
    assert g.verify() == []


def test_mixed_frames_one_suspend_per_guest():
    """Free, dom0, HVM, Xen-image and PV frames in one command: each gets hptool's answer, the
    PV guest is suspended once for all of its frames."""
    w = new_world(DEFAULT)
    g, h = w.g, w.h
    free = max(h.heap.chunks(), key=lambda c: c[1])[0] + 3
    d0 = int(h.owned_frames(0)[5000])
    hvm = int(h.owned_frames(2)[10])
    data = [w.mfn(p) for p in g.kernel_only_pages()[300:303]]
    ring, xs = w.mfn(g.rings[0]["pfn"]), w.mfn(g.daemon_maps[0]["pfn"])
    l1 = w.mfn(g.procs[0].ul1[0])
    xen = h.xen_image[0] + 1
    mfns = [free, data[0], d0, ring, hvm, data[1], xs, l1, xen, data[2]]
    res = mem_offline(w.hv, mfns)
    got = {o.mfn: (o.kind, o.reason) for o in res.outcomes}
    assert got[free] == (Kind.OFFLINED, Reason.NONE)
    assert got[d0] == (Kind.PENDING, Reason.DOM0)
    assert got[hvm] == (Kind.MIGRATED, Reason.NONE)  # live-migrated to the same host
    assert got[ring] == (Kind.PENDING, Reason.GRANTED)
    assert got[xs] == (Kind.ROLLED_BACK, Reason.REFERENCED)
    assert got[xen][0] == Kind.REFUSED
    assert {got[m] for m in data + [l1]} == {(Kind.EXCHANGED, Reason.NONE)}
    assert (g.suspends, g.resumes) == (1, 1)
    assert list(res.timings["guests"]) == [1]
    assert res.report.exit_code == 1
    assert invariants.check(h) == [] and g.verify() == []


def test_an_already_suspended_guest_is_left_suspended():
    w = new_world(SMALL)
    w.suspend()
    m = w.mfn(w.g.kernel_only_pages()[10])
    res = mem_offline(w.hv, [m])
    assert res.outcomes[0].kind == Kind.EXCHANGED
    assert w.g.suspended and w.g.suspends == 1 and w.g.resumes == 0
    assert res.timings["guests"][1]["suspended_s"] is None  # not a suspend xenpage made
    w.resume()
    assert w.g.verify() == []


def test_a_guest_that_does_not_suspend_keeps_its_frames_pending():
    """A PV domain with no kernel answering ``control/shutdown``: after the timeout nothing
    was touched and the frame stays pending."""
    w = new_world(SMALL)
    g = w.h.guests.pop(1)  # nobody home
    m = g.mfn(g.kernel_only_pages()[11])
    guestless = SimpleNamespace(h=w.h, domid=1, g=g)
    s = snapshot(guestless)
    res = mem_offline(w.hv, [m], suspend_timeout=0.2)
    o = res.outcomes[0]
    assert (o.kind, o.reason) == (Kind.PENDING, Reason.SUSPEND_FAILED)
    assert res.report.stderr.splitlines()[:2] == [f"Failed to suspend guest 1 for mfn {m:x}",
                                                  f"xenpage: {o.detail}"]
    assert res.report.exit_code == 1
    after = snapshot(guestless)
    # only the frame's state changed (in use -> offline-pending)
    assert snap_diff(s, after) == [f"count_info differs at mfns ['{m:#x}']"]
    assert w.hv.xs_read("/local/domain/1/control/shutdown") == ""  # the request was withdrawn
    assert invariants.check(w.h) == []


# -- the command --------------------------------------------------------------------------------------------

@pytest.fixture
def host0(cli_state) -> Host:
    """The saved default host of ``cli_state`` as the command will find it."""
    return Host.load(host_path(cli_state))


def _saved(cli_state) -> Host:
    return Host.load(host_path(cli_state))


def test_command_success(cli_state, xenpage_cli, host0):
    g = host0.guests[1]
    pf = g.kernel_only_pages()[77]
    m = g.mfn(pf)
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}")
    assert (r.stderr, r.returncode) == ("", 0)
    out = r.stdout.splitlines()
    assert out[:2] == [f"Prepare to offline MEMORY mfn {m:x}", SWAPPED.format(m=m, d=1)]
    d, gp, old, new, n = MOVED.fullmatch(out[2]).groups()
    assert (d, int(gp, 16), int(old, 16), n) == ("1", pf, m, "1") and len(out) == 3
    h = _saved(cli_state)
    g = h.guests[1]
    assert g.mfn(pf) == int(new, 16) and (g.suspends, g.resumes) == (1, 1)
    assert invariants.check(h) == [] and g.verify() == []
    r = xenpage_cli(cli_state, "mem-status", f"{m:x}")
    assert r.stdout.splitlines()[-1] == "Memory Status 2: [ PAGE_OFFLINED ]"
    r = xenpage_cli(cli_state, "dump-p2m", "1", "--limit", str(pf + 1))
    assert r.stdout.splitlines()[-2] == f"  pfn={pf:#x} ==> mfn={new} (type 0x0)"


@pytest.mark.parametrize("what", ["grant-ring", "granted-unmapped", "xenstore-ring"])
def test_command_page_not_exchanged(cli_state, xenpage_cli, host0, what):
    g = host0.guests[1]
    pf, ref = {"grant-ring": (g.rings[0]["pfn"], g.rings[0]["ref"]),
               "granted-unmapped": (g.granted[0]["pfn"], g.granted[0]["ref"]),
               "xenstore-ring": (g.daemon_maps[0]["pfn"], None)}[what]
    m = g.mfn(pf)
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}")
    assert r.returncode == 1
    assert r.stdout == f"Prepare to offline MEMORY mfn {m:x}\n"
    err = r.stderr.splitlines()
    assert err[0] == NOT_SWAPPED.format(m=m, d=1) and len(err) == 2
    if ref is not None:
        assert err[1] == f"xenpage: mfn {m:x}: pending (granted): granted to d0 (grant ref {ref})"
    else:
        assert err[1].startswith(f"xenpage: mfn {m:x}: rolled-back (referenced-elsewhere): still referenced")
    h = _saved(cli_state)
    assert h.guests[1].mfn(pf) == m and (h.guests[1].suspends, h.guests[1].resumes) == (1, 1)
    assert invariants.check(h) == [] and h.guests[1].verify() == []
    r = xenpage_cli(cli_state, "mem-status", f"{m:x}")
    assert r.stdout.splitlines()[-1] == "Memory Status 8: [ PAGE_OFFLINE_PENDING  PAGE_ONLINED ]"


def test_command_dom0_page(cli_state, xenpage_cli, host0):
    m = int(host0.owned_frames(0)[len(host0.owned_frames(0)) // 3])
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}")
    assert (r.stdout, r.returncode) == (f"Prepare to offline MEMORY mfn {m:x}\n", 1)
    err = r.stderr.splitlines()
    assert err[:2] == ["DOM0: No suspend port, try live migration", f"Failed to suspend guest 0 for mfn {m:x}"]
    assert err[2].startswith(f"xenpage: mfn {m:x}: dom0 is never suspended") and len(err) == 3


def test_command_json(cli_state, xenpage_cli, host0):
    g = host0.guests[1]
    pfs = [g.kernel_only_pages()[90], g.rings[1]["pfn"]]
    ms = [g.mfn(p) for p in pfs]
    r = xenpage_cli(cli_state, "mem-offline", *[f"{m:x}" for m in ms], "--json")
    assert r.returncode == 1 and r.stderr == ""
    d = json.loads(r.stdout)
    assert d["command"] == "mem-offline" and d["exit"] == 1
    o1, o2 = d["outcomes"]
    assert (o1["mfn"], o1["mfn_hex"], o1["kind"], o1["reason"], o1["domid"], o1["gpfn"]) == \
        (ms[0], f"{ms[0]:x}", "exchanged", "", 1, pfs[0])
    assert o1["new_mfn_hex"] == f"{o1['new_mfn']:x}" and o1["status"]["status"] == S.PG_OFFLINE_STATUS_OFFLINED
    assert o1["extra"]["toolstack_s"] > 0 and o1["ptes"] == 1
    assert (o2["kind"], o2["reason"], o2["new_mfn"]) == ("pending", "granted", None)
    assert o2["extra"]["grant_refs"] == [g.rings[1]["ref"]]
    t = d["timings"]["guests"]["1"]
    assert t["pages"] == 2 and t["suspended_s"] >= t["toolstack_s"] > 0
    # the same lines as without --json, inside the document
    assert d["stdout"][:2] == [f"Prepare to offline MEMORY mfn {ms[0]:x}", SWAPPED.format(m=ms[0], d=1)]
    assert NOT_SWAPPED.format(m=ms[1], d=1) in d["stderr"]


def _consecutive(g, want: int) -> int:
    """The first of ``want`` consecutive MFNs that are all kernel-only data pages."""
    ms = np.array(sorted(g.mfn(p) for p in g.kernel_only_pages()[:4000]))
    run = 1
    for i in range(1, ms.size):
        run = run + 1 if ms[i] == ms[i - 1] + 1 else 1
        if run == want:
            return int(ms[i - want + 1])
    raise AssertionError("no run")


def test_command_range(cli_state, xenpage_cli, host0):
    g = host0.guests[1]
    a = _consecutive(g, 12)
    b = a + 11
    r = xenpage_cli(cli_state, "mem-offline", f"{a:x}-{b:x}", "--each")
    assert (r.stderr, r.returncode) == ("", 0)
    out = r.stdout.splitlines()
    assert out.pop() == "xenpage: mem-offline of 12 frames: 12 exchanged"   # --each: the summary too
    assert len(out) == 3 * 12
    for i, m in enumerate(range(a, b + 1)):
        assert out[3 * i:3 * i + 2] == [f"Prepare to offline MEMORY mfn {m:x}", SWAPPED.format(m=m, d=1)]
        assert MOVED.fullmatch(out[3 * i + 2])
    h = _saved(cli_state)
    assert (h.guests[1].suspends, h.guests[1].resumes) == (1, 1)  # one suspend for the range
    assert all(h.ft.state(m) == 2 for m in range(a, b + 1))
    assert invariants.check(h) == [] and h.guests[1].verify() == []
    # without --each a range says one line: frames per outcome (again: already offlined)
    r = xenpage_cli(cli_state, "mem-offline", f"{a:x}-{b:x}")
    assert (r.stderr, r.returncode) == ("", 0)
    assert r.stdout.splitlines() == [
        "xenpage: mem-offline of 12 frames: 12 offlined"]
    r = xenpage_cli(cli_state, "mem-offline", f"{a - 2:x}-{b:x}", "--json")
    d = json.loads(r.stdout)
    assert d["summary"]["counts"]["offlined"] == 12 and d["offlined_runs"][-1] == [a, b]
    assert d["frames"] == 14 and sum(d["summary"]["counts"].values()) == 14
    assert len(d["outcomes"]) == 2 and d["exit"] == r.returncode
    # a range the wrong way round, or unparsable, does nothing
    for bad in (f"{b:x}-{a:x}", f"{a:x}-zz"):
        r = xenpage_cli(cli_state, "mem-offline", bad)
        assert r.returncode == 1 and r.stdout == "" and r.stderr.startswith("xenpage: ")
        assert r.stderr.rstrip().endswith("nothing done")


# -- dump-p2m vs xen-mfndump --------------------------------------------------------------------------------

LINE = re.compile(r"  pfn=0x([0-9a-f]+) ==> mfn=0x([0-9a-f]+) \(type 0x([0-9a-f])\)( L[1-4]| pinned L[1-4])?")


def test_dump_p2m_format(cli_state, xenpage_cli, host0):
    g = host0.guests[1]
    r = xenpage_cli(cli_state, "dump-p2m", "1")
    assert (r.stderr, r.returncode) == ("", 0)
    lines = r.stdout.splitlines()
    p2m = np.asarray(host0.pv_p2m(1)).astype(np.int64)
    n = p2m.size
    assert lines[0] == " --- Dumping P2M for domain 1 ---"
    assert lines[1] == f" Guest Width: 8, PT Levels: 4 P2M size: = {n}"
    assert lines[-1] == " --- End of P2M for domain 1 ---"
    assert len(lines) == n + 3
    want_suffix = {L.L1T: {" pinned L1", " L1"}, L.L2T: {" L2"}, L.L3T: {" L3"}, L.L4T: {" pinned L4"}}
    for pf, line in enumerate(lines[2:-1]):
        mo = LINE.fullmatch(line)
        assert mo, line
        assert (int(mo[1], 16), int(mo[2], 16)) == (pf, int(p2m[pf]))
        suffix = mo[4] or ""
        role = int(g.role[pf])
        assert suffix in want_suffix.get(role, {""}), (pf, L.ROLE_NAMES[role], line)
        t = int(mo[3], 16)
        assert t == {"": 0, " L1": 1, " L2": 2, " L3": 3, " L4": 4, " pinned L1": 9, " pinned L4": 0xC}[suffix]
    # Linux pins every direct-map, vmalloc and user L1, not the kernel-image / fixmap ones
    assert all(lines[2 + p].endswith(") pinned L1") for p in g.tables["direct_l1"] + g.procs[0].ul1)
    assert lines[2 + g.tables["kernel_l1"][0]].endswith(") L1")
    # the lab's xen-mfndump printed its data lines in exactly this shape
    lab = ["  pfn=0x0 ==> mfn=0x6ca00 (type 0x0)", "  pfn=0x25 ==> mfn=0x6ca25 (type 0x0)"]
    assert all(LINE.fullmatch(x) for x in lab)
    r2 = xenpage_cli(cli_state, "dump-p2m", "1", "--limit", "5", "--json")
    d = json.loads(r2.stdout)
    assert d["p2m_size"] == n and [e["mfn"] for e in d["entries"]] == p2m[:5].tolist()


def test_dump_p2m_refusals(cli_state, xenpage_cli):
    r = xenpage_cli(cli_state, "dump-p2m", "9")
    assert (r.stdout, r.returncode) == ("", 1)
    assert r.stderr.splitlines()[0] == "xc: error: Failed to obtain info for domain 9"
    r = xenpage_cli(cli_state, "dump-p2m", "2")  # the HVM guest: Xen keeps its P2M
    assert r.returncode == 1 and r.stderr.splitlines()[0] == "xc: error: Could not map domain 2 memory information"
