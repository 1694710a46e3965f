"""Pre-copy live migration (xg_sr_save / xg_sr_restore as libxl drives them) on simulated
hosts: the stop conditions of ``simple_precopy_policy`` (fewer than 50 dirty pages, or 5
rounds), content identical after migration, the old domain's offline-pending frame offlined,
a guest dirtying faster than the link stopped and copied within the round limit, BROKEN
pages never copied and the retired gfn unusable in the new guest, migration between two
hosts, no room, and a failure at any step giving everything back."""

from __future__ import annotations

import pytest

from hvmtools import bare_host, contents, hvm_host
from xenpage.abi import domctl as D
from xenpage.abi import errno as E
from xenpage.abi import hvm as H
from xenpage.abi import sysctl as S
from xenpage.abi.xen import INVALID_MFN
from xenpage.hypervisor import hvm as HV
from xenpage.hypervisor import invariants
from xenpage.toolstack import hptool
from xenpage.backends.sim.migrate import (GIGABIT, Link, MigrationCosts, MigrationError, migrate,
                                       simple_precopy_policy)

STOP, GO = H.XGS_POLICY_STOP_AND_COPY, H.XGS_POLICY_CONTINUE_PRECOPY


def status(hv, m):
    return int(hv.page_offline_op(S.sysctl_query_page_offline, m, m)[1][0])


def test_simple_precopy_policy():
    assert simple_precopy_policy(0, 100000) == GO
    assert simple_precopy_policy(0, 49) == STOP           # fewer than 50 dirty
    assert simple_precopy_policy(3, 50) == GO
    assert simple_precopy_policy(3, -1) == GO             # "unknown" after a round
    assert simple_precopy_policy(4, 10**6) == GO
    assert simple_precopy_policy(5, 10**6) == STOP        # 5 rounds ran
    assert simple_precopy_policy(5, -1) == STOP


def test_idle_guest_converges_after_the_first_round():
    h, hv, g = hvm_host(guest_mib=8)
    r = migrate(hv, 1, link=GIGABIT)
    assert r.ok, r.error
    assert [(x.live, x.pages) for x in r.rounds] == [(True, 2048), (False, 0)]
    assert r.rounds[0].dirty_after == 0 and r.stop_reason.startswith("fewer than 50")
    # round 1: 2048 pages and their pfns on a 1 Gbit/s link
    assert r.rounds[0].seconds == pytest.approx(r.rounds[0].bytes * 8 / 1e9)
    assert r.total_s > r.rounds[0].seconds and r.downtime_s < 0.1
    assert r.downtime_s == pytest.approx(sum(r.downtime_parts.values()), rel=1e-6)
    new = r.dst_domid
    assert 1 not in h.domains and h.domains[new].name == "hvm"
    assert h.guests[new].verify() == []
    assert invariants.check(h) == []


def test_small_hot_set_converges_below_50_dirty_pages_before_the_round_limit():
    # 40 hot pages: after round 1 at most 40 are dirty, so the policy stops and copies
    h, hv, g = hvm_host(guest_mib=16, rate=2000, shape="hotcold", hot_pages=40, hot_frac=1.0)
    r = migrate(hv, 1, link=GIGABIT)
    assert r.ok
    live = [x for x in r.rounds if x.live]
    assert len(live) == 2 and live[0].pages == 4096 and 0 < live[0].dirty_after <= 40
    assert live[1].pages == live[0].dirty_after          # a STOP round still goes live
    assert r.rounds[-1].pages == live[1].dirty_after <= 40
    assert r.stop_reason.startswith("fewer than 50")
    assert h.guests[r.dst_domid].verify() == [] and invariants.check(h) == []


def test_content_identical_after_migration_and_the_guest_keeps_running():
    h, hv, g = hvm_host(guest_mib=16, rate=30000, shape="hotcold", wss=0.6, hot_pages=500)
    hv.wait(0.2)
    frozen = {}

    def hook(step, **kw):
        if step == "stream-end":          # the guest is suspended: its memory is final
            frozen.update(contents(h, 1))
    r = migrate(hv, 1, link=GIGABIT, hook=hook)
    assert r.ok and len(frozen) == 4096
    assert r.rounds[0].dirty_after > 0 and r.pages_sent > 4096
    assert contents(h, r.dst_domid) == frozen
    ng = h.guests[r.dst_domid]
    assert ng.verify() == [] and ng.writes >= g.writes
    w = ng.writes
    hv.wait(0.1)
    assert ng.writes > w and ng.verify() == []
    # the new guest is mapped with 4 KiB entries (a restore populates order 0)
    assert set(h.ept[r.dst_domid].order[:4096].tolist()) == {0}
    assert invariants.check(h) == []


def test_the_old_frame_is_offlined_when_the_old_domain_goes():
    h, hv, g = hvm_host(guest_mib=8, rate=5000)
    m = g.mfn(1234)
    r, rc, st = hptool.mem_offline_mark(hv, m)
    assert st & S.PG_OFFLINE_PENDING and st >> 16 == 1
    res = migrate(hv, 1)
    assert res.ok
    assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED and m in h.heap.offlined_list
    assert h.guests[res.dst_domid].mfn(1234) != m
    assert invariants.check(h) == [] and h.guests[res.dst_domid].verify() == []


