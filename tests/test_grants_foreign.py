"""Grant maps (``GNTTABOP_map_grant_ref`` / ``unmap_grant_ref``, v1), dom0's foreign
mappings and ``XEN_DOMCTL_getpageframeinfo3`` on the simulated Xen 4.17
(xen-semantics.md 2.5, 2.7, 3.6): the references each mapping holds, the GTF_reading /
GTF_writing bits Xen sets and clears, GNTST statuses and errnos, and the page type the
toolstack sees for every kind of frame.
"""

from __future__ import annotations

import numpy as np
import pytest

from xenpage.guests.linux_pv import LinuxPV
from xenpage.hypervisor import grant_table, sysctl
from xenpage.hypervisor.host import Host, HostConfig

from page_info import Dom, gen, ok, write  # noqa: E402

ALLOC = 0x8000000000000000
COUNT = 0x00FFFFFFFFFFFFFF
TCOUNT = 0x007FFFFFFFFFFFFF
WRT, VALID = 0xE000000000000000, 0x0400000000000000
P, RW, US = 0x1, 0x2, 0x4
PIN_L1, UNPIN = 0, 4
# grant_table.h
GTF_permit_access, GTF_readonly, GTF_reading, GTF_writing = 1, 4, 8, 16
DEV, HOST, RO = 1, 2, 4
GNTST_okay, GNTST_general_error, GNTST_bad_domain, GNTST_bad_gntref = 0, -1, -2, -3
GNTST_bad_handle, GNTST_bad_page = -4, -9
# domctl.h
NOTAB, L1TAB, L2TAB, L3TAB, L4TAB = 0x0, 0x10000000, 0x20000000, 0x30000000, 0x40000000
LPINTAB, XTAB, BROKEN = 0x80000000, 0xF0000000, 0xD0000000
EPERM, ESRCH, EBUSY, EINVAL = -1, -3, -16, -22
DOMID_XEN = 0x7FF2


def tc(h, m):
    return int(h.ft.type_info[m]) & TCOUNT


class Snap:
    """General counts and type counts (a writable type that a refused mapping took and gave
    back lingers with count 0, as in Xen: only the counts are compared)."""

    def __init__(self, h):
        self.h = h
        self.arrs = self._now()

    def _now(self):
        return [self.h.ft.count_info.copy(), self.h.ft.type_info & np.uint64(TCOUNT)]

    def same(self):
        return all(np.array_equal(a, b) for a, b in zip(self.arrs, self._now()))


@pytest.fixture
def env():
    """dom0 and guests u, v; u has one grant frame; ref 5 grants u.f[10] to dom0,
    ref 6 grants u.f[11] read-only to dom0, ref 7 grants u.f[12] to v."""
    h = Host.boot(HostConfig(mem_bytes=64 << 20), dom0_pages=2048)
    u, v = Dom(h, 64, "u"), Dom(h, 32, "v")
    grant_table.setup_table(h, u.id, 1)
    grant_table.write_entry(h, u.id, 5, GTF_permit_access, 0, u.f[10])
    grant_table.write_entry(h, u.id, 6, GTF_permit_access | GTF_readonly, 0, u.f[11])
    grant_table.write_entry(h, u.id, 7, GTF_permit_access, v.id, u.f[12])
    ok(h)
    return h, u, v, h.hypercalls(0)


def eflags(h, u, ref):
    return grant_table.read_entry(h, u.id, ref)[0]


# -- grant maps ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,general,typ", [
    (HOST | RO, 1, 0),
    (HOST, 1, 1),
    (DEV | RO, 1, 0),
    (DEV, 1, 1),
    (HOST | DEV | RO, 2, 0),
    (HOST | DEV, 2, 2),
])
def test_grant_map_references(env, flags, general, typ):
    h, u, v, dom0 = env
    m = u.f[10]
    st, handle = dom0.grant_map(u.id, 5, flags)
    assert st == GNTST_okay and handle > 0
    assert gen(h, m) == 1 + general and tc(h, m) == typ
    if typ:
        assert int(h.ft.type_info[m]) == WRT | VALID | typ
    want = GTF_permit_access | GTF_reading | (0 if flags & RO else GTF_writing)
    assert eflags(h, u, 5) == want
    ok(h)
    assert dom0.grant_unmap(handle) == GNTST_okay
    assert int(h.ft.count_info[m]) == ALLOC | 1 and tc(h, m) == 0
    assert eflags(h, u, 5) == GTF_permit_access
    ok(h)


