"""Dying domains (issue 16, item 2): a domain destroyed while something still references its
pages -- a dom0 process's foreign mapping, a backend's grant map that is not let go --
lingers as in Xen 4.17 (``domain_kill`` relinquishes every page, a page still referenced
stays allocated to it, and ``put_domain`` at the free of its last page destroys it): dying
(``XEN_DOMINF_dying``, ``xl list``'s ``d``), its frames freed as their last reference goes.
``mem-offline`` of such a frame never asks the domain to suspend: the frame stays pending with
the reason and is offlined when it is freed (``free_heap_pages`` of an offlining frame)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simworld import small_host
from xenpage.abi import errno as E
from xenpage.abi import sysctl as S
from xenpage.abi import xen as X
from xenpage.backends.sim import SimHypervisor
from xenpage.guests import linux_pv as L
from xenpage.hypervisor import invariants
from xenpage.hypervisor.host import Host, HostConfig
from xenpage.hypervisor.quirks import Quirks
from xenpage.toolstack.offline import mem_offline
from xenpage.toolstack.outcomes import Kind, Reason

PENDING, OFFLINED = S.PG_OFFLINE_STATUS_OFFLINE_PENDING, S.PG_OFFLINE_STATUS_OFFLINED


class WatchedHypervisor(SimHypervisor):
    """The simulator's dom0 view, recording every xenstore write and pause the toolstack
    makes (a suspend request is a ``control/shutdown`` write)."""

    def __init__(self, host):
        super().__init__(host)
        self.writes: list[tuple[str, str]] = []
        self.pauses: list[int] = []

    def xs_write(self, path, value):
        self.writes.append((path, value))
        return super().xs_write(path, value)

    def pause(self, domid):
        self.pauses.append(domid)
        return super().pause(domid)


def ok(h):
    assert invariants.check(h) == []


def status(hv, mfn):
    rc, st_ = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    assert rc == 0
    return int(st_[0])


def linux_host(quirks: Quirks | None = None):
    h = Host.boot(HostConfig(mem_bytes=128 << 20, quirks=quirks or Quirks()), dom0_pages=32 * 256)
    d = h.create_domain("lin", 8 * 256)
    g = L.LinuxPV.boot(h, d.domid, seed=5)
    hv = WatchedHypervisor(h)
    hv.set_vcpu_affinity(0, 0, [1])  # offline from pCPU 1 (Xen 4.17's PoD-lock hang)
    return h, g, hv


def buddy_pair(h, g):
    """An odd data frame of the guest whose buddy (frame - 1) is the guest's too."""
    mine = set(h.owned_frames(g.domid).tolist())
    for pf in g.pfns_of(L.DATA).tolist():
        m = g.mfn(int(pf))
        if m & 1 and m - 1 in mine:
            return m, m - 1
    raise AssertionError("no buddy pair")


def test_destroyed_domain_lingers_while_dom0_maps_its_frames():
    h, g, hv = linux_host()
    dom = g.domid
    frame, buddy = buddy_pair(h, g)
    n_owned = h.owned_frames(dom).size
    former = g.mfn(int(g.pfns_of(L.DATA)[-1]))
    assert former not in (frame, buddy)
    free0 = h.heap.free_pages
    mf = hv.map_foreign(dom, [frame], False)
    mb = hv.map_foreign(dom, [buddy], True)
    assert not isinstance(mf, int) and not isinstance(mb, int)
    assert hv.destroy(dom) == 0
    info = hv.domain_info(dom)
    assert info is not None and info.dying and not info.shutdown
    assert info.state_letters() == "-----d" and info.name == ""
    assert info.tot_pages == 2 and [d.domid for d in hv.domain_list()] == [0, dom]
    assert sorted(h.owned_frames(dom).tolist()) == [buddy, frame]
    # everything else it had is free again: its frames and its Xen-heap pages (shared_info,
    # grant frames)
    assert h.heap.free_pages == free0 + n_owned - 2
    assert hv.xs_read(f"/local/domain/{dom}/name") is None
    ok(h)
    # a frame it had is free now: mapping it fails as for any frame not the domain's
    assert h.ft.owner(former) is None
    assert hv.map_foreign(dom, [former], False) == -E.EBUSY

    hv.writes.clear()
    r = mem_offline(hv, [frame])
    o = r.outcomes[0]
    assert (o.kind, o.reason, o.domid) == (Kind.PENDING, Reason.DYING, dom)
    assert o.detail == f"owner d{dom} is dying; offlined when its last reference goes"
    assert not [w for w in hv.writes if "control/shutdown" in w[0]] and dom not in hv.pauses
    err = r.report.stderr
    assert f"xenpage: mfn {frame:x}: owner d{dom} is dying; offlined when its last reference goes" in err
    assert f"DOM{dom}: No suspend port, try live migration" in err  # what xen-hptool says
    assert r.report.exit_code == 1
    assert status(hv, frame) == PENDING
    ok(h)

    mf.unmap()  # the frame's last reference: freed, and offlined
    assert status(hv, frame) == OFFLINED and frame in h.heap.offlined_list
    info = hv.domain_info(dom)
    assert info is not None and info.dying and info.tot_pages == 1
    ok(h)
    mb.unmap()  # the domain's last page: put_domain -> domain_destroy
    assert hv.domain_info(dom) is None and dom not in h.domains
    assert status(hv, buddy) == 0 and h.ft.owner(buddy) is None
    assert [d.domid for d in hv.domain_list()] == [0]
    # neither free found its buddy free: no split, so Xen 4.17's misaligned one cannot happen
    # (the lab test, tests_xen/test_hang_guard.py, keeps the pair mapped for that reason)
    assert h.heap.misaligned == 0
    ok(h)