def test_a_guest_dirtying_faster_than_the_link_is_stopped_and_copied_within_the_round_limit():
    link = Link(0.1e9, 100e-6, "100 Mbit/s")          # ~3050 pages/s
    h, hv, g = hvm_host(guest_mib=8, rate=3 * link.pages_per_second, shape="uniform")
    frozen = {}
    r = migrate(hv, 1, link=link, hook=lambda s, **k: s == "stream-end" and frozen.update(contents(h, 1)))
    assert r.ok
    assert r.live_rounds == H.SPP_MAX_ITERATIONS and len(r.rounds) == H.SPP_MAX_ITERATIONS + 1
    assert r.stop_reason == "5 rounds"
    # it never converges: each round still finds most of the memory dirty
    assert all(x.dirty_after > 1000 for x in r.rounds[:-1])
    assert r.rounds[-1].pages == r.rounds[-2].dirty_after > 1000
    assert r.downtime_s > r.rounds[-1].pages * 4096 * 8 / link.bandwidth_bps
    assert contents(h, r.dst_domid) == frozen and h.guests[r.dst_domid].verify() == []
    assert invariants.check(h) == []


def test_migration_between_two_hosts():
    a, hva, g = hvm_host(guest_mib=8, rate=8000, shape="hotcold", hot_pages=300)
    b, hvb = bare_host()
    m = g.mfn(77)
    hptool.mem_offline_mark(hva, m)
    r = migrate(hva, 1, hvb)
    assert r.ok and not r.same_host and r.link == GIGABIT.name
    assert 1 not in a.domains and a.guests == {}
    assert status(hva, m) == S.PG_OFFLINE_STATUS_OFFLINED
    ng = b.guests[r.dst_domid]
    assert ng.host is b and b.domains[r.dst_domid].name == "hvm" and ng.verify() == []
    assert b.clock == pytest.approx(a.clock, abs=1e-9) or b.clock > 0
    hvb.wait(0.1)
    assert ng.verify() == []
    assert invariants.check(a) == [] and invariants.check(b) == []


def test_broken_pages_travel_as_broken_and_stay_unusable():
    a, hva, g = hvm_host(guest_mib=8, rate=4000)
    gfn = 900
    m = g.mfn(gfn)
    HV.machine_check_guest_frame(a, m)                # MCE: p2m_ram_broken + vMCE
    assert gfn in g.poisoned
    b, hvb = bare_host()
    r = migrate(hva, 1, hvb)
    assert r.ok and r.broken_pfns == [gfn] and r.rounds[0].broken == 1
    assert r.rounds[0].pages == 2047                   # never copied
    assert m in a.heap.broken_list                     # the old frame: broken, offlined
    new = r.dst_domid
    p = b.ept[new]
    assert int(p.mfn[gfn]) == INVALID_MFN and p.type[gfn] == H.p2m_invalid   # never populated
    ng = b.guests[new]
    assert gfn in ng.poisoned and ng.verify() == []
    assert HV.guest_write(b, new, [gfn], [1]).tolist() == [gfn]
    # and again: the hole travels (XTAB), still not populated
    c, hvc = bare_host()
    r2 = migrate(hvb, new, hvc)
    assert r2.ok and r2.broken_pfns == [] and r2.rounds[0].pages == 2047
    n2 = r2.dst_domid
    assert int(c.ept[n2].mfn[gfn]) == INVALID_MFN and c.guests[n2].verify() == []
    rc, t = hvc.page_types(n2, [gfn])
    assert t[0] == D.XEN_DOMCTL_PFINFO_XTAB
    for x in (a, b, c):
        assert invariants.check(x) == []


def test_no_room_on_the_same_host():
    h, hv, g = hvm_host(guest_mib=40, mem_mib=64, dom0_mib=8)
    before = (sorted(h.domains), h.heap.free_pages)
    r = migrate(hv, 1)
    assert r.rc == -E.ENOMEM and "no room" in r.error
    assert (sorted(h.domains), h.heap.free_pages) == before and g.running()


@pytest.mark.parametrize("step", ["created", "logdirty", "batch", "suspended", "stream-end",
                                  "before-unpause"])
def test_a_failure_at_any_step_gives_everything_back(step):
    h, hv, g = hvm_host(guest_mib=8, rate=6000, shape="hotcold", hot_pages=200)
    m = g.mfn(10)
    hptool.mem_offline_mark(hv, m)
    doms = sorted(h.domains)
    free = h.heap.free_pages

    def hook(s, **kw):
        if s == step:
            raise MigrationError(-E.EIO, f"injected at {step}")
    r = migrate(hv, 1, hook=hook)
    assert r.rc == -E.EIO and step in r.error
    assert sorted(h.domains) == doms and h.heap.free_pages == free
    assert not h.ept[1].logdirty and g.running() and h.domains[1].name == "hvm"
    assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    hv.wait(0.05)
    assert g.verify() == [] and invariants.check(h) == []
    # and it can be migrated afterwards
    r = migrate(hv, 1)
    assert r.ok and status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED


def test_downtime_is_the_fixed_costs_plus_the_last_round():
    costs = MigrationCosts(suspend_s=0.01, emulator_state_bytes=0, restore_s=0.02, handshake_rtts=1)
    h, hv, g = hvm_host(guest_mib=8)
    r = migrate(hv, 1, link=GIGABIT, costs=costs)
    parts = r.downtime_parts
    assert parts["suspend_s"] == 0.01 and parts["restore_s"] == 0.02
    assert parts["latency_s"] == pytest.approx(3 * GIGABIT.latency_s)
    assert r.downtime_s == pytest.approx(0.03 + parts["last_round_s"] + parts["context_s"]
                                         + parts["latency_s"])
