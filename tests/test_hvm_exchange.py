"""In-place retirement of a translated (HVM/PVH) guest's frames with stock Xen 4.17 hypercalls
(pause; copy the gfns; XENMEM_decrease_reservation; XENMEM_populate_physmap; copy back;
unpause): the simulator's model of those hypercalls (guest_remove_page on a HAP p2m, the
superpage split, the device model's map cache), and the toolstack's method -- all or nothing
under a fault at every call, journaled and recovered at every step, against migration."""

from __future__ import annotations

import copy
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hvmtools import hvm_host, same, snapshot
from xenpage.abi import errno as E
from xenpage.abi import grant as G
from xenpage.abi import hvm as H
from xenpage.abi import sysctl as S
from xenpage.abi.xen import INVALID_MFN
from xenpage.backends.sim import SimHypervisor
from xenpage.hypervisor import grant_table, invariants, sysctl
from xenpage.hypervisor import hvm as HV
from xenpage.hypervisor.host import Host, HostConfig
from xenpage.toolstack import hptool
from xenpage.toolstack.hvm_exchange import exchange_hvm_pages, journal_path, recover
from xenpage.toolstack.outcomes import Kind, Reason

HEAD = 256  # libxl's head-room (LIBXL_MAXMEM_CONSTANT)


def status(hv, m):
    return int(hv.page_offline_op(S.sysctl_query_page_offline, m, m)[1][0])


def mark(hv, *mfns):
    for m in mfns:
        _, rc, st_ = hptool.mem_offline_mark(hv, m)
        assert rc == 0 and st_ & S.PG_OFFLINE_PENDING


# -- the hypercalls ---------------------------------------------------------------------------

def test_decrease_reservation_splits_the_superpage_and_frees_the_frame():
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    p = h.ept[1]
    assert p.order[700] == 9
    m = g.mfn(700)
    tot = h.domains[1].tot_pages
    assert hv.decrease_reservation(1, [700]) == 1
    # ept_split_super_page / p2m_next_level: the 2 MiB leaf became 512 4 KiB entries
    assert p.stats["split_2m"] == 1 and (p.order[512:1024] == 0).all() and (p.order[:512] == 9).all()
    assert p.type[700] == H.p2m_invalid and int(p.mfn[700]) == INVALID_MFN
    assert h.ft.owner(m) is None and h.domains[1].tot_pages == tot - 1   # freed
    assert h.ft.m2p_plus1[m] == 0
    assert h.domains[1].mapcache_invalidate                              # ioreq_request_mapcache_invalidate
    # populate_physmap for a translated guest: no MFN written back
    rc, ext = hv.populate_physmap(1, [700])
    assert rc == 1 and ext.tolist() == [700]
    new = int(p.mfn[700])
    # (m, freed by a running domain, went to the head of its list: Xen may hand it back)
    assert h.ft.m2p(new) == 700 and p.type[700] == H.p2m_ram_rw and p.order[700] == 0
    assert invariants.check(h) == []


def test_decrease_reservation_order_of_checks():
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    assert hv.decrease_reservation(9, [1]) == 0   # no domain: 0 done, as real Xen 4.17.7 answers
    assert HV.decrease_reservation(h, 1, 0, [1]) == -E.EPERM          # xsm_memory_adjust_reservation
    snap = snapshot(h)
    assert hv.decrease_reservation(1, [5, 2000, 6]) == 1              # gfn 2000 is past the RAM: stops
    assert hv.decrease_reservation(1, [5]) == 0                       # now a hole (-ENOENT): nothing
    assert snapshot(h)["ept"][1][0][6] == snap["ept"][1][0][6]        # gfn 6 untouched
    # a 1 GiB / 2 MiB split needs a table from the HAP pool: none left -> nothing changes
    p = h.ept[1]
    p.pool_pages = p.pool_used()
    snap = snapshot(h)
    assert hv.decrease_reservation(1, [1500]) == 0
    assert same(snap, snapshot(h)) == []
    assert invariants.check(h) == []


