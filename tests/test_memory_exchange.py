"""``XENMEM_exchange`` (``memory_exchange`` + ``steal_page``), ``populate_physmap`` and
``decrease_reservation`` on the simulated Xen 4.17 (xen-semantics.md 3.1-3.6, 1.8, 2.3).

Checks in Xen's order with their errnos; success frees the old frame (an offlining one
becomes offlined), assigns a new one with only the allocation reference, writes
``M2P[new] = gpfn`` and returns the new MFN; any reference besides the allocation one makes
the steal fail; partial progress is reported through ``nr_exchanged``.
"""

from __future__ import annotations

import numpy as np
import pytest
from simworld import occupy_freed_fixed_frames

from xenpage.abi import grant as G
from xenpage.hypervisor import invariants, sysctl
from xenpage.hypervisor.host import Host, HostConfig
from xenpage.hypervisor.memory import Reservation, steal_page
from xenpage.hypervisor.page_alloc import OutOfMemory

import page_info  # noqa: E402
from page_info import ok, pte, write  # noqa: E402

ALLOC = 0x8000000000000000
BROKEN = 0x1000000000000000
ST_OFFLINING, ST_OFFLINED, ST_FREE = 0x0400000000000000, 0x0800000000000000, 0x0C00000000000000
STATE = 0x0C00000000000000
P, RW, US = 0x1, 0x2, 0x4
PIN_L1, PIN_L4, NEW_BASEPTR = 0, 3, 5
DOMID_SELF = 0x7FF0
INVALID = 0xFFFFFFFFFFFFFFFF
EPERM, ESRCH, ENOMEM, EINVAL, EOPNOTSUPP = -1, -3, -12, -22, -95
OFFLINE, QUERY = 1, 3


class Dom(page_info.Dom):
    def set_p2m(self, gpfn, mfn):
        """The guest's own P2M update (its job after an exchange)."""
        self.h.p2m[self.id][gpfn] = np.uint64(mfn)


class Snap:
    def __init__(self, h):
        self.h = h
        self.arrs = [a.copy() for a in (h.ft.count_info, h.ft.type_info, h.ft.owner1, h.ft.m2p_plus1)]
        self.free = h.heap.free_pages

    def same(self):
        h = self.h
        return self.free == h.heap.free_pages and all(
            np.array_equal(a, b) for a, b in
            zip(self.arrs, (h.ft.count_info.copy(), h.ft.type_info, h.ft.owner1, h.ft.m2p_plus1)))


def xchg(hc, domid, mfns, gpfns, in_order=0, out_order=0, out_domid=None, nr=0):
    return hc.memory_exchange(Reservation(list(mfns), in_order, domid),
                              Reservation(list(gpfns), out_order, domid if out_domid is None else out_domid),
                              nr)


def offline(h, m):
    rc, st = sysctl.page_offline_op(h, 0, OFFLINE, m, m, pcpu=1)
    return rc, int(st[0])


def query(h, m):
    rc, st = sysctl.page_offline_op(h, 0, QUERY, m, m, pcpu=1)
    return rc, int(st[0])


@pytest.fixture
def env():
    h = Host.boot(HostConfig(mem_bytes=64 << 20), dom0_pages=2048)
    occupy_freed_fixed_frames(h)
    u = Dom(h, 64, "u")
    ok(h)
    return h, u, h.hypercalls(0)


# -- success ---------------------------------------------------------------------------------

def test_exchange_replaces_the_frame_and_sets_the_m2p(env):
    h, u, dom0 = env
    old, g = u.f[20], 20
    tot = u.d.tot_pages
    r = xchg(dom0, u.id, [old], [g])
    assert (r.rc, r.nr_exchanged) == (0, 1)
    new = r.out[0]
    assert new != old
    assert h.ft.owner(new) == u.id and int(h.ft.count_info[new]) == ALLOC | 1
    assert int(h.ft.type_info[new]) == 0
    assert h.ft.m2p(new) == g
    # the old frame went back to the heap, its M2P invalidated
    assert int(h.ft.count_info[old]) == ST_FREE and h.ft.owner(old) is None
    assert h.ft.m2p(old) == INVALID
    assert u.d.tot_pages == tot
    # until the guest updates its P2M the checker sees the stale entry
    assert any("P2M" in p for p in invariants.check(h))
    u.set_p2m(g, new)
    ok(h)


