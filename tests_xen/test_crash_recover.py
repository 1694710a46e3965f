"""Crash safety on real Xen 4.17: ``xenpage mem-offline`` of the running memtest PV guest's
frames is killed with SIGKILL at a journal point (the CLI run by ``tests/crashrun.py``, which
installs the test-only crash hook), then ``xenpage recover`` runs in a new process:

* the guest resumes and memtest -- which fills and verifies its 16 MiB continuously -- reports
  no corruption and no moved page;
* each frame is either rolled back (still the guest's, P2M unchanged, offline-pending) or
  completed (P2M and M2P name a new frame, the old one offlined); the journal is gone;
* dom0's vCPU affinity is what it was, also after a kill while dom0 was pinned off pCPU 0
  (``xl vcpu-list 0``);
* then one ``xenpage mem-offline`` of every frame retires them all.

Kill points, one exchange group of PER frames each (its own frames): before the exchange --
dom0 pinned with split-guard frames held (``pinned:2``), entries cleared (``cleared``), the
content snapshot durable (``snapshot+``) -- and after it: ``XENMEM_exchange`` done but not yet
recorded (``exchanged``: recover finds the new frames through ownership and the M2P), content
copied and P2M written (``p2m``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np

from helpers import ROOT, p2m, run, status, xenpage
from xenpage.abi import sysctl as S
from xenpage.paths import XEN_STATE_DIR
from xenpage.toolstack import journal

CRASHRUN = ROOT / "tests" / "crashrun.py"
POINTS = ["pinned:2", "cleared", "snapshot+", "exchanged", "p2m"]
PER = 3


def _affinity(xen) -> list[list[int]]:
    return [xen.vcpu_affinity(0, v) for v in range(xen.domain_info(0).nr_vcpus)]


def _xl_vcpu_list() -> str:
    return run(["xl", "vcpu-list", "0"], timeout=60).stdout


def _hard_affinities(text: str) -> list[str]:
    """The hard-affinity column of ``xl vcpu-list 0`` (``all``, ``1``, ``0-1`` ...)."""
    out = []
    for line in text.splitlines()[1:]:
        m = re.match(r"^\S+\s+\d+\s+\d+\s+\S+\s+\S+\s+[\d.]+\s+(\S+)\s*/\s*(\S+)", line)
        if m:
            out.append(m.group(1))
    return out


def _journal_ops(sd: Path) -> list[str]:
    try:
        return [r["op"] for r in journal.read(sd)]
    except Exception as e:  # recorded, never fatal here: recover decides
        return [f"unreadable: {e}"]


def test_kill_at_journal_points_then_recover(xen, memtest, rec):
    g = memtest
    sd = XEN_STATE_DIR
    pfns = g.pfns()
    assert len(pfns) >= 4096
    table = p2m(xen, g.domid)
    idx = [int(i) for i in np.linspace(200, len(pfns) - 200, PER * len(POINTS))]
    targets = [(pfns[i], int(table[pfns[i]])) for i in idx]
    assert len({m for _, m in targets}) == len(targets)
    assert all(status(xen, m) == 0 for _, m in targets)
    affinity0 = _affinity(xen)
    xl0 = _xl_vcpu_list()
    assert any(0 in a for a in affinity0), affinity0
    start_mark = g.mark()
    summary = []
    for k, point in enumerate(POINTS):
        batch = targets[k * PER:(k + 1) * PER]
        hexes = [f"{m:x}" for _, m in batch]
        killed = run([sys.executable, CRASHRUN, "--crash-at", point, "--", "--backend", "xen",
                      "mem-offline", *hexes], timeout=300)
        after_kill = {"affinity": _affinity(xen), "xl_vcpu_list": _xl_vcpu_list(),
                      "journal_ops": _journal_ops(sd), "guest": xen.domain_info(g.domid).to_json(),
                      "status": [hex(status(xen, m)) for _, m in batch],
                      "records": sorted(p.name for p in sd.iterdir()) if sd.exists() else []}
        mark = g.mark()
        rcv = xenpage("recover", as_json=True)
        table2 = p2m(xen, g.domid)
        aff = _affinity(xen)
        xl = _xl_vcpu_list()
        info = xen.domain_info(g.domid)
        hb = g.wait_heartbeats(1, after=mark, timeout=120)
        frames = []
        for pfn, old in batch:
            new = int(table2[pfn])
            frames.append({"pfn": hex(pfn), "old": hex(old), "p2m_now": hex(new),
                           "status": hex(status(xen, old)),
                           "m2p_of_p2m": hex(int(xen.m2p([new])[0]))})
        r = rec.add("crash-point", point=point, mfns=hexes, killed=killed.to_json(), after_kill=after_kill,
                    recover=rcv.to_json(), recover_data=rcv.data, affinity_before=affinity0,
                    affinity_after_recover=aff, xl_vcpu_list_after_recover=xl, frames=frames,
                    guest_after=info.to_json() if info else None, heartbeats=hb[-2:],
                    bad_lines=g.bad_lines(mark))
        summary.append(r)
        assert killed.rc == -9, f"{point}: not killed (exit {killed.rc}): {killed.stderr[-1500:]}"
        if point.startswith("pinned"):
            assert all(0 not in a for a in after_kill["affinity"]), after_kill["affinity"]
            assert "dom0-affinity.json" in after_kill["records"]
        else:
            assert after_kill["journal_ops"][:1] == ["begin"], after_kill["journal_ops"]
        assert rcv.rc == 0, f"{point}: recover exit {rcv.rc}: {rcv.stderr[-1500:]}"
        assert rcv.data and rcv.data["ok"], rcv.data
        assert not journal.journal_path(sd).exists()
        assert aff == affinity0, f"{point}: dom0 affinity {aff}, was {affinity0}"
        assert _hard_affinities(xl) == _hard_affinities(xl0), (xl, xl0)
        assert info is not None and not info.shutdown, f"{point}: guest left {info}"
        assert hb, f"{point}: memtest silent after recover: {g.tail()}"
        assert all(c == 0 and mv == 0 for _, _, c, mv in hb), hb
        assert g.bad_lines(mark) == []
        completed = {int(c["mfn"]) for c in rcv.data["completed"]}
        for (pfn, old), f in zip(batch, frames):
            if old in completed:
                new = int(table2[pfn])
                assert new != old and int(xen.m2p([new])[0]) == pfn
                assert status(xen, old) & S.PG_OFFLINE_STATUS_OFFLINED, f
            else:
                assert int(table2[pfn]) == old, f
    # one more command retires every frame, the rolled-back ones exchanged now
    mark = g.mark()
    allhex = [f"{m:x}" for _, m in targets]
    final = xenpage("mem-offline", *allhex, as_json=True)
    table3 = p2m(xen, g.domid)
    hb = g.wait_heartbeats(2, after=mark, timeout=120)
    kinds = [o["kind"] for o in (final.data or {}).get("outcomes", [])]
    st = [status(xen, m) for _, m in targets]
    rec.add("crash-rerun", run=final.to_json(), kinds=kinds, status=[hex(s) for s in st],
            heartbeats=hb[-2:], bad_lines=g.bad_lines(start_mark), affinity=_affinity(xen),
            recover_s=[r["recover"]["elapsed_s"] for r in summary],
            killed_s=[r["killed"]["elapsed_s"] for r in summary],
            completed=[len((r["recover_data"] or {}).get("completed", [])) for r in summary],
            rolled_back=[len((r["recover_data"] or {}).get("rolled_back", [])) for r in summary],
            points=POINTS, console_tail=g.tail(6))
    assert final.rc == 0, final.stderr[-2000:]
    assert set(kinds) <= {"exchanged", "offlined"} and len(kinds) == len(targets), kinds
    assert all(s & S.PG_OFFLINE_STATUS_OFFLINED for s in st), [hex(s) for s in st]
    assert all(int(table3[pfn]) != old for pfn, old in targets)
    assert len(hb) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in hb), hb
    assert g.bad_lines(start_mark) == []
    assert _affinity(xen) == affinity0
    assert xen.domain_info(g.domid) is not None and not xen.domain_info(g.domid).shutdown