def test_a_referenced_frame_stays_pending_until_the_last_reference_goes():
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    m = g.mfn(40)
    mark(hv, m)
    rc, handle = h.hypercalls(0).foreign_map(1, [40], False)   # a backend's foreign mapping
    assert rc == 0
    assert hv.decrease_reservation(1, [40]) == 1
    assert status(hv, m) & S.PG_OFFLINE_STATUS_OFFLINE_PENDING    # guest_remove_page: still held
    assert h.ft.owner(m) == 1
    h.hypercalls(0).foreign_unmap(handle)
    assert status(hv, m) & S.PG_OFFLINE_STATUS_OFFLINED           # free_heap_pages offlined it
    hv.populate_physmap(1, [40])
    assert invariants.check(h) == []


def test_the_device_model_drops_its_map_cache_on_the_guests_next_hypercall():
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    m = g.mfn(300)
    assert HV.dm_map(h, 1, 300) == 0
    mark(hv, m)
    hv.pause(1)
    assert hv.decrease_reservation(1, [300]) == 1
    hv.populate_physmap(1, [300])
    hv.wait(0.01)                                       # paused: no hypercall, no invalidate
    assert status(hv, m) & S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    hv.unpause(1)
    hv.wait(0.01)
    assert status(hv, m) & S.PG_OFFLINE_STATUS_OFFLINED
    assert not any(x.what == HV.MAPCACHE for x in h.foreign.maps.values())
    assert invariants.check(h) == []


def test_a_pvh_guest_has_no_device_model():
    h, hv, g = hvm_host(guest_mib=4, pvh=True, headroom=HEAD)
    assert HV.dm_map(h, 1, 3) == -E.ENODEV
    info = hv.domain_info(1)
    assert info.hvm and hv.xs_read("/libxl/1/type") == "pvh"
    assert hv.xs_read("/local/domain/0/device-model/1/state") is None


# -- the toolstack's method -----------------------------------------------------------------------

@pytest.mark.parametrize("pvh", [False, True])
def test_in_place_retirement_moves_the_page_and_offlines_the_old_frame(pvh, tmp_path):
    h, hv, g = hvm_host(guest_mib=8, rate=20000, pvh=pvh, headroom=HEAD)
    hv.wait(0.05)
    gfns = [700, 701, 1500]
    ms = [g.mfn(x) for x in gfns]
    before = [int(h.ft.content[m]) for m in ms]
    mark(hv, *ms)
    r = exchange_hvm_pages(hv, 1, ms, journal_dir=tmp_path)
    assert r.stats["type"] == ("pvh" if pvh else "hvm") and r.stats["device_model"] == (not pvh)
    for x, m, c, o in zip(gfns, ms, before, r.outcomes):
        assert (o.kind, o.gpfn, o.extra["order_before"]) == (Kind.EXCHANGED, x, 9), o
        assert o.extra["offlined"] and o.extra["m2p_ok"] and g.mfn(x) == o.new_mfn != m
        assert int(h.ft.content[o.new_mfn]) == c and h.ft.m2p(o.new_mfn) == x
        assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED and m in h.heap.offlined_list
    p = h.ept[1]
    assert p.stats["split_2m"] == 2 and p.order[700] == 0 and p.order[1500] == 0
    assert 0 < r.downtime_s < 1e-3 and not h.domains[1].pause_count and r.paused
    assert not journal_path(tmp_path).exists()
    assert g.verify() == [] and invariants.check(h) == []
    hv.wait(0.05)
    assert g.verify() == []


def test_a_page_of_a_1g_superpage_needs_two_splits():
    h = Host.boot(HostConfig(mem_bytes=2560 << 20), dom0_pages=4096)
    from xenpage.guests.hvm import HvmGuest
    d = h.create_domain("big", 262144, hvm=True, max_pages=262144 + HEAD)
    g = HvmGuest.boot(h, d.domid, seed=5)
    hv = SimHypervisor(h)
    p = h.ept[d.domid]
    assert (p.order[:262144] == 18).all()
    m = g.mfn(123456)
    mark(hv, m)
    r = exchange_hvm_pages(hv, d.domid, [m])
    assert r.outcomes[0].kind == Kind.EXCHANGED and r.outcomes[0].extra["order_before"] == 18
    assert p.stats["split_1g"] == 1 and p.stats["split_2m"] == 1
    blk = 123456 // 512 * 512
    assert (p.order[blk:blk + 512] == 0).all()
    assert (np.delete(p.order[:262144], np.s_[blk:blk + 512]) == 9).all()
    assert g.verify() == [] and invariants.check(h) == []