def test_exchange_of_an_offlining_frame_offlines_it(env):
    h, u, dom0 = env
    old = u.f[21]
    assert offline(h, old) == (0, 0x1004 | (u.id << 16))
    assert query(h, old) == (0, 0x8)
    r = xchg(dom0, u.id, [old], [21])
    assert (r.rc, r.nr_exchanged) == (0, 1)
    assert int(h.ft.count_info[old]) == ST_OFFLINED
    assert old in h.heap.offlined_list
    assert query(h, old) == (0, 0x2)
    u.set_p2m(21, r.out[0])
    ok(h)


def test_exchange_of_a_broken_offlining_frame_goes_to_the_broken_list(env):
    h, u, dom0 = env
    old = u.f[22]
    rc, st = sysctl.machine_check_offline(h, old)
    assert (rc, st) == (0, 0x3004 | (u.id << 16))
    r = xchg(dom0, u.id, [old], [22])
    assert r.rc == 0
    assert int(h.ft.count_info[old]) == ST_OFFLINED | BROKEN
    assert old in h.heap.broken_list and query(h, old) == (0, 0x12)
    u.set_p2m(22, r.out[0])
    ok(h)


def test_guest_exchanges_its_own_frame_with_domid_self(env):
    h, u, dom0 = env
    r = xchg(u.hc, DOMID_SELF, [u.f[23]], [23])
    assert (r.rc, r.nr_exchanged) == (0, 1) and h.ft.m2p(r.out[0]) == 23
    u.set_p2m(23, r.out[0])
    ok(h)


def test_two_pages_into_one_order_1_extent(env):
    h, u, dom0 = env
    r = xchg(dom0, u.id, [u.f[24], u.f[25]], [24], in_order=0, out_order=1)
    assert (r.rc, r.nr_exchanged) == (0, 2)
    head = r.out[0]
    assert head % 2 == 0
    assert [h.ft.m2p(head), h.ft.m2p(head + 1)] == [24, 25]
    u.set_p2m(24, head)
    u.set_p2m(25, head + 1)
    ok(h)


# -- refusals --------------------------------------------------------------------------------

def _extra_ref(kind, h, u):
    """Give u.f[30] one more reference of the named kind."""
    m = u.f[30]
    if kind == "foreign map":
        assert h.hypercalls(0).foreign_map(u.id, [m], False)[0] == 0
    elif kind == "guest RO mapping":
        write(h, u.f[1], {0: pte(m, P | US)})
        assert u.hc.mmuext_op([(PIN_L1, u.f[1])]) == (0, 1)
    elif kind == "pinned table":
        write(h, m, {})
        assert u.hc.mmuext_op([(PIN_L1, m)]) == (0, 1)
    elif kind == "CR3":
        write(h, m, {})
        assert u.hc.mmuext_op([(NEW_BASEPTR, m)]) == (0, 1)
    elif kind == "grant host map":
        from xenpage.hypervisor import grant_table
        grant_table.setup_table(h, u.id, 1)
        grant_table.write_entry(h, u.id, 3, G.GTF_permit_access, 0, m)
        assert h.hypercalls(0).grant_map(u.id, 3, G.GNTMAP_host_map | G.GNTMAP_readonly)[0] == 0
    return m


@pytest.mark.parametrize("kind", ["foreign map", "guest RO mapping", "pinned table", "CR3",
                                  "grant host map"])
def test_any_extra_reference_makes_the_steal_fail(env, kind):
    h, u, dom0 = env
    m = _extra_ref(kind, h, u)
    offline(h, m)
    s = Snap(h)
    r = xchg(dom0, u.id, [m], [30])
    assert (r.rc, r.nr_exchanged) == (EINVAL, 0)
    assert s.same()
    assert query(h, m) == (0, 0x8)  # still offline-pending
    ok(h)