def test_a_lone_pending_frame_freed_among_free_neighbours_misaligns_4_17():
    """The contrast: a dying domain's pending frame whose neighbours were freed with the
    domain is split out of a merged free buddy when its last reference goes -- Xen 4.17's
    ``reserve_offlined_page`` then misaligns the pieces (no toolstack can guard Xen's own
    free path; quirks.reserve_misaligned)."""
    h, g, hv = linux_host()
    dom = g.domid
    frame, _ = buddy_pair(h, g)
    m = hv.map_foreign(dom, [frame], False)
    assert hv.destroy(dom) == 0
    assert mem_offline(hv, [frame]).outcomes[0].reason == Reason.DYING
    m.unmap()
    assert status(hv, frame) == OFFLINED and hv.domain_info(dom) is None
    assert h.heap.misaligned > 0


def test_a_backend_that_keeps_its_grant_map_keeps_the_domain():
    """A ring granted to dom0's backend stays mapped when the backend does not let go (a stuck
    blkback): the domain is a zombie until the backend unmaps the grant; the ring, marked
    offline meanwhile, is offlined then."""
    h, g, hv = linux_host()
    dom = g.domid
    ring = g.rings[0]
    mfn = g.mfn(ring["pfn"])
    h.destroy_domain(dom, backends_unmap=False)
    info = hv.domain_info(dom)
    assert info.dying and info.tot_pages == len(g.rings)  # the rings, nothing else
    rc, st_ = hv.page_offline_op(S.sysctl_page_offline, mfn, mfn)
    assert rc == 0 and int(st_[0]) == S.PG_OFFLINE_PENDING | S.PG_OFFLINE_OWNED | (dom << S.PG_OFFLINE_OWNER_SHIFT)
    ok(h)
    for r in g.rings:
        assert h.hypercalls(0).grant_unmap(r["handle"]) == 0
    assert status(hv, mfn) == OFFLINED
    assert hv.domain_info(dom) is None
    ok(h)


def test_destroy_with_nothing_held_is_immediate():
    """xl destroy of a guest nobody else maps: the backends' grant maps go with its devices,
    xenstored and xenconsoled let go of its rings, so the domain goes at once."""
    h, g, hv = linux_host()
    dom = g.domid
    assert hv.destroy(dom) == 0
    assert hv.domain_info(dom) is None and h.owned_frames(dom).size == 0
    ok(h)


