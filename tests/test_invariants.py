"""The invariant checker (xenpage.hypervisor.invariants): it recomputes every general and
type count from page tables, pins, vCPU roots, grant maps and foreign mappings, and checks
M2P/P2M agreement, owners and allocator lists, and that no retired frame is referenced or
allocated.

* a clean host (and one that ran a workload) has no violations;
* each kind of deliberate corruption is caught;
* a hypothesis state machine drives a small host through guest workload steps, dom0 foreign
  map/unmap, grant/ungrant, offline/online, exchange of pending frames with the toolstack on
  a suspended guest, and guest destruction, checking after every step.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from xenpage.abi import grant as G
from xenpage.backends.sim import SimHypervisor, build_host
from xenpage.guests import linux_pv as L
from xenpage.hypervisor import grant_table, invariants, sysctl
from xenpage.hypervisor.host import Host, HostConfig
from xenpage.hypervisor.quirks import Quirks
from xenpage.toolstack.exchange import exchange_pages
from xenpage.toolstack.outcomes import Kind, Reason

ST_OFFLINED = 0x0800000000000000
P, RW, US = 0x1, 0x2, 0x4
EBUSY = -16


def small(guest_mib=16, seed=11):
    """Raw offlines here check the invariants of the fixed buddy split (xen-semantics.md 1.8);
    Xen 4.17's own misaligned split has tests/test_split_guard.py."""
    h = Host.boot(HostConfig(mem_bytes=128 << 20, quirks=Quirks(reserve_misaligned=False)),
                  dom0_pages=32 * 256)
    d = h.create_domain("lin", guest_mib * 256)
    g = L.LinuxPV.boot(h, d.domid, seed=seed)
    return h, g


# -- clean ---------------------------------------------------------------------------------------

def test_default_host_is_clean():
    h = build_host()
    assert invariants.check(h) == []
    for g in h.guests.values():
        if hasattr(g, "step"):
            g.step(200)
    assert invariants.check(h) == []
    invariants.assert_ok(h)


# -- corruption, one kind per test ----------------------------------------------------------------

@pytest.fixture
def sg():
    h, g = small()
    assert invariants.check(h) == []
    return h, g


def _caught(h, *words):
    p = invariants.check(h)
    assert p, "the corruption went unnoticed"
    text = " | ".join(p)
    assert all(w in text for w in words), text
    with pytest.raises(invariants.InvariantError):
        invariants.assert_ok(h)


def test_catches_a_wrong_general_count(sg):
    h, g = sg
    m = g.mfn(g.user_pages("private")[0])
    h.ft.count_info[m] += np.uint64(1)
    # allocation + direct map + the process's mapping = 3
    _caught(h, f"mfn {m:#x}: general count 4 but 3 references exist")


def test_catches_a_wrong_type_count(sg):
    h, g = sg
    m = g.mfn(g.user_pages("shared")[0])
    h.ft.type_info[m] -= np.uint64(1)
    _caught(h, f"mfn {m:#x}: type count")


def test_catches_a_stale_m2p_entry(sg):
    h, g = sg
    pf = g.kernel_only_pages()[4]
    h.ft.set_m2p(g.mfn(pf), pf + 1)
    _caught(h, "M2P", f"P2M says pfn {pf:#x}")


def test_catches_an_offlined_frame_still_mapped(sg):
    h, g = sg
    m = g.mfn(g.user_pages("private")[1])
    h.ft.set_state(m, 2)  # offlined, while L1 entries still map it
    h.heap.offlined_list[m] = None
    _caught(h, f"offlined mfn {m:#x} is still referenced or owned")


def test_catches_a_heap_chunk_overlap(sg):
    h, g = sg
    head, order = next((c for c in h.heap.chunks() if c[1] >= 2))
    h.heap._add(head + 2, 0)  # a second chunk inside a free chunk
    _caught(h, f"chunk {head + 2:#x} order 0 overlaps")


def test_catches_a_free_frame_that_is_still_allocated(sg):
    h, g = sg
    head, order = h.heap.chunks()[-1]
    h.ft.set_owner(head, g.domid)
    _caught(h, "free frame has an owner")