def test_partial_progress_second_page_fails(env):
    h, u, dom0 = env
    a = u.f[26]
    b = _extra_ref("foreign map", h, u)
    r = xchg(dom0, u.id, [a, b], [26, 30])
    assert (r.rc, r.nr_exchanged) == (EINVAL, 1)
    assert h.ft.m2p(r.out[0]) == 26 and int(h.ft.count_info[a]) == ST_FREE
    assert h.ft.owner(b) == u.id and int(h.ft.count_info[b]) == ALLOC | 2
    u.set_p2m(26, r.out[0])
    ok(h)
    # continuing from nr_exchanged after the reference is gone finishes the job
    h.hypercalls(0).foreign_unmap(next(iter(h.foreign.maps)))
    r2 = xchg(dom0, u.id, [a, b], [26, 30], nr=1)
    assert (r2.rc, r2.nr_exchanged) == (0, 2) and h.ft.m2p(r2.out[1]) == 30
    u.set_p2m(30, r2.out[1])
    ok(h)


def test_argument_checks_in_order(env):
    h, u, dom0 = env
    v = Dom(h, 16, "v")
    m = u.f[27]
    s = Snap(h)
    assert xchg(u.hc, DOMID_SELF, [m], [27], in_order=10).rc == EPERM       # > domU max order 9
    assert xchg(dom0, u.id, [m], [27], in_order=13).rc == EPERM             # > ctl max order 12
    assert xchg(dom0, u.id, [m], [27], out_domid=v.id).rc == EINVAL          # domids differ
    assert xchg(dom0, 99, [m], [27], out_domid=98).rc == EINVAL              # ... before lookup
    assert xchg(dom0, u.id, [m, u.f[28]], [27]).rc == EINVAL                 # totals differ
    r = xchg(dom0, u.id, [m], [27], nr=2)
    assert (r.rc, r.nr_exchanged) == (EINVAL, 2)                             # nr_exchanged > nr
    r = xchg(dom0, u.id, [m], [27], nr=1)
    assert (r.rc, r.nr_exchanged) == (0, 1)                                  # already done
    assert xchg(dom0, 99, [m], [27]).rc == ESRCH                             # no such domain
    assert xchg(u.hc, v.id, [v.f[2]], [2]).rc == EPERM                       # guest -> other
    assert xchg(dom0, u.id, [v.f[2]], [2]).rc == EINVAL                      # not u's frame
    assert xchg(dom0, u.id, [h.nframes + 10], [2]).rc == EINVAL              # invalid MFN
    assert xchg(dom0, u.id, [h.heap.chunks()[-1][0]], [2]).rc == EINVAL      # a free frame
    assert xchg(dom0, u.id, [u.d.xenheap_pages[0]], [2]).rc == EINVAL        # shared_info
    assert s.same()
    ok(h)


def test_hvm_guest_is_refused_by_steal_page(env):
    h, u, dom0 = env
    hvm = Dom(h, 64, "hvm", hvm=True)
    s = Snap(h)
    r = xchg(dom0, hvm.id, [hvm.f[3]], [3])
    assert (r.rc, r.nr_exchanged) == (EOPNOTSUPP, 0)
    assert s.same()


@pytest.mark.parametrize("resets", [True, False])
def test_allocation_failure_after_the_steal_and_the_assign_quirk(env, monkeypatch, resets):
    """QUIRK 7.C5: a stolen offlining (here also broken) frame handed back by the fail path
    returns to inuse and loses PGC_broken; with the switch off it keeps both."""
    h, u, dom0 = env
    h.quirks.assign_resets_state = resets
    m = u.f[31]
    sysctl.machine_check_offline(h, m)
    assert int(h.ft.count_info[m]) == ALLOC | 1 | ST_OFFLINING | BROKEN

    def no_memory(order=0, zone_hi=None):
        raise OutOfMemory(order)
    monkeypatch.setattr(h.heap, "alloc", no_memory)
    monkeypatch.setattr(h.heap, "alloc_frames", lambda k, zone_hi=None: [])  # the batched path
    r = xchg(dom0, u.id, [m], [31])
    assert (r.rc, r.nr_exchanged) == (ENOMEM, 0)
    assert h.ft.owner(m) == u.id
    if resets:
        assert int(h.ft.count_info[m]) == ALLOC | 1
        assert query(h, m) == (0, 0)
    else:
        assert int(h.ft.count_info[m]) == ALLOC | 1 | ST_OFFLINING | BROKEN
        assert query(h, m) == (0, 0x18)
    ok(h)