def test_a_granted_gfn_is_left_alone():
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    grant_table.setup_table(h, 1)
    assert grant_table.write_entry(h, 1, 8, G.GTF_permit_access, 0, 33)
    m = g.mfn(33)
    mark(hv, m)
    snap = snapshot(h)
    r = exchange_hvm_pages(hv, 1, [m])
    assert (r.outcomes[0].kind, r.outcomes[0].reason) == (Kind.PENDING, Reason.GRANTED)
    assert not r.paused and same(snap, snapshot(h)) == []


def test_a_frame_a_backend_keeps_mapped_is_moved_and_stays_pending():
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    m = g.mfn(33)
    before = int(h.ft.content[m])
    mark(hv, m)
    rc, handle = h.hypercalls(0).foreign_map(1, [33], False)
    r = exchange_hvm_pages(hv, 1, [m])
    o = r.outcomes[0]
    assert (o.kind, o.reason) == (Kind.PENDING, Reason.REFERENCED) and o.new_mfn != m
    assert int(h.ft.content[g.mfn(33)]) == before and g.verify() == []
    assert not h.domains[1].pause_count and invariants.check(h) == []
    h.hypercalls(0).foreign_unmap(handle)
    assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED


def test_a_frame_in_the_map_cache_is_offlined_once_the_guest_runs():
    h, hv, g = hvm_host(guest_mib=4, rate=1000, headroom=HEAD)
    m = g.mfn(600)
    assert HV.dm_map(h, 1, 600) == 0
    mark(hv, m)
    r = exchange_hvm_pages(hv, 1, [m])
    o = r.outcomes[0]
    assert o.kind == Kind.EXCHANGED and o.extra["offlined_after_unpause"]
    assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED
    assert g.verify() == [] and invariants.check(h) == []


def test_refusals():
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    m = g.mfn(3)
    r = exchange_hvm_pages(hv, 1, [m])                    # not marked
    assert (r.outcomes[0].kind, r.outcomes[0].reason) == (Kind.REFUSED, Reason.NOT_PENDING)
    assert not r.paused
    assert exchange_hvm_pages(hv, 9, [m]).outcomes[0].reason == Reason.NO_DOMAIN
    mark(hv, m)
    assert exchange_hvm_pages(hv, 0, [m]).outcomes[0].kind == Kind.REFUSED   # dom0 is PV
    b = g.mfn(9)
    HV.machine_check_guest_frame(h, b)                    # its content is gone
    r = exchange_hvm_pages(hv, 1, [b])
    assert (r.outcomes[0].kind, r.outcomes[0].reason) == (Kind.REFUSED, Reason.BROKEN)
    h2, hv2, g2 = hvm_host(guest_mib=4)                   # no head-room at all
    m2 = g2.mfn(5)
    mark(hv2, m2)
    r = exchange_hvm_pages(hv2, 1, [m2])
    assert (r.outcomes[0].kind, r.outcomes[0].reason) == (Kind.PENDING, Reason.NO_HEADROOM)
    assert invariants.check(h) == [] and invariants.check(h2) == []


def test_hap_pool_exhausted_rolls_back():
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    p = h.ept[1]
    p.pool_pages = p.pool_used()
    m = g.mfn(1000)
    mark(hv, m)
    before = snapshot(h)
    r = exchange_hvm_pages(hv, 1, [m])
    assert r.outcomes[0].kind == Kind.ROLLED_BACK
    after = snapshot(h)
    assert same(before, after) == ["pages"] or same(before, after) == []  # the clock aside
    assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    assert g.verify() == [] and invariants.check(h) == []


class FailNth:
    """Fails the ``n``-th call (of any method) with ``-err``, in that method's shape."""

    SHAPES = {"page_offline_op": (None,), "hvm_p2m": (None, None, None), "read_pages": (None,),
              "populate_physmap": (None,), "page_types": (None,), "grant_entries": (None,)}

    def __init__(self, inner, n: int, err: int = E.EIO):
        self.inner, self.n, self.err, self.calls = inner, n, err, []

    def __getattr__(self, name):
        f = getattr(self.inner, name)
        if not callable(f) or name in ("now", "m2p", "checkpoint"):
            return f

        def call(*a, **k):
            self.calls.append(name)
            if len(self.calls) == self.n:
                if name == "domain_info":
                    return None
                if name == "xs_read":
                    return None
                return (-self.err, *self.SHAPES[name]) if name in self.SHAPES else -self.err
            return f(*a, **k)
        return call


