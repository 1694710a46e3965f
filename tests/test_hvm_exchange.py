"""In-place exchange of an HVM guest's frames (pause, xenpage's p2m-exchange domctl, unpause):
superpages split, the page moved and the old frame offlined, all or nothing under injected
faults -- inside the hypervisor operation and at every toolstack call -- and a downtime at
least 100 times below a migration's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hvmtools import hvm_host, same, snapshot
from xenpage.abi import errno as E
from xenpage.abi import hvm as H
from xenpage.abi import sysctl as S
from xenpage.hypervisor import hvm as HV
from xenpage.hypervisor import invariants, sysctl
from xenpage.hypervisor.host import Host, HostConfig
from xenpage.hypervisor.p2m_exchange import exchange_gfn
from xenpage.toolstack import hptool
from xenpage.toolstack.hvm_exchange import exchange_hvm_pages
from xenpage.toolstack.migrate import GIGABIT, migrate
from xenpage.toolstack.outcomes import Kind, Reason


def status(hv, m):
    return int(hv.page_offline_op(S.sysctl_query_page_offline, m, m)[1][0])


def mark(hv, *mfns):
    for m in mfns:
        _, rc, st_ = hptool.mem_offline_mark(hv, m)
        assert rc == 0 and st_ & S.PG_OFFLINE_PENDING


def test_exchange_splits_the_superpage_moves_the_page_and_offlines_the_old_frame():
    h, hv, g = hvm_host(guest_mib=8, rate=20000)
    hv.wait(0.05)
    gfn = 700
    m = g.mfn(gfn)
    before = int(h.ft.content[m])
    mark(hv, m)
    p = h.ept[1]
    assert p.order[gfn] == 9
    r = exchange_hvm_pages(hv, 1, [m])
    o = r.outcomes[0]
    assert (o.kind, o.gpfn, o.extra["order_before"]) == (Kind.EXCHANGED, gfn, 9) and o.extra["offlined"]
    assert o.ok and g.mfn(gfn) == o.new_mfn != m
    assert int(h.ft.content[o.new_mfn]) == before
    assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED and m in h.heap.offlined_list
    assert p.order[gfn] == 0 and (p.order[512:1024] == 0).all() and (p.order[:512] == 9).all()
    assert p.stats["split_2m"] == 1 and p.walk(gfn)[-1][0] == 1
    assert h.ft.m2p(o.new_mfn) == gfn
    assert 0 < r.downtime_s < 1e-3 and not h.domains[1].pause_count
    assert g.verify() == [] and invariants.check(h) == []
    hv.wait(0.05)
    assert g.verify() == []


def test_a_page_of_a_1g_superpage_needs_two_splits():
    h = Host.boot(HostConfig(mem_bytes=2560 << 20), dom0_pages=4096)
    from xenpage.backends.sim import SimHypervisor
    from xenpage.guests.hvm import HvmGuest
    d = h.create_domain("big", 262144, hvm=True)
    g = HvmGuest.boot(h, d.domid, seed=5)
    hv = SimHypervisor(h)
    p = h.ept[d.domid]
    assert (p.order == 18).all()
    m = g.mfn(123456)
    mark(hv, m)
    r = exchange_hvm_pages(hv, d.domid, [m])
    assert r.outcomes[0].kind == Kind.EXCHANGED and r.outcomes[0].extra["order_before"] == 18
    assert p.stats == {"split_1g": 1, "split_2m": 1, "flushes": 1}
    blk = 123456 // 512 * 512
    assert (p.order[blk:blk + 512] == 0).all() and (np.delete(p.order, np.s_[blk:blk + 512]) == 9).all()
    assert g.verify() == [] and invariants.check(h) == []


def test_a_frame_mapped_by_dom0_stays_pending_then_goes_once_unmapped():
    h, hv, g = hvm_host(guest_mib=4)
    gfn = 33
    m = g.mfn(gfn)
    mark(hv, m)
    rc, handle = h.hypercalls(0).foreign_map(1, [gfn], True)  # the device model's mapcache
    assert rc == 0
    snap = snapshot(h)
    r = exchange_hvm_pages(hv, 1, [m])
    assert (r.outcomes[0].kind, r.outcomes[0].reason) == (Kind.PENDING, Reason.REFERENCED)
    assert same(snap, snapshot(h)) == []
    h.hypercalls(0).foreign_unmap(handle)
    r = exchange_hvm_pages(hv, 1, [m])
    assert r.outcomes[0].kind == Kind.EXCHANGED and status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED
    assert g.verify() == [] and invariants.check(h) == []


def test_refusals():
    h, hv, g = hvm_host(guest_mib=4)
    m = g.mfn(3)
    r = exchange_hvm_pages(hv, 1, [m])                    # not marked
    assert (r.outcomes[0].kind, r.outcomes[0].reason) == (Kind.REFUSED, Reason.NOT_PENDING)
    assert not r.paused
    assert exchange_hvm_pages(hv, 9, [m]).outcomes[0].reason == Reason.NO_DOMAIN
    mark(hv, m)
    assert exchange_hvm_pages(hv, 0, [m]).outcomes[0].kind == Kind.REFUSED   # dom0 is PV
    # a machine-checked frame: its content is gone
    b = g.mfn(9)
    HV.machine_check_guest_frame(h, b)
    r = exchange_hvm_pages(hv, 1, [b])
    assert (r.outcomes[0].kind, r.outcomes[0].reason) == (Kind.REFUSED, Reason.BROKEN)
    assert invariants.check(h) == []


def test_the_domctl_checks():
    h, hv, g = hvm_host(guest_mib=4)
    m = g.mfn(40)
    assert exchange_gfn(h, 0, 1, 40, m) == (-E.EBUSY, -1)          # not paused
    h.pause(1)
    assert exchange_gfn(h, 1, 1, 40, m) == (-E.EPERM, -1)          # not the control domain
    assert exchange_gfn(h, 0, 1, 41, m) == (-E.EINVAL, -1)         # p2m[41] is not m
    assert exchange_gfn(h, 0, 0, 40, m)[0] == -E.EOPNOTSUPP        # dom0 is PV
    b = g.mfn(50)
    sysctl.machine_check_offline(h, b)                             # broken, type still ram_rw
    assert exchange_gfn(h, 0, 1, 50, b) == (-E.EIO, -1)
    rc, new = exchange_gfn(h, 0, 1, 40, m)
    assert rc == 0 and h.p2m[1][40] == new and status(hv, m) == 0  # not offline-pending: freed
    h.unpause(1)
    assert invariants.check(h) == []


@pytest.mark.parametrize("step", ["alloc", "split"])
def test_hypervisor_faults_leave_everything_as_it_was(step):
    h, hv, g = hvm_host(guest_mib=4, rate=5000)
    m = g.mfn(300)
    mark(hv, m)
    snap = snapshot(h)
    h.p2m_exchange_faults = {step: -E.ENOMEM}
    r = exchange_hvm_pages(hv, 1, [m])
    assert (r.outcomes[0].kind, r.outcomes[0].reason) == (Kind.ROLLED_BACK, Reason.EXCHANGE_FAILED)
    assert same(snap, snapshot(h)) == []
    assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    r = exchange_hvm_pages(hv, 1, [m])                    # fault consumed: it goes now
    assert r.outcomes[0].kind == Kind.EXCHANGED
    assert g.verify() == [] and invariants.check(h) == []


def test_hap_pool_exhausted_rolls_back():
    h, hv, g = hvm_host(guest_mib=4)
    p = h.ept[1]
    p.pool_pages = p.pool_used()
    m = g.mfn(1000)
    mark(hv, m)
    snap = snapshot(h)
    r = exchange_hvm_pages(hv, 1, [m])
    assert r.outcomes[0].kind == Kind.ROLLED_BACK and r.outcomes[0].errno == E.ENOMEM
    assert same(snap, snapshot(h)) == []


class FailNth:
    """Fails the ``n``-th call (of any method) with ``-err``, in that method's shape."""

    SHAPES = {"page_offline_op": (None,), "hvm_p2m": (None, None, None), "hvm_exchange_gfn": (-1,)}

    def __init__(self, inner, n: int, err: int = E.EIO):
        self.inner, self.n, self.err, self.calls = inner, n, err, []

    def __getattr__(self, name):
        f = getattr(self.inner, name)
        if not callable(f) or name in ("now", "m2p"):
            return f

        def call(*a, **k):
            self.calls.append(name)
            if len(self.calls) == self.n:
                if name == "domain_info":
                    return None
                return (-self.err, *self.SHAPES[name]) if name in self.SHAPES else -self.err
            return f(*a, **k)
        return call