def test_catches_a_page_table_mapped_writable_behind_xens_back(sg):
    h, g = sg
    m2 = g.p2m()
    l1 = int(m2[g.procs[0].ul1[0]])
    victim = int(m2[g.tables["direct_l1"][0]])
    h.ft.table(l1)[300] = np.uint64((victim << 12) | P | RW | US)  # not through mmu_update
    _caught(h, f"mfn {victim:#x}", "type")


def test_catches_a_p2m_naming_another_domains_frame(sg):
    h, g = sg
    m2 = g.p2m()
    pf = g.kernel_only_pages()[6]
    p2m_frame = int(m2[g.tables["p2m"][pf // 512]])
    h.ft.table(p2m_frame)[pf % 512] = np.uint64(int(h.owned_frames(0)[7]))
    _caught(h, f"P2M[{pf:#x}]", "is not its frame")


def test_catches_a_pin_bit_on_a_data_page(sg):
    h, g = sg
    m = g.mfn(g.kernel_only_pages()[8])
    h.ft.type_info[m] |= np.uint64(0x0800000000000000)
    _caught(h, f"mfn {m:#x} is pinned but not a validated page table")


def test_catches_an_offlined_frame_missing_from_the_lists(sg):
    h, g = sg
    head, order = h.heap.chunks()[-1]
    rc, st_ = sysctl.page_offline_op(h, 0, 1, head, head, pcpu=1)
    assert rc == 0 and invariants.check(h) == []
    h.heap.offlined_list.pop(head)
    _caught(h, "offlined frames")


# -- the state machine ----------------------------------------------------------------------------

class HostMachine(RuleBasedStateMachine):
    """A 128 MiB host with dom0, a 16 MiB Linux PV guest and an 8 MiB HVM guest; dom0 maps,
    grants come and go, frames are offlined/onlined and exchanged, the guest may die."""

    @initialize(seed=st.integers(1, 1000))
    def boot(self, seed):
        self.h, self.g = small(16, seed)
        self.hvm = self.h.create_domain("hvm", 8 * 256, hvm=True)
        self.hv = SimHypervisor(self.h)
        self.hv.set_vcpu_affinity(0, 0, [1])
        self.maps: list[tuple[int, int]] = []     # (handle, domid)
        self.grants: list[tuple[int, int]] = []   # (handle, ref)
        self.next_ref = 20
        self.pending: set[int] = set()
        self.offlined: set[int] = set()
        #: the guest destroyed while dom0 still mapped some of its frames (dying)
        self.dead: int | None = None

    # helpers
    @property
    def alive(self) -> bool:
        return self.g is not None

    def pfn(self, i: int, roles=None) -> int:
        """A pfn of one of ``roles`` (the role chosen first), from a few per role, so that
        maps, grants and offlines meet the same frames often."""
        roles = roles or (L.DATA, L.KTEXT, L.L1T, L.L2T, L.L3T, L.P2M, L.FREE)
        role = roles[i % len(roles)]
        cand = np.flatnonzero(self.g.role == role)
        few = cand[np.linspace(0, cand.size - 1, min(cand.size, 12)).astype(np.int64)]
        return int(few[(i // len(roles)) % few.size])

    # rules
    @precondition(lambda self: self.alive)
    @rule(n=st.integers(1, 40))
    def guest_steps(self, n):
        self.g.step(n)

    @precondition(lambda self: self.alive)
    @rule(i=st.integers(0, 10**6), writable=st.booleans())
    def dom0_maps(self, i, writable):
        pf = self.pfn(i)
        m = self.g.mfn(pf)
        rc, hnd = self.h.hypercalls(0).foreign_map(self.g.domid, [m], writable)
        if writable and self.g.role[pf] in L.TABLE_ROLES:
            assert rc == EBUSY
        else:
            assert rc == 0
            self.maps.append((hnd, self.g.domid))

    @rule(gfn=st.integers(0, 8 * 256 - 1), writable=st.booleans())
    def dom0_maps_hvm(self, gfn, writable):
        rc, hnd = self.h.hypercalls(0).foreign_map(self.hvm.domid, [gfn], writable)
        assert rc == 0
        self.maps.append((hnd, self.hvm.domid))

    @precondition(lambda self: self.maps)
    @rule(i=st.integers(0, 10**6))
    def dom0_unmaps(self, i):
        hnd, dom = self.maps.pop(i % len(self.maps))
        assert self.h.hypercalls(0).foreign_unmap(hnd) == 0
        if dom == self.dead:  # a dying guest: its frame may have been the last reference
            for m in [m for m in self.pending if self.h.ft.owner(m) is None]:
                assert self.h.ft.state(m) == 2  # freed while offline-pending: offlined
                self.pending.discard(m)
                self.offlined.add(m)
            gone = not any(d == dom for _, d in self.maps)
            assert (self.hv.domain_info(dom) is None) == gone
            if gone:
                self.dead = None

    @precondition(lambda self: self.alive and self.next_ref < 500)
    @rule(i=st.integers(0, 10**6), flags=st.sampled_from([
        G.GNTMAP_host_map, G.GNTMAP_host_map | G.GNTMAP_readonly, G.GNTMAP_device_map,
        G.GNTMAP_host_map | G.GNTMAP_device_map]))
    def grant(self, i, flags):
        pf = self.pfn(i, (L.DATA,))
        ref = self.next_ref
        self.next_ref += 1
        grant_table.write_entry(self.h, self.g.domid, ref, G.GTF_permit_access, 0, self.g.mfn(pf))
        st_, hnd = self.h.hypercalls(0).grant_map(self.g.domid, ref, flags)
        assert st_ == G.GNTST_okay
        self.grants.append((hnd, ref))

    @precondition(lambda self: self.grants)
    @rule(i=st.integers(0, 10**6))
    def ungrant(self, i):
        hnd, ref = self.grants.pop(i % len(self.grants))
        assert self.h.hypercalls(0).grant_unmap(hnd) == G.GNTST_okay
        if self.alive:
            e = grant_table.read_entry(self.h, self.g.domid, ref)
            assert e[0] == G.GTF_permit_access  # reading/writing cleared
            grant_table.write_entry(self.h, self.g.domid, ref, 0, 0, 0)  # the guest revokes it

    @precondition(lambda self: self.alive)
    @rule(i=st.integers(0, 10**6))
    def offline_guest_frame(self, i):
        pf = self.pfn(i, (L.DATA, L.KTEXT, L.L1T, L.L2T, L.L3T, L.L4T, L.P2M, L.FREE, L.RING,
                          L.XEN_MAPPED))
        self._offline_guest_mfn(self.g.mfn(pf))

    def _offline_guest_mfn(self, m):
        """Offline a frame of the guest: offline-pending and owned, unless the guest got it
        (by an exchange) from Xen's freed init region, inside the Xen image: never
        offlinable."""
        rc, s = sysctl.page_offline_op(self.h, 0, 1, m, m, pcpu=1)
        xs, xe = self.h.xen_image
        if xs <= m < xe:
            assert (rc, int(s[0])) == (-1, 0x7FF20108)
            return
        assert rc == 0 and int(s[0]) == 0x1004 | (self.g.domid << 16)
        self.pending.add(m)

    @precondition(lambda self: self.alive and any(d == self.g.domid for _, d in self.maps))
    @rule(i=st.integers(0, 10**6))
    def offline_mapped_frame(self, i):
        """A frame dom0 has mapped goes offline-pending (its exchange must roll back)."""
        mine = [hnd for hnd, d in self.maps if d == self.g.domid]
        self._offline_guest_mfn(self.h.foreign.maps[mine[i % len(mine)]].mfns[0])

    @rule(i=st.integers(0, 10**6))
    def offline_free_frame(self, i):
        xs, xe = self.h.xen_image  # its freed init region is free but never offlinable
        chunks = [c for c in self.h.heap.chunks() if not xs <= c[0] < xe]
        head, order = chunks[i % len(chunks)]
        m = head + (i % (1 << order))
        rc, s = sysctl.page_offline_op(self.h, 0, 1, m, m, pcpu=1)
        assert (rc, int(s[0])) == (0, 0x2)
        self.offlined.add(m)

    @precondition(lambda self: self.pending or self.offlined)
    @rule(i=st.integers(0, 10**6))
    def online(self, i):
        pool = sorted(self.pending | self.offlined)
        m = pool[i % len(pool)]
        rc, s = sysctl.page_offline_op(self.h, 0, 2, m, m, pcpu=1)
        assert rc == 0
        self.pending.discard(m)
        self.offlined.discard(m)

    @precondition(lambda self: self.alive)
    @rule(data=st.data())
    def exchange(self, data):
        """Offline a few more frames, then exchange a random subset of the guest's pending
        frames under one suspend."""
        for i in data.draw(st.lists(st.integers(0, 10**6), max_size=3)):
            self.offline_guest_frame(i)
        pool = sorted(m for m in self.pending if self.h.ft.owner(m) == self.g.domid
                      and self.h.ft.state(m) == 1)
        if not pool:
            return
        picks = data.draw(st.lists(st.sampled_from(pool), min_size=1, max_size=4, unique=True))
        d = self.g.domid
        assert self.hv.xs_write(f"/local/domain/{d}/control/shutdown", "suspend") == 0
        self.hv.wait(0)
        assert self.hv.domain_info(d).shutdown_reason == 2
        outs = exchange_pages(self.hv, d, picks)
        assert self.hv.resume(d) == 0
        self.hv.wait(0)
        for o in outs:
            event(f"exchange: {o.kind.name} {o.reason.name}")
            assert o.kind in (Kind.EXCHANGED, Kind.PENDING, Kind.REFUSED, Kind.ROLLED_BACK), o
            if o.kind == Kind.EXCHANGED:
                assert self.h.ft.state(o.mfn) == 2  # offlined
                self.pending.discard(o.mfn)
                self.offlined.add(o.mfn)
            else:
                assert self.h.ft.state(o.mfn) == 1  # still pending, guest intact

    @precondition(lambda self: self.alive)
    @rule()
    def destroy(self):
        """xl destroy: the backends' grant maps go with the devices; dom0's foreign mappings
        stay and keep the frames they map -- and the domain, dying -- until unmapped."""
        d = self.g.domid
        self.grants = []
        held = {m for hnd, dom in self.maps if dom == d for m in self.h.foreign.maps[hnd].mfns}
        mine = [m for m in self.pending if self.h.ft.owner(m) == d]
        assert self.hv.destroy(d) == 0
        for m in mine:
            if m in held:
                assert self.h.ft.state(m) == 1 and self.h.ft.owner(m) == d  # still pending
                continue
            assert self.h.ft.state(m) == 2
            self.pending.discard(m)
            self.offlined.add(m)
        info = self.hv.domain_info(d)
        assert (info is not None) == bool(held)
        if held:
            assert info.dying and info.tot_pages == len(held)
            self.dead = d
        self.g = None

    @precondition(lambda self: self.dead is not None)
    @rule(i=st.integers(0, 10**6))
    def offline_dying_frame(self, i):
        """mem-offline of a frame the dying guest still holds: pending, no suspend asked."""
        from xenpage.toolstack.offline import mem_offline
        mine = [hnd for hnd, d in self.maps if d == self.dead]
        m = self.h.foreign.maps[mine[i % len(mine)]].mfns[0]
        if self.h.ft.state(m) != 0:
            return
        o = mem_offline(self.hv, [m]).outcomes[0]
        assert (o.kind, o.reason) == (Kind.PENDING, Reason.DYING), o
        self.pending.add(m)

    # checked after every step
    @invariant()
    def consistent(self):
        if not hasattr(self, "h"):
            return
        assert invariants.check(self.h) == []
        if self.alive:
            assert self.g.verify() == []


HostMachine.TestCase.settings = HostMachine.TestCase.settings.__class__(
    HostMachine.TestCase.settings, stateful_step_count=20)
TestHostMachine = HostMachine.TestCase