def test_a_fault_at_every_toolstack_call_is_all_or_nothing():
    def world():
        h, hv, g = hvm_host(guest_mib=4, rate=3000, headroom=HEAD)
        ms = [g.mfn(x) for x in (5, 600, 601)]
        mark(hv, *ms)
        return h, hv, g, ms
    h, hv, g, ms = world()
    probe = FailNth(hv, 0)
    exchange_hvm_pages(probe, 1, ms)
    n_calls = len(probe.calls)
    assert n_calls >= 15
    for n in range(1, n_calls + 1):
        h, hv, g, ms = world()
        fh = FailNth(hv, n)
        r = exchange_hvm_pages(fh, 1, ms)
        for o in r.outcomes:
            assert o.kind in (Kind.EXCHANGED, Kind.ROLLED_BACK, Kind.REFUSED, Kind.PENDING), (n, o)
            if o.kind == Kind.EXCHANGED:
                assert status(hv, o.mfn) == S.PG_OFFLINE_STATUS_OFFLINED
            elif o.new_mfn is None:
                assert status(hv, o.mfn) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
                assert h.ft.owner(o.mfn) == 1
        assert not h.domains[1].pause_count, fh.calls[n - 1]   # never left paused
        assert g.verify() == [] and invariants.check(h) == [], fh.calls[n - 1]