def test_a_fault_at_every_toolstack_call_is_all_or_nothing():
    def world():
        h, hv, g = hvm_host(guest_mib=4, rate=3000)
        ms = [g.mfn(x) for x in (5, 600, 601)]
        mark(hv, *ms)
        return h, hv, g, ms
    h, hv, g, ms = world()
    probe = FailNth(hv, 0)
    exchange_hvm_pages(probe, 1, ms)
    n_calls = len(probe.calls)
    assert n_calls >= 8
    for n in range(1, n_calls + 1):
        h, hv, g, ms = world()
        snap = snapshot(h)
        fh = FailNth(hv, n)
        r = exchange_hvm_pages(fh, 1, ms)
        for o in r.outcomes:
            assert o.kind in (Kind.EXCHANGED, Kind.ROLLED_BACK, Kind.REFUSED, Kind.PENDING), (n, o)
            if o.kind == Kind.EXCHANGED:
                assert status(hv, o.mfn) == S.PG_OFFLINE_STATUS_OFFLINED
            else:
                assert status(hv, o.mfn) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
                assert h.ft.owner(o.mfn) == 1
        if not any(o.kind == Kind.EXCHANGED for o in r.outcomes):
            assert same(snap, snapshot(h)) == [], fh.calls[n - 1]
        assert not h.domains[1].pause_count, fh.calls[n - 1]   # never left paused
        assert g.verify() == [] and invariants.check(h) == []


