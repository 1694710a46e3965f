"""``xenpage owner``: who owns a frame, from read-only calls only (the offline query, the
M2P, getpageframeinfo3 and, for translated guests, the frame behind the gfn) -- checked
against the simulator's own frame table, and shown to change nothing."""

from __future__ import annotations

import json

import numpy as np

from xenpage.abi import mm
from xenpage.abi import sysctl as S
from xenpage.backends.sim import SimHypervisor, build_host
from xenpage.hypervisor import invariants
from xenpage.toolstack.offline import mem_offline
from xenpage.toolstack.owner import frame_owners

HOST = build_host()
HV = SimHypervisor(HOST)


def _frames():
    h = HOST
    pv = h.guests[1]
    return {
        "pv": pv.mfn(pv.user_pages("shared")[0]),
        "hvm": int(h.p2m[2][100]),
        "pvh": int(h.p2m[3][100]),
        "dom0": int(np.flatnonzero(h.ft.owner1 == 1)[50]),
        "free": int(np.flatnonzero(h.ft.states(0, h.nframes) == mm.STATE_FREE)[-1]),
        "l4": next(m for m in range(h.nframes) if h.ft.owner1[m] == 2
                   and (int(h.ft.type_info[m]) >> 61) == 4),
    }


def _state(host):
    ft = host.ft
    return [getattr(ft, f).copy() for f in ft.FIELDS] + [host.heap.list_order()]


def test_owner_answers_match_the_frame_table_and_change_nothing():
    f = _frames()
    before = _state(HOST)
    res = frame_owners(HV, [f["pv"], f["hvm"], f["pvh"], f["dom0"], f["free"], f["l4"], 0xA0])
    after = _state(HOST)
    assert all(np.array_equal(a, b) for a, b in zip(before[:-1], after[:-1])) and before[-1] == after[-1]
    pv, hvm, pvh, d0, free, l4, hole = res
    assert (pv.domid, pv.type, pv.state) == (1, "pv", "online") and pv.pfn == HOST.ft.m2p(f["pv"])
    assert (hvm.domid, hvm.type, hvm.pfn) == (2, "hvm", 100)
    assert (pvh.domid, pvh.type, pvh.pfn) == (3, "pvh", 100)
    assert d0.domid == 0 and d0.name == "Domain-0"
    assert free.domid is None and free.state == "online"
    assert (l4.domid, l4.page_type, l4.pinned) == (1, "L4TAB", True)
    assert hole.rc < 0 and hole.state == "not-ram" and hole.domid is None


def test_owner_after_offline_shows_the_state(tmp_path):
    host = build_host()
    hv = SimHypervisor(host)
    d0 = int(np.flatnonzero(host.ft.owner1 == 1)[60])
    free = int(np.flatnonzero(host.ft.states(0, host.nframes) == mm.STATE_FREE)[-3])
    mem_offline(hv, [d0, free])
    a, b = frame_owners(hv, [d0, free])
    assert (a.domid, a.state) == (0, "offline-pending")
    assert (b.domid, b.state) == (None, "offlined")
    assert invariants.check(host) == []


def test_owner_cli(cli_state, xenpage_cli):
    from xenpage.backends.sim import host_path
    from xenpage.hypervisor.host import Host
    host0 = Host.load(host_path(cli_state))
    f = host0.guests[1].mfn(host0.guests[1].user_pages("shared")[0])
    r = xenpage_cli(cli_state, "owner", f"{f:x}", "a0")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"mfn {f:x}: d1 (domu1, PV) pfn 0x") and lines[0].endswith(", online")
    assert lines[1] == "mfn a0: not queryable (error 22): no such frame or not RAM"
    r = xenpage_cli(cli_state, "owner", f"{f:x}", "--json")
    d = json.loads(r.stdout)
    assert d["command"] == "owner" and d["exit"] == 0 and d["frames"][0]["domid"] == 1
    assert d["frames"][0]["status"]["status"] == 0 and d["frames"][0]["status"]["op"] == "query"
    r = xenpage_cli(cli_state, "owner", "3f1o0")
    assert r.returncode == 1 and r.stdout == "" and "not a hexadecimal MFN" in r.stderr
    q = xenpage_cli(cli_state, "mem-status", f"{f:x}")
    assert "PAGE_ONLINED" in q.stdout  # nothing was offlined by asking