# -- steal_page --------------------------------------------------------------------------------

def test_steal_page_conditions(env):
    h, u, dom0 = env
    v = Dom(h, 16, "v")
    hvm = Dom(h, 16, "hvm", hvm=True)
    assert steal_page(h, hvm.id, hvm.f[1]) == EOPNOTSUPP
    assert steal_page(h, u.id, v.f[1]) == EINVAL                   # owner is not d
    assert steal_page(h, u.id, h.heap.chunks()[-1][0]) == EINVAL   # count 0
    assert steal_page(h, u.id, u.d.xenheap_pages[0]) == EINVAL     # special (Xen heap)
    m = _extra_ref("foreign map", h, u)
    assert steal_page(h, u.id, m) == EINVAL                        # count != allocated|1
    ok(h)
    # success: count and PGC_allocated cleared, owner and type gone, state kept
    x = u.f[32]
    offline(h, x)
    assert steal_page(h, u.id, x) == 0
    assert int(h.ft.count_info[x]) == ST_OFFLINING
    assert h.ft.owner(x) is None and int(h.ft.type_info[x]) == 0


# -- populate / decrease -------------------------------------------------------------------------

def test_populate_physmap_assigns_frames_with_m2p(env):
    h, u, dom0 = env
    w = Dom(h, 32, "w", max_pages=35)
    n, mfns = w.hc.populate_physmap(Reservation([100, 101, 102, 103]))
    assert n == 3 and len(mfns) == 3  # the fourth is over max_pages
    for g, m in zip((100, 101, 102), mfns):
        assert h.ft.owner(m) == w.id and int(h.ft.count_info[m]) == ALLOC | 1 and h.ft.m2p(m) == g
    assert w.d.tot_pages == 35
    ok(h)


def test_decrease_reservation_frees_an_unmapped_page_at_once(env):
    h, u, dom0 = env
    m, g = u.f[40], 40
    tot = u.d.tot_pages
    assert u.hc.decrease_reservation(Reservation([m])) == 1
    assert int(h.ft.count_info[m]) == ST_FREE and h.ft.owner(m) is None
    assert u.d.tot_pages == tot - 1
    u.set_p2m(g, INVALID)
    ok(h)


def test_decrease_reservation_of_a_mapped_page_frees_it_when_unmapped(env):
    h, u, dom0 = env
    m, g = u.f[41], 41
    write(h, u.f[1], {0: pte(m, P | RW | US)})
    u.hc.mmuext_op([(PIN_L1, u.f[1])])
    offline(h, m)
    tot = u.d.tot_pages
    assert u.hc.decrease_reservation(Reservation([m])) == 1
    # PGC_allocated gone, the mapping's reference keeps it owned and counted
    assert int(h.ft.count_info[m]) == ST_OFFLINING | 1
    assert h.ft.owner(m) == u.id and u.d.tot_pages == tot
    u.set_p2m(g, INVALID)
    ok(h)
    assert u.hc.mmu_update(np.array([[(u.f[1] << 12), 0]], dtype=np.uint64)) == (0, 1)
    assert int(h.ft.count_info[m]) == ST_OFFLINED and m in h.heap.offlined_list
    assert u.d.tot_pages == tot - 1
    ok(h)


def test_decrease_reservation_stops_at_a_frame_that_is_not_the_guests(env):
    h, u, dom0 = env
    v = Dom(h, 16, "v")
    assert u.hc.decrease_reservation(Reservation([u.f[42], v.f[1], u.f[43]])) == 1
    assert h.ft.owner(v.f[1]) == v.id and h.ft.owner(u.f[43]) == u.id
    u.set_p2m(42, INVALID)
    ok(h)


