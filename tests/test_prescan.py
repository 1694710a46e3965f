"""The pre-scan (toolstack/prescan.py): the entries that map the frames to retire are found
while the PV guest runs, with log-dirty on; under the suspend only what the bitmap names is
looked at again.  The property: whatever the guest does to its page tables in between, the
entries found are exactly a full scan's, and the exchange leaves the invariant checker and the
guest's own memory check clean."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpage.abi import hvm as H
from xenpage.abi import sysctl as S
from xenpage.backends.sim import DefaultHostSpec, SimHypervisor, build_host
from xenpage.guests import linux_pv as L
from xenpage.hypervisor import invariants, paging
from xenpage.toolstack import prescan
from xenpage.toolstack.exchange import exchange_pages, load_guest, scan
from xenpage.toolstack.offline import mem_offline, resume_guest, suspend_guest
from xenpage.toolstack.outcomes import Kind

EXAMPLES = 60 if os.environ.get("CI") else 15


def small_host():
    host = build_host(DefaultHostSpec(mem_mib=512, dom0_mib=128, pv_guests=(("g", 64),), hvm_guests=()))
    hv = SimHypervisor(host)
    hv.set_vcpu_affinity(0, 0, [1])  # off pCPU 0 (Xen 4.17's PoD-lock hang)
    return host, hv, host.guests[1]


def _key(refs):
    return sorted((r.table, r.index, r.value, r.level) for r in refs)


def _targets(g):
    """Two pages of the free pool (the guest maps them during the window), a user page, a
    page only the kernel maps, and a user L1 table."""
    return [g.free[0], g.free[1], g.user_pages("private")[3], g.kernel_only_pages()[7], g.procs[1].ul1[0]]


OPS = st.one_of(
    st.tuples(st.just("step"), st.integers(1, 30)),
    st.tuples(st.just("map"), st.integers(0, 2), st.sampled_from(["mmu", "ptwr"])),
    st.tuples(st.just("unmap"), st.integers(0, 2), st.sampled_from(["mmu", "ptwr"])),
    st.tuples(st.just("map_target"), st.integers(0, 2), st.integers(0, 1), st.sampled_from(["mmu", "ptwr"])),
    st.tuples(st.just("unmap_target"), st.integers(0, 1), st.sampled_from(["mmu", "ptwr"])),
    st.tuples(st.just("grow"), st.integers(0, 2)),
    st.tuples(st.just("shrink"), st.integers(0, 2)),
)


def _act(g, op, target_pfns):
    kind = op[0]
    if kind == "step":
        g.step(op[1])
    elif kind == "map" and g.free:
        g.map_pfn(op[1], g.free[-1], op[2])
    elif kind == "unmap":
        pr = g.procs[op[1]]
        vps = [v for v, (pf, _) in pr.pages.items() if g.role[pf] == L.FREE]
        if vps:
            g.unmap_vp(op[1], vps[-1], op[2])
    elif kind == "map_target":  # when it is in the free pool (not mapped, not made a table)
        g.map_pfn(op[1], target_pfns[op[2]], op[3])
    elif kind == "unmap_target":
        for i, pr in enumerate(g.procs):
            for v, (pf, _) in list(pr.pages.items()):
                if pf == target_pfns[op[1]]:
                    g.unmap_vp(i, v, op[2])
                    return
    elif kind == "grow":
        pf = g.grow_l1(op[1])
        if pf is not None and g.free:  # and put something in it
            pr = g.procs[op[1]]
            vp = 512 * (len(pr.ul1) - 1)
            q = g.free.pop()
            rc = g._pte_write(pf, 0, L.P.make_pte(g.mfn(q), L.USER_RW))
            assert rc == 0
            pr.pages[vp] = [q, L.USER_RW]
    elif kind == "shrink":
        g.shrink_l1(op[1])


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(OPS, max_size=6), during=st.lists(OPS, min_size=1, max_size=14))
def test_prescan_finds_exactly_what_a_full_scan_finds(before, during):
    host, hv, g = small_host()
    pfns = _targets(g)
    for op in before:  # the guest's history: new tables, mappings of the targets ...
        _act(g, op, pfns)
    mfns = [g.mfn(p) for p in pfns]
    for m in mfns:
        rc, stt = hv.page_offline_op(S.sysctl_page_offline, m, m)
        assert rc == 0 and stt[0] & S.PG_OFFLINE_PENDING
    pre = prescan.start(hv, 1, mfns)
    assert pre.enabled and pre.stats.get("fallback") is None
    for op in during:  # ... and what it does while the pre-scan runs
        _act(g, op, pfns)
    ok, ours, msg = suspend_guest(hv, 1)
    assert ok, msg
    got = prescan.finish(pre)
    assert got is not None, pre.stats
    assert not host.__dict__.get("pv_logdirty")  # off again
    view, refs = got
    full, err = load_guest(hv, 1)
    rc, want = scan(hv, full, np.array(mfns))
    assert rc == 0 and _key(refs) == _key(want)
    np.testing.assert_array_equal(view.table_pfns()[0], full.table_pfns()[0])
    np.testing.assert_array_equal(view.table_pfns()[1], full.table_pfns()[1])
    out = exchange_pages(hv, 1, mfns, view=view, prefound=refs)
    assert [o.kind for o in out] == [Kind.EXCHANGED] * len(mfns), [(o.kind, o.detail) for o in out]
    assert invariants.check(host) == []
    assert resume_guest(hv, 1) == 0
    g.step(20)
    assert g.verify() == []
    assert invariants.check(host) == []


def test_log_dirty_marks_table_writes_by_pfn():
    """mmu_update and the emulated write mark the *table's* pfn; a new L1 is marked when it is
    validated; the toolstack's foreign mmu_update marks the guest's table (the page-table
    owner's vCPU writes it); log-dirty off marks nothing."""
    host, hv, g = small_host()
    d = host.domains[1]
    assert hv.logdirty_control(1, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)[0] == 0
    n = d.p2m_max_pfn

    def dirty():
        rc, bits, _ = hv.logdirty_control(1, H.XEN_DOMCTL_SHADOW_OP_CLEAN, n, packed=True)
        assert rc == 0
        return set(prescan.dirty_pfns(bits, n).tolist())

    dirty()
    pr = g.procs[0]
    vp = g.map_pfn(0, g.free[0], "mmu")
    assert dirty() == {pr.ul1[0]}
    g.unmap_vp(0, vp, "ptwr")
    assert dirty() == {pr.ul1[0]}
    new = g.grow_l1(2)
    got = dirty()
    # the new table (cleared by the guest, validated, pinned), the direct-map L1 naming it
    # read-only, the process's L2 it is linked into
    assert {new, g.tables["direct_l1"][new // 512], g.procs[2].ul2} <= got
    assert got <= {new, g.tables["direct_l1"][new // 512], g.procs[2].ul2}
    ok, _, _ = suspend_guest(hv, 1)
    dirty()
    from xenpage.abi import xen as X
    t = g.mfn(pr.ul1[0])
    rc, _ = hv.mmu_update(np.array([[(t << 12) | (100 * 8) | X.MMU_PT_UPDATE_PRESERVE_AD, 0]], dtype=np.uint64),
                          X.foreigndom(1, 1))
    assert rc == 0 and dirty() == {pr.ul1[0]}
    assert hv.logdirty_control(1, H.XEN_DOMCTL_SHADOW_OP_OFF)[0] == 0
    resume_guest(hv, 1)
    g.map_pfn(1, g.free[0])
    assert "pv_logdirty" not in host.__dict__ or 1 not in host.pv_logdirty
    assert g.verify() == [] and invariants.check(host) == []


def test_ptwr_emulation_follows_xen():
    """A write to a read-only mapped L1 is emulated with get_page_from_l1e's checks; a frame
    that is not one of the writer's L1 tables, or a bad entry, is not emulated (#PF)."""
    host, hv, g = small_host()
    from xenpage.abi import errno as E
    pr = g.procs[0]
    hc = host.hypercalls(1)
    l1 = g.mfn(pr.ul1[0])
    q = g.free[0]
    assert hc.ptwr_write(l1, 300, L.P.make_pte(g.mfn(q), L.USER_RW)) == 0
    assert L.P.pte_frame(int(host.ft.table(l1)[300])) == g.mfn(q)
    assert hc.ptwr_write(g.mfn(pr.ul2), 300, 0) == -E.EFAULT          # an L2: not emulated
    assert hc.ptwr_write(g.mfn(g.kernel_only_pages()[0]), 0, 0) == -E.EFAULT  # data
    assert hc.ptwr_write(l1, 301, L.P.make_pte(g.mfn(pr.ul1[0]), L.USER_RW)) == -E.EFAULT  # RW map of a table
    assert hc.ptwr_write(l1, 300, 0) == 0
    assert invariants.check(host) == []


def test_mem_offline_takes_the_prescan_path_and_logdirty_ends_off():
    host, hv, g = small_host()
    pfns = _targets(g)
    r = mem_offline(hv, [g.mfn(p) for p in pfns])
    assert [o.kind for o in r.outcomes] == [Kind.EXCHANGED] * len(pfns)
    pst = r.timings["guests"][1]["prescan"]
    assert pst["path"] == "prescan" and pst["rescanned_tables"] >= 1
    assert not host.__dict__.get("pv_logdirty")
    assert g.verify() == [] and invariants.check(host) == []


def test_prescan_falls_back_when_logdirty_is_taken():
    """Log-dirty already on (a live migration of the guest runs): the pre-scan does not touch
    it, the full path retires the frames, and log-dirty stays as the other user left it."""
    host, hv, g = small_host()
    assert hv.logdirty_control(1, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)[0] == 0
    pfns = _targets(g)
    r = mem_offline(hv, [g.mfn(p) for p in pfns])
    assert [o.kind for o in r.outcomes] == [Kind.EXCHANGED] * len(pfns)
    pst = r.timings["guests"][1]["prescan"]
    assert pst["path"] == "full" and "log-dirty could not be enabled" in pst["fallback"]
    assert 1 in host.pv_logdirty
    assert g.verify() == [] and invariants.check(host) == []


def test_prescan_falls_back_when_many_tables_are_dirtied(monkeypatch):
    host, hv, g = small_host()
    monkeypatch.setattr(prescan, "FALLBACK_MIN", 0)
    monkeypatch.setattr(prescan, "FALLBACK_FRACTION", 0.0)
    pfns = _targets(g)
    mfns = [g.mfn(p) for p in pfns]
    for m in mfns:
        hv.page_offline_op(S.sysctl_page_offline, m, m)
    pre = prescan.start(hv, 1, mfns)
    g.map_pfn(0, pfns[0])
    suspend_guest(hv, 1)
    out = prescan.exchange(pre, mfns)
    assert pre.stats["path"] == "full" and "tables dirtied" in pre.stats["fallback"]
    assert [o.kind for o in out] == [Kind.EXCHANGED] * len(mfns)
    assert not host.__dict__.get("pv_logdirty")
    resume_guest(hv, 1)
    assert g.verify() == [] and invariants.check(host) == []


def test_suspend_failure_turns_logdirty_off(monkeypatch):
    host, hv, g = small_host()
    from xenpage.toolstack import offline
    monkeypatch.setattr(offline, "suspend_guest", lambda *a, **k: (False, False, "no answer"))
    r = mem_offline(hv, [g.mfn(g.kernel_only_pages()[3])])
    assert r.outcomes[0].kind == Kind.PENDING
    assert not host.__dict__.get("pv_logdirty")


@pytest.mark.parametrize("n,dense", [(1, 1), (7, 1), (64, 1), (65, 1), (1000, 1), (4099, 1),
                                     (32768, 1), (100_003, 1), (3 * 32768 + 65, 0), (1 << 20, 0)])
def test_dirty_pfns_reads_xens_packed_bitmap(n, dense):
    """Dense bitmaps, and sparse ones over several 4 KiB blocks (the block pass) with bits
    in the first and last pfn and in the words past the last whole block."""
    rng = np.random.default_rng(n)
    want = np.unique(rng.integers(0, n, size=max(1, n // 5) if dense else 40))
    if not dense:
        want = np.unique(np.concatenate([want, [0, n - 1, n - 70]]))
    bits = np.packbits(np.isin(np.arange(n), want), bitorder="little")
    np.testing.assert_array_equal(prescan.dirty_pfns(bits, n), want)
    assert prescan.dirty_pfns(np.zeros((n + 7) // 8, np.uint8), n).size == 0
    assert paging is not None


def test_prescan_switched_off_takes_the_full_path(monkeypatch):
    """XENPAGE_PRESCAN=0: log-dirty is never turned on; every table is scanned under the
    suspend, with the same outcome."""
    host, hv, g = small_host()
    monkeypatch.setattr(prescan, "ENABLED", False)
    calls = []
    orig = hv.logdirty_control
    monkeypatch.setattr(hv, "logdirty_control", lambda *a, **k: calls.append(a) or orig(*a, **k))
    pfns = _targets(g)
    r = mem_offline(hv, [g.mfn(p) for p in pfns])
    assert [o.kind for o in r.outcomes] == [Kind.EXCHANGED] * len(pfns)
    pst = r.timings["guests"][1]["prescan"]
    assert pst["path"] == "full" and pst["fallback"] == "pre-scan switched off" and calls == []
    assert g.verify() == [] and invariants.check(host) == []


def test_xen_without_shadow_paging_falls_back_as_in_the_lab():
    """The lab's Xen 4.17.7 has no shadow paging: ENABLE_LOGDIRTY of a PV guest is
    -EOPNOTSUPP, OFF -EINVAL (tests_xen/test_prescan_memtest.py); mem-offline retires the
    frames by the full path and says why."""
    host, hv, g = small_host()
    host.quirks.no_shadow_paging = True
    from xenpage.abi import errno as E
    assert hv.logdirty_control(1, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)[0] == -E.EOPNOTSUPP
    assert hv.logdirty_control(1, H.XEN_DOMCTL_SHADOW_OP_OFF)[0] == -E.EINVAL
    pfns = _targets(g)
    r = mem_offline(hv, [g.mfn(p) for p in pfns])
    assert [o.kind for o in r.outcomes] == [Kind.EXCHANGED] * len(pfns)
    pst = r.timings["guests"][1]["prescan"]
    assert pst["path"] == "full" and pst["fallback"] == "log-dirty could not be enabled (EOPNOTSUPP)"
    assert g.verify() == [] and invariants.check(host) == []
