"""Xen 4.17's page-offline hang (xen-lab.md): after an owned frame is offlined from physical
CPU 0, the next offline of that owner's frames or its destruction spins for ever.  Everything
here goes through xenpage, which keeps dom0 off pCPU 0 for every offline and restores its
affinity: repeated offline/online of one dom0 frame; many offlines in one domU (exchanged
ones, and its granted console ring, which stays pending); then the domU's destruction, which
turns the pending frame into an offlined one.  None of it may hang.

Runs last (conftest.ORDER): the granted frame freed by the destruction can leave misaligned
free chunks in Xen 4.17's heap (backends/xen/quirks.py), so no domain is built after it and
the frame is not onlined again."""

from __future__ import annotations

import time

from helpers import destroy_guest, p2m, start_guest, status, xenpage, xenpage_inproc
from xenpage.abi import grant as G
from xenpage.abi import sysctl as S

DOM0_FRAME = 0x63FFF


def _affinities(xen):
    return [xen.vcpu_affinity(0, v) for v in range(xen.domain_info(0).nr_vcpus)]


def test_dom0_frame_cycles(xen, rec):
    before = _affinities(xen)
    assert all(0 in a for a in before)
    times = []
    for i in range(5):
        t = time.perf_counter()
        off = xenpage_inproc("mem-offline", f"{DOM0_FRAME:x}")
        st = status(xen, DOM0_FRAME)
        on = xenpage_inproc("mem-online", f"{DOM0_FRAME:x}")
        times.append(round(time.perf_counter() - t, 3))
        assert off.rc == 1 and "DOM0: No suspend port, try live migration" in off.stderr, off.stderr
        assert st == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
        assert on.rc == 0 and status(xen, DOM0_FRAME) == 0
        assert _affinities(xen) == before, "dom0's vCPU affinity was not restored"
    rec.add("hang-guard-dom0-cycles", mfn=hex(DOM0_FRAME), cycles=5, seconds=times, affinity=before)


def test_domu_offlines_granted_frame_then_destroy(xen, rec):
    before = _affinities(xen)
    g = start_guest("memtest-hang")
    try:
        table = p2m(xen, g.domid)
        pfns = g.pfns()
        mfns = [int(table[pfns[i]]) for i in (100, 900, 1700, 2500, 3300, 4000)]
        ring = int(xen.xs_read(f"/local/domain/{g.domid}/console/ring-ref"))
        rc, ents = xen.grant_entries(g.domid)
        assert rc == 0
        refs = [i for i, e in enumerate(ents.tolist()) if e & G.GTF_type_mask and e >> 32 == ring]
        assert refs, f"console ring {ring:#x} is not named by a live grant entry"
        mark = g.mark()
        runs = []
        for m in mfns:                      # one command (one offline sysctl, one suspend) each
            r = xenpage_inproc("mem-offline", f"{m:x}")
            runs.append({"mfn": hex(m), "exit": r.rc, "elapsed_s": round(r.elapsed_s, 3)})
            assert r.rc == 0, r.stderr
            assert status(xen, m) == S.PG_OFFLINE_STATUS_OFFLINED
        granted = xenpage("mem-offline", f"{ring:x}", timeout=120)     # the real command line
        st_pending = status(xen, ring)
        assert _affinities(xen) == before
        hb = g.wait_heartbeats(2, after=mark, timeout=60)
        bad = g.bad_lines(mark)
        t = destroy_guest(xen, g)
        st_destroyed = status(xen, ring)
        rec.add("granted-and-hang-guard", domid=g.domid, offlines=runs, ring=hex(ring), grant_refs=refs,
                granted_offline=granted.to_json(), status_pending=hex(st_pending), heartbeats=hb[-2:],
                bad_lines=bad[:10], destroy_s=round(t, 3), status_after_destroy=hex(st_destroyed))
        assert granted.rc == 1
        assert (f"Memory mfn {ring:x} offlined successfully , this page is DOM{g.domid} page yet failed to be "
                "exchanged. current state is [PG_OFFLINE_PENDING, PG_OFFLINE_OWNED]") in granted.stderr
        assert "(granted): granted to d0" in granted.stderr
        assert st_pending == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
        assert len(hb) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in hb) and not bad
        assert st_destroyed == S.PG_OFFLINE_STATUS_OFFLINED
    finally:
        if xen.domain_info(g.domid) is not None:
            destroy_guest(xen, g)