@given(st.lists(st.integers(0, 1023), min_size=1, max_size=4, unique=True),
       st.sampled_from([None, "alloc", "split"]), st.booleans())
def test_property_in_place_exchange_is_all_or_nothing(gfns, fault, logdirty):
    h, hv, g = hvm_host(guest_mib=4, mem_mib=64, dom0_mib=8, rate=2000)
    if logdirty:
        hv.logdirty_control(1, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
        hv.wait(0.01)
    ms = [g.mfn(x) for x in gfns]
    mark(hv, *ms)
    content = {x: int(h.ft.content[g.mfn(x)]) for x in gfns}
    if fault:
        h.p2m_exchange_faults = {fault: -E.ENOMEM}
    r = exchange_hvm_pages(hv, 1, ms)
    kinds = [o.kind for o in r.outcomes]
    assert kinds.count(Kind.ROLLED_BACK) == (1 if fault else 0)
    assert kinds.count(Kind.EXCHANGED) == len(ms) - (1 if fault else 0)
    for x, o in zip(gfns, r.outcomes):
        now = g.mfn(x)
        assert int(h.ft.content[now]) == content[x]
        if o.kind == Kind.EXCHANGED:
            assert now == o.new_mfn and status(hv, o.mfn) == S.PG_OFFLINE_STATUS_OFFLINED
        else:
            assert now == o.mfn and status(hv, o.mfn) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    assert not h.domains[1].pause_count
    assert g.verify() == [] and invariants.check(h) == []


def test_in_place_downtime_is_at_least_100_times_lower_than_migration():
    h, hv, g = hvm_host(guest_mib=16, rate=12000, shape="hotcold", wss=0.5, hot_pages=400)
    m = g.mfn(2000)
    mark(hv, m)
    x = exchange_hvm_pages(hv, 1, [m])
    assert x.outcomes[0].kind == Kind.EXCHANGED
    m2 = g.mfn(2001)
    mark(hv, m2)
    r = migrate(hv, 1, link=GIGABIT)
    assert r.ok and status(hv, m2) == S.PG_OFFLINE_STATUS_OFFLINED
    assert r.downtime_s >= 100 * x.downtime_s