def test_hvm_guest_mapped_by_dom0_lingers():
    h, hv = small_host()
    hvm = next(d.domid for d in h.guest_domains() if d.hvm)
    m = hv.map_foreign(hvm, [0x10, 0x11], True)  # gfns of a translated guest
    assert not isinstance(m, int)
    mfns = [int(h.p2m[hvm][g]) for g in (0x10, 0x11)]
    assert hv.destroy(hvm) == 0
    info = hv.domain_info(hvm)
    assert info.dying and info.hvm and info.tot_pages == 2
    assert sorted(h.owned_frames(hvm).tolist()) == sorted(mfns)
    ok(h)
    m.unmap()
    assert hv.domain_info(hvm) is None
    ok(h)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_zombie_frames_go_as_their_references_go(data):
    """Any frames mapped by dom0 when the guest is destroyed, any of them marked offline by
    mem-offline while it is dying, unmapped in any order: the domain lives exactly as long as
    one of them is mapped, with tot_pages = the frames still mapped; each marked frame is
    offlined when its mapping goes, the others freed; the host stays consistent throughout
    (on the fixed buddy split: 4.17's misaligns, as the test above shows)."""
    h, g, hv = linux_host(Quirks(reserve_misaligned=False))
    dom = g.domid
    data_pfns = g.pfns_of(L.DATA)
    picks = data.draw(st.lists(st.integers(0, data_pfns.size - 1), min_size=1, max_size=6, unique=True))
    frames = [g.mfn(int(data_pfns[i])) for i in picks]
    maps = {m: hv.map_foreign(dom, [m], data.draw(st.booleans())) for m in frames}
    assert hv.destroy(dom) == 0
    assert hv.domain_info(dom).tot_pages == len(frames)
    marked = data.draw(st.lists(st.sampled_from(frames), unique=True))
    if marked:
        r = mem_offline(hv, marked)
        assert {(o.kind, o.reason) for o in r.outcomes} == {(Kind.PENDING, Reason.DYING)}
        assert not [w for w in hv.writes if "control/shutdown" in w[0]]
    ok(h)
    order = data.draw(st.permutations(frames))
    for i, m in enumerate(order):
        maps[m].unmap()
        left = len(order) - i - 1
        info = hv.domain_info(dom)
        if left:
            assert info is not None and info.dying and info.tot_pages == left
        else:
            assert info is None and dom not in h.domains
        assert status(hv, m) == (OFFLINED if m in marked else 0)
        assert h.ft.owner(m) is None
        ok(h)
    assert X.DOMID_FIRST_RESERVED > dom


def test_bare_destroydomain_keeps_libxl_nodes_and_the_name():
    """``XEN_DOMCTL_destroydomain`` alone (``xc_domain_destroy``, what the lab's test calls)
    leaves libxl's xenstore nodes: the dying domain keeps its name in ``xl list`` (seen on the
    lab: "memtest-dying", state "-----d"); ``xl destroy`` removes them ("(null)")."""
    h, g, hv = linux_host()
    dom = g.domid
    frame, _ = buddy_pair(h, g)
    m = hv.map_foreign(dom, [frame], False)
    h.domain_kill(dom)
    info = hv.domain_info(dom)
    assert info.dying and info.name == "lin" and info.state_letters() == "-----d"
    h.destroy_domain(dom)  # xl destroy of the zombie: its xenstore nodes go
    assert hv.domain_info(dom).name == ""
    m.unmap()
    assert hv.domain_info(dom) is None
    ok(h)


def test_cli_lists_the_dying_domain_and_leaves_its_frame_pending(cli_state, xenpage_cli):
    """The saved default host with domu1 destroyed (``xl destroy``) while a dom0 process
    still maps one of its frames: ``xenpage list`` shows it as xl does, ``mem-offline`` of the
    frame answers pending with the reason, exit 1, and asks nothing of the domain."""
    from xenpage.backends.sim import host_path
    h = Host.load(host_path(cli_state))
    g = h.guests[1]
    m = g.mfn(int(g.pfns_of(L.DATA)[7]))
    rc, _ = h.hypercalls(0).foreign_map(1, [m], False)
    assert rc == 0
    h.destroy_domain(1)
    h.save(host_path(cli_state))
    r = xenpage_cli(cli_state, "list")
    row = next(line.split() for line in r.stdout.splitlines()[1:] if line.split()[1] == "1")
    assert row[0] == "(null)" and row[-1] == "-----d", r.stdout
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}")
    assert r.returncode == 1
    assert r.stdout.splitlines() == [f"Prepare to offline MEMORY mfn {m:x}"]
    assert r.stderr.splitlines() == [
        "DOM1: No suspend port, try live migration", f"Failed to suspend guest 1 for mfn {m:x}",
        f"xenpage: mfn {m:x}: owner d1 is dying; offlined when its last reference goes"]
    r = xenpage_cli(cli_state, "mem-status", f"{m:x}")
    assert r.stdout.splitlines()[-1].startswith("Memory Status 8: [ PAGE_OFFLINE_PENDING")
    h = Host.load(host_path(cli_state))
    assert h.domains[1].dying and invariants.check(h) == []