def test_reading_and_writing_bits_follow_the_pins(env):
    h, u, v, dom0 = env
    st, h_ro = dom0.grant_map(u.id, 5, HOST | RO)
    st2, h_rw = dom0.grant_map(u.id, 5, HOST)
    assert st == st2 == GNTST_okay
    assert eflags(h, u, 5) == GTF_permit_access | GTF_reading | GTF_writing
    assert gen(h, u.f[10]) == 3 and tc(h, u.f[10]) == 1
    ok(h)
    dom0.grant_unmap(h_rw)
    assert eflags(h, u, 5) == GTF_permit_access | GTF_reading
    dom0.grant_unmap(h_ro)
    assert eflags(h, u, 5) == GTF_permit_access
    ok(h)


def test_grant_map_statuses(env):
    h, u, v, dom0 = env
    s = Snap(h)
    assert dom0.grant_map(u.id, 5, RO)[0] == GNTST_bad_gntref             # neither host nor device
    assert dom0.grant_map(77, 5, HOST)[0] == GNTST_bad_domain
    assert dom0.grant_map(DOMID_XEN, 5, HOST)[0] == GNTST_bad_domain
    assert dom0.grant_map(u.id, 512, HOST)[0] == GNTST_bad_gntref          # beyond one frame
    assert dom0.grant_map(u.id, 9, HOST)[0] == GNTST_general_error        # GTF_invalid entry
    assert dom0.grant_map(u.id, 7, HOST)[0] == GNTST_general_error        # granted to v
    assert dom0.grant_map(u.id, 6, HOST)[0] == GNTST_general_error        # r/o entry, RW map
    assert v.hc.grant_map(u.id, 5, HOST)[0] == GNTST_general_error        # not v's grant
    assert s.same()
    # a read-only entry mapped read-only is fine
    st, hnd = dom0.grant_map(u.id, 6, HOST | RO)
    assert st == GNTST_okay and eflags(h, u, 6) == GTF_permit_access | GTF_readonly | GTF_reading
    dom0.grant_unmap(hnd)
    ok(h)


def test_grant_of_a_frame_that_is_not_the_granters_is_bad_page(env):
    h, u, v, dom0 = env
    grant_table.write_entry(h, u.id, 8, GTF_permit_access, 0, v.f[3])
    s = Snap(h)
    assert dom0.grant_map(u.id, 8, HOST)[0] == GNTST_bad_page
    assert eflags(h, u, 8) == GTF_permit_access
    assert s.same()
    ok(h)


def test_writable_grant_map_of_a_page_table_fails(env):
    h, u, v, dom0 = env
    t1 = u.f[20]
    write(h, t1, {})
    assert u.hc.mmuext_op([(PIN_L1, t1)]) == (0, 1)
    grant_table.write_entry(h, u.id, 8, GTF_permit_access, 0, t1)
    s = Snap(h)
    assert dom0.grant_map(u.id, 8, HOST)[0] == GNTST_general_error
    assert eflags(h, u, 8) == GTF_permit_access
    assert s.same()
    st, hnd = dom0.grant_map(u.id, 8, HOST | RO)
    assert st == GNTST_okay and gen(h, t1) == 3
    ok(h)


def test_entry_pinned_by_one_domain_cannot_be_mapped_by_another(env):
    h, u, v, dom0 = env
    st, hnd = v.hc.grant_map(u.id, 7, HOST)
    assert st == GNTST_okay
    assert dom0.grant_map(u.id, 7, HOST | RO)[0] == GNTST_general_error
    assert dom0.grant_unmap(hnd) == GNTST_bad_handle  # not dom0's mapping
    assert dom0.grant_unmap(12345) == GNTST_bad_handle
    ok(h)
    # the mapper dying releases its mappings
    h.destroy_domain(v.id)
    assert int(h.ft.count_info[u.f[12]]) == ALLOC | 1 and tc(h, u.f[12]) == 0
    assert eflags(h, u, 7) == GTF_permit_access
    ok(h)