STEPS = ("checked", "paused", "snapshot", "decreased", "completed", "before-unpause")


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_each_step_recover_leaves_the_guest_whole(step, tmp_path):
    """The process dies at ``step``: the host as it was then and the journal as it was then;
    ``recover`` (what ``xenpage recover`` and the next mem-offline run) completes it."""
    h, hv, g = hvm_host(guest_mib=4, rate=3000, headroom=HEAD)
    ms = [g.mfn(x) for x in (5, 600, 601)]
    mark(hv, *ms)
    jd = tmp_path / "j"
    saved = {}

    def hook(s, **kw):
        if s == step and not saved:
            saved["host"] = copy.deepcopy(h)
            if journal_path(jd).exists():
                shutil.copy(journal_path(jd), tmp_path / "saved.journal")
    exchange_hvm_pages(hv, 1, ms, journal_dir=jd, hook=hook)
    h2 = saved["host"]
    hv2 = SimHypervisor(h2)
    jd2 = tmp_path / "j2"
    jd2.mkdir()
    if (tmp_path / "saved.journal").exists():
        shutil.copy(tmp_path / "saved.journal", journal_path(jd2))
    res = recover(hv2, jd2)
    assert res.ok, res.errors
    assert not journal_path(jd2).exists()
    assert not h2.domains[1].pause_count
    g2 = h2.guests[1]
    hv2.wait(0.01)
    assert g2.verify() == [] and invariants.check(h2) == []
    for m in ms:
        assert status(hv2, m) in (S.PG_OFFLINE_STATUS_OFFLINED, S.PG_OFFLINE_STATUS_OFFLINE_PENDING)
        if status(hv2, m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING:
            assert h2.ft.owner(m) == 1 and int(h2.ept[1].mfn[h2.ft.m2p(m)]) == m


@settings(max_examples=25)
@given(st.lists(st.integers(0, 1023), min_size=1, max_size=6, unique=True), st.booleans(),
       st.integers(1, 4))
def test_property_in_place_retirement_is_all_or_nothing(gfns, logdirty, headroom):
    h, hv, g = hvm_host(guest_mib=4, mem_mib=64, dom0_mib=8, rate=2000, headroom=headroom)
    if logdirty:
        hv.logdirty_control(1, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
        hv.wait(0.01)
    ms = [g.mfn(x) for x in gfns]
    mark(hv, *ms)
    content = {x: int(h.ft.content[g.mfn(x)]) for x in gfns}
    r = exchange_hvm_pages(hv, 1, ms)
    assert [o.kind for o in r.outcomes] == [Kind.EXCHANGED] * len(ms)
    for x, o in zip(gfns, r.outcomes):
        now = g.mfn(x)
        assert int(h.ft.content[now]) == content[x] and now == o.new_mfn
        assert status(hv, o.mfn) == S.PG_OFFLINE_STATUS_OFFLINED
        if logdirty:  # the repopulated gfn is write-protected again (the invariants check it)
            assert h.ept[1].type[x] == H.p2m_ram_logdirty or h.ept[1].dirty[x]
    assert not h.domains[1].pause_count
    assert g.verify() == [] and invariants.check(h) == []


def test_in_place_downtime_is_at_least_100_times_lower_than_migration():
    from xenpage.backends.sim.migrate import GIGABIT
    h, hv, g = hvm_host(guest_mib=16, rate=12000, shape="hotcold", wss=0.5, hot_pages=400,
                        headroom=HEAD)
    m = g.mfn(2000)
    mark(hv, m)
    x = exchange_hvm_pages(hv, 1, [m])
    assert x.outcomes[0].kind == Kind.EXCHANGED
    m2 = g.mfn(2001)
    mark(hv, m2)
    hv.migration_link = GIGABIT
    r = hv.live_migrate(1)
    assert r.ok and r.engine == "sim" and status(hv, m2) == S.PG_OFFLINE_STATUS_OFFLINED
    assert r.downtime_s >= 100 * x.downtime_s


def test_machine_checked_frame_stays_broken_type():
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    b = g.mfn(50)
    sysctl.machine_check_offline(h, b)        # broken, type still ram_rw (sysctl path)
    r = exchange_hvm_pages(hv, 1, [b])
    assert r.outcomes[0].reason == Reason.BROKEN and not r.paused


def test_a_page_xen_maps_for_the_guest_stays_pending_and_fallback_migrates(tmp_path):
    """``VCPUOP_register_vcpu_info`` on a gfn: Xen holds the frame (general + writable type
    reference) and no dom0 interface shows it.  The in-place move completes (the guest's
    memory is whole) but the old frame stays pending, reported; ``--fallback=migrate``
    then migrates the guest, and the frame goes with the old domain."""
    from xenpage.hypervisor import foreign
    from xenpage.toolstack.retire import RetireOptions, retire_hvm
    h, hv, g = hvm_host(guest_mib=4, headroom=HEAD)
    assert foreign.map_guest_page(h, 1, 77, "vcpu_info") == 0
    m = g.mfn(77)
    assert int(h.ft.type_info[m]) & 0xFFFF == 1            # the writable type reference
    mark(hv, m)
    r = exchange_hvm_pages(hv, 1, [m])
    o = r.outcomes[0]
    assert (o.kind, o.reason) == (Kind.PENDING, Reason.REFERENCED) and "vcpu_info" in o.detail
    assert g.verify() == [] and invariants.check(h) == []
    assert status(hv, m) & S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    m2 = g.mfn(78)
    mark(hv, m2)
    foreign.map_guest_page(h, 1, 78, "evtchn_fifo_control")
    outs = retire_hvm(hv, 1, [m2], RetireOptions(hvm="exchange", fallback="migrate"))
    assert outs[0].kind == Kind.MIGRATED and status(hv, m2) == S.PG_OFFLINE_STATUS_OFFLINED
    assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED   # the old domain took it with it
    assert invariants.check(h) == []


def test_recover_after_someone_else_unpaused_fills_only_the_holes(tmp_path):
    """Killed after the decrease; then another toolstack unpaused the guest, which ran and
    wrote its memory: recovery must not put the journal's older pages back over newer ones,
    only fill the gfns still holes."""
    h, hv, g = hvm_host(guest_mib=4, rate=3000, headroom=HEAD)
    ms = [g.mfn(x) for x in (5, 600)]
    mark(hv, *ms)
    jd = tmp_path / "j"
    saved = {}

    def hook(s, **kw):
        if s == "decreased" and not saved:
            saved["host"] = copy.deepcopy(h)
            shutil.copy(journal_path(jd), tmp_path / "saved.journal")
    exchange_hvm_pages(hv, 1, ms, journal_dir=jd, hook=hook)
    h2 = saved["host"]
    hv2 = SimHypervisor(h2)
    g2 = h2.guests[1]
    assert h2.ept[1].type[5] == H.p2m_invalid and h2.ept[1].type[600] == H.p2m_invalid
    hv2.populate_physmap(1, [600])                 # someone repopulated one gfn ...
    HV.guest_write(h2, 1, [600], [0xABCDEF])       # ... and the guest wrote it
    g2.expect[600] = 0xABCDEF
    hv2.unpause(1)                                 # another toolstack unpaused the guest
    jd2 = tmp_path / "j2"
    jd2.mkdir()
    shutil.copy(tmp_path / "saved.journal", journal_path(jd2))
    res = recover(hv2, jd2)
    assert res.ok and res.completed == [5, 600] and not res.unpaused
    assert int(h2.ft.content[int(h2.ept[1].mfn[600])]) == 0xABCDEF   # not overwritten
    assert g2.verify() == [] and invariants.check(h2) == []


def _faulty_world():
    h, hv, g = hvm_host(guest_mib=4, rate=3000, headroom=HEAD)
    ms = [g.mfn(x) for x in (5, 600, 601, 900)]
    mark(hv, *ms)
    return h, hv, g, ms


def _check_whole(h, hv, g, r):
    for o in r.outcomes:
        assert o.kind != Kind.FAILED, o
        if o.kind == Kind.EXCHANGED:
            assert status(hv, o.mfn) == S.PG_OFFLINE_STATUS_OFFLINED
        elif o.kind == Kind.ROLLED_BACK:
            assert status(hv, o.mfn) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
            assert h.ft.owner(o.mfn) == 1 and int(h.ept[1].mfn[o.gpfn]) == o.mfn
    assert not h.domains[1].pause_count
    assert g.verify() == [] and invariants.check(h) == []


def test_fault_plans_every_call_and_partial_batches():
    """``FaultyHypervisor``: each call of the in-place method failed in turn with the errno
    Xen would give, and the two memory hypercalls stopped part-way (Xen returns the number
    of extents done): every frame ends exchanged or in place, the guest whole."""
    from xenpage.toolstack.faults import FaultPlan, FaultyHypervisor, enumerate_calls
    h, hv, g, ms = _faulty_world()
    calls = enumerate_calls(lambda fh: exchange_hvm_pages(fh, 1, ms), hv)
    methods = {m for _, m, _ in calls}
    assert {"decrease_reservation", "populate_physmap", "read_pages", "write_pages", "pause",
            "unpause", "page_types", "grant_entries"} <= methods
    for seq, m, nth in calls:
        h, hv, g, ms = _faulty_world()
        r = exchange_hvm_pages(FaultyHypervisor(hv, FaultPlan.fail_at(seq)), 1, ms)
        _check_whole(h, hv, g, r)
    for method, k in (("decrease_reservation", 1), ("decrease_reservation", 3),
                      ("populate_physmap", 2)):
        h, hv, g, ms = _faulty_world()
        fh = FaultyHypervisor(hv, FaultPlan.fail_at(1, method, E.ENOMEM, partial=k))
        r = exchange_hvm_pages(fh, 1, ms)
        _check_whole(h, hv, g, r)
        kinds = [o.kind for o in r.outcomes]
        if method == "decrease_reservation":   # the first k moved, the rest left in place
            assert kinds == [Kind.EXCHANGED] * k + [Kind.ROLLED_BACK] * (4 - k)
        else:                                  # populate retried: all complete
            assert kinds == [Kind.EXCHANGED] * 4


def test_a_completion_that_keeps_failing_leaves_the_guest_paused_for_recover(tmp_path):
    """populate_physmap fails on every retry after the decrease: the gfn is a hole, so the
    guest stays paused (FAILED, never resumed with a hole), the later frames are not touched,
    the journal stays; ``recover`` then completes it and unpauses."""
    from xenpage.toolstack.faults import Fault, FaultPlan, FaultyHypervisor
    h, hv, g = hvm_host(guest_mib=4, rate=3000, headroom=2)
    ms = [g.mfn(x) for x in (5, 600, 601, 900)]
    mark(hv, *ms)
    plan = FaultPlan([Fault(k, "populate_physmap", E.ENOMEM) for k in range(1, 5)])
    r = exchange_hvm_pages(FaultyHypervisor(hv, plan), 1, ms, journal_dir=tmp_path)
    assert [o.kind for o in r.outcomes] == [Kind.FAILED] * 2 + [Kind.ROLLED_BACK] * 2
    assert h.domains[1].pause_count == 1 and journal_path(tmp_path).exists()
    assert h.ept[1].type[5] == H.p2m_invalid and int(h.ept[1].mfn[601]) == ms[2]
    res = recover(hv, tmp_path)
    assert res.ok and res.unpaused and not h.domains[1].pause_count
    assert not journal_path(tmp_path).exists()
    assert status(hv, ms[0]) == S.PG_OFFLINE_STATUS_OFFLINED
    assert g.verify() == [] and invariants.check(h) == []