# -- the batched path for single frames ------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from xenpage.hypervisor import memory as memory_mod  # noqa: E402
from xenpage.abi.memory import XENMEMF_address_bits  # noqa: E402


def _world(offl, broken, freed):
    """A host whose guest has frames offline-pending (some broken by a machine check) and
    some given back to the heap (free buddies next to frames being exchanged)."""
    h = Host.boot(HostConfig(mem_bytes=64 << 20), dom0_pages=2048)
    u = Dom(h, 64, "u")
    for i in sorted(set(freed)):
        assert u.hc.decrease_reservation(Reservation([u.f[i]], 0, X_SELF)) == 1
    for i in offl:
        if i in freed:
            continue
        if i in broken:
            sysctl.machine_check_offline(h, u.f[i])
        else:
            offline(h, u.f[i])
    return h, u


def _state(h):
    ft = h.ft
    return ([a.copy() for a in (ft.count_info, ft.type_info, ft.owner1, ft.m2p_plus1, ft.buddy_order)],
            h.heap.list_order(), list(h.heap.offlined_list), list(h.heap.broken_list), h.heap.free_pages)


X_SELF = DOMID_SELF


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ins=st.lists(st.integers(0, 63), min_size=1, max_size=24, unique=True),
       offl=st.lists(st.integers(0, 63), max_size=30), broken=st.lists(st.integers(0, 63), max_size=6),
       freed=st.lists(st.integers(0, 63), max_size=6), nr=st.integers(0, 3), all_pending=st.booleans(),
       bits=st.sampled_from([0, 0, 20, 25, 26, 28]))
def test_batched_exchange_of_frames_is_the_loop(ins, offl, broken, freed, nr, all_pending, bits):
    """``memory_exchange`` of single frames batched (when every extent is independent: all
    offline-pending, no free buddy) leaves exactly the frame table, free lists, offlined and
    broken lists and result that the extent-by-extent loop leaves -- with or without output
    address bits (the zones the allocations may use; too few bits: out of memory part-way)
    -- and declines otherwise."""
    nr = min(nr, len(ins))
    if all_pending:  # the toolstack's case: every input offline-pending
        offl = offl + ins
    out = []
    for fast in (True, False):
        h, u = _world(offl, broken, freed)
        mfns = [u.f[i] for i in ins]
        gpfns = [i for i in ins]
        old = memory_mod.FAST
        memory_mod.FAST = fast
        try:
            r = h.hypercalls(0).memory_exchange(
                Reservation(list(mfns), 0, u.id),
                Reservation(list(gpfns), 0, u.id, XENMEMF_address_bits(bits)), nr)
        finally:
            memory_mod.FAST = old
        out.append(((r.rc, r.nr_exchanged, list(r.out)), _state(h)))
    (ra, sa), (rb, sb) = out
    assert ra == rb
    for a, b in zip(sa[0], sb[0]):
        np.testing.assert_array_equal(a, b)
    assert sa[1:] == sb[1:]


def test_batched_exchange_is_taken_for_offline_pending_frames(env, monkeypatch):
    """The toolstack's case (every frame offline-pending, nothing free next to them) goes
    through the batched path, not the loop."""
    h, u, dom0 = env
    for i in (3, 9, 20):
        offline(h, u.f[i])
    monkeypatch.setattr(memory_mod, "steal_page", lambda *a: pytest.fail("the loop ran"))
    r = xchg(dom0, u.id, [u.f[i] for i in (3, 9, 20)], [3, 9, 20])
    assert (r.rc, r.nr_exchanged) == (0, 3)
    assert [h.ft.m2p(m) for m in r.out] == [3, 9, 20]
    assert all(query(h, u.f[i]) == (0, 0x2) for i in (3, 9, 20))  # offlined
    for g, m in zip((3, 9, 20), r.out):
        u.set_p2m(g, m)
    ok(h)