# -- foreign mappings ----------------------------------------------------------------------------

def test_foreign_map_references(env):
    h, u, v, dom0 = env
    a, b = u.f[30], u.f[31]
    rc, ro = dom0.foreign_map(u.id, [a, b], False)
    assert rc == 0 and gen(h, a) == 2 and gen(h, b) == 2 and tc(h, a) == 0
    rc, rw = dom0.foreign_map(u.id, [a], True)
    assert rc == 0 and gen(h, a) == 3 and int(h.ft.type_info[a]) == WRT | VALID | 1
    ok(h)
    assert dom0.foreign_unmap(rw) == 0 and dom0.foreign_unmap(ro) == 0
    assert int(h.ft.count_info[a]) == ALLOC | 1 and int(h.ft.count_info[b]) == ALLOC | 1
    assert dom0.foreign_unmap(ro) == EINVAL
    ok(h)


def test_foreign_map_refusals_change_nothing(env):
    h, u, v, dom0 = env
    t1 = u.f[20]
    write(h, t1, {})
    u.hc.mmuext_op([(PIN_L1, t1)])
    s = Snap(h)
    assert dom0.foreign_map(u.id, [u.f[30], t1], True)[0] == EBUSY          # RW of a page table
    assert dom0.foreign_map(u.id, [u.f[30], v.f[2]], False)[0] == EBUSY     # v's frame
    assert dom0.foreign_map(u.id, [h.heap.chunks()[-1][0]], False)[0] == EBUSY  # a free frame
    assert dom0.foreign_map(u.id, [0xA0], False)[0] == EPERM                # DOMID_IO frame
    assert dom0.foreign_map(u.id, [h.nframes + 3], False)[0] == EPERM       # no such frame
    assert u.hc.foreign_map(v.id, [v.f[2]], False)[0] == EPERM               # not privileged
    assert dom0.foreign_map(77, [1], False)[0] == ESRCH
    assert s.same()
    rc, hnd = dom0.foreign_map(u.id, [t1], False)  # read-only is fine
    assert rc == 0 and gen(h, t1) == 3
    ok(h)


def test_foreign_map_of_an_hvm_guest_takes_no_type_reference(env):
    h, u, v, dom0 = env
    hvm = Dom(h, 64, "hvm", hvm=True)
    m = hvm.f[7]
    t0 = int(h.ft.type_info[m])
    rc, hnd = dom0.foreign_map(hvm.id, [7], True)  # a GFN
    assert rc == 0 and gen(h, m) == 2 and int(h.ft.type_info[m]) == t0
    ok(h)
    assert dom0.foreign_map(hvm.id, [64], False)[0] == EINVAL  # beyond its P2M
    dom0.foreign_unmap(hnd)
    ok(h)


# -- getpageframeinfo3 ----------------------------------------------------------------------------

@pytest.fixture
def linux():
    h = Host.boot(HostConfig(mem_bytes=256 << 20), dom0_pages=64 * 256)
    d = h.create_domain("lin", 48 * 256)
    g = LinuxPV.boot(h, d.domid, seed=5)
    ok(h)
    return h, g


def test_page_types_of_a_linux_guest(linux):
    h, g = linux
    dom0 = h.hypercalls(0)
    m2 = g.p2m()
    t = g.tables
    cases = {
        "data": (g.kernel_only_pages()[0], NOTAB),
        "p2m": (t["p2m"][0], NOTAB),
        "direct L1 (pinned)": (t["direct_l1"][0], L1TAB | LPINTAB),
        "vmalloc L1 (pinned)": (t["vmalloc_l1"][0], L1TAB | LPINTAB),
        "user L1 (pinned)": (g.procs[0].ul1[0], L1TAB | LPINTAB),
        "kernel image L1": (t["kernel_l1"][0], L1TAB),
        "fixmap L1": (t["fixmap_l1"][0], L1TAB),
        "direct L2": (t["direct_l2"][0], L2TAB),
        "user L2": (g.procs[1].ul2, L2TAB),
        "direct L3": (t["direct_l3"][0], L3TAB),
        "vsyscall L3": (t["vsyscall_l3"], L3TAB),
        "swapper": (t["swapper"], L4TAB | LPINTAB),
        "user pgd": (g.procs[2].upgd, L4TAB | LPINTAB),
    }
    rc, types = dom0.getpageframeinfo3(g.domid, [int(m2[pf]) for pf, _ in cases.values()])
    assert rc == 0
    got = dict(zip(cases, (int(x) for x in types)))
    assert got == {k: v for k, (_, v) in cases.items()}
    # frames that are not the guest's, its Xen-heap frames, free frames
    d = h.domains[g.domid]
    others = [int(h.owned_frames(0)[3]), d.xenheap_pages[0], h.heap.chunks()[-1][0], h.nframes + 1]
    rc, types = dom0.getpageframeinfo3(g.domid, others)
    assert rc == 0 and [int(x) for x in types] == [XTAB] * 4


def test_page_types_broken_and_devalidated(linux):
    h, g = linux
    dom0 = h.hypercalls(0)
    pf = g.kernel_only_pages()[5]
    m = g.mfn(pf)
    sysctl.machine_check_offline(h, m)
    assert [int(x) for x in dom0.getpageframeinfo3(g.domid, [m])[1]] == [BROKEN]
    # an L1 that lost its pin and its last link reads NOTAB although its type field is L1
    u = Dom(h, 16, "u")
    write(h, u.f[1], {})
    u.hc.mmuext_op([(PIN_L1, u.f[1])])
    assert int(dom0.getpageframeinfo3(u.id, [u.f[1]])[1][0]) == L1TAB | LPINTAB
    u.hc.mmuext_op([(UNPIN, u.f[1])])
    assert int(dom0.getpageframeinfo3(u.id, [u.f[1]])[1][0]) == NOTAB
    assert dom0.getpageframeinfo3(77, [1])[0] == ESRCH
    assert u.hc.getpageframeinfo3(g.domid, [m])[0] == EPERM


# -- pages Xen maps for itself --------------------------------------------------------------------

def test_pages_registered_with_xen_hold_a_writable_reference(env):
    """VCPUOP_register_vcpu_info / EVTCHNOP_init_control / EVTCHNOP_expand_array: Xen maps
    the guest's page itself (general + writable type reference) until the domain dies;
    nobody else can drop it, and the page cannot be stolen by XENMEM_exchange."""
    from xenpage.hypervisor.memory import Reservation
    h, u, v, dom0 = env
    vi, ctl, arr = u.f[40], u.f[41], u.f[42]
    assert u.hc.register_vcpu_info(vi) == 0
    assert u.hc.evtchn_init_control(ctl) == 0
    assert u.hc.evtchn_expand_array(arr) == 0
    for m in (vi, ctl, arr):
        assert gen(h, m) == 2 and int(h.ft.type_info[m]) == WRT | VALID | 1
    ok(h)
    assert u.hc.register_vcpu_info(u.f[43]) == EINVAL          # already registered
    assert u.hc.evtchn_init_control(u.f[43]) == EINVAL
    assert u.hc.evtchn_expand_array(v.f[1]) == EINVAL          # not its frame
    t1 = u.f[20]
    write(h, t1, {})
    u.hc.mmuext_op([(PIN_L1, t1)])
    assert u.hc.evtchn_expand_array(t1) == EINVAL              # a page table
    handles = [hd for hd, m in h.foreign.maps.items() if m.mapper == DOMID_XEN]
    assert len(handles) == 3
    assert dom0.foreign_unmap(handles[0]) == EINVAL             # not dom0's mapping
    r = dom0.memory_exchange(Reservation([vi], 0, u.id), Reservation([40], 0, u.id))
    assert (r.rc, r.nr_exchanged) == (EINVAL, 0)
    ok(h)
    h.destroy_domain(u.id)
    assert not h.foreign.maps
    ok(h)
