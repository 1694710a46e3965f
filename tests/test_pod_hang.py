"""Xen 4.17's PoD-lock hang (xen-lab.md, "A hang in Xen 4.17's page offlining") and the
workaround: ``offline_page`` of a frame owned by a PV domain takes that domain's
never-initialised PoD lock; taken first on physical CPU 0 the lock is corrupted and the next
owned-frame offline of that domain, or its destruction, hangs the host (the simulator raises
``HostHang``).  Taken first on another pCPU the lock stays sane.  xenpage pins dom0's vCPUs off
pCPU 0 around every offline and restores their affinity; a single-pCPU host is refused unless
forced.
"""

from __future__ import annotations

import pytest
from simworld import occupy_freed_fixed_frames

from xenpage.backends.sim import SimHypervisor, host_path
from xenpage.hypervisor import sysctl
from xenpage.hypervisor.host import Host
from xenpage.hypervisor.quirks import HostHang, Quirks
from xenpage.toolstack import hptool
from xenpage.toolstack.offline import mem_offline
from xenpage.toolstack.outcomes import Kind
from xenpage.toolstack.pcpu import SinglePcpuHost, allow_single_pcpu, off_pcpu0


def frames(host, domid, n, skip=0):
    """``n`` ordinary (domheap, unpinned data) frames of a domain."""
    d = host.domains[domid]
    out = []
    for m in host.owned_frames(domid).tolist()[len(host.owned_frames(domid)) // 3:]:
        if m in d.xenheap_pages:
            continue
        out.append(int(m))
        if len(out) == n + skip:
            break
    return out[skip:]


def raw_offline(hv, m):
    """``xc_mark_page_offline`` straight from dom0, wherever its vCPU happens to run."""
    rc, st = hv.page_offline_op(1, m, m)
    return rc, int(st[0])


@pytest.fixture
def pv_domid(host):
    return next(d.domid for d in host.guest_domains() if d.domid and not d.hvm)


def test_dom0_may_run_on_pcpu0_by_default(hv, host):
    assert host.nr_pcpus == 2
    assert hv.vcpu_affinity(0, 0) == [0, 1]
    assert hv._calling_pcpu() == 0


# -- the defect ------------------------------------------------------------------------------------

def test_second_owned_offline_from_pcpu0_hangs(hv, host, pv_domid):
    a, b = frames(host, pv_domid, 2)
    assert raw_offline(hv, a) == (0, 0x1004 | pv_domid << 16)
    assert host.domains[pv_domid].pod_lock == "corrupt"
    before = host.ft.count_info.copy()
    with pytest.raises(HostHang):
        raw_offline(hv, b)
    # a hang leaves nothing done
    assert (host.ft.count_info.copy() == before).all()
    with pytest.raises(HostHang):
        raw_offline(hv, a)  # even the same frame again


def test_destroying_after_one_owned_offline_from_pcpu0_hangs(hv, host, pv_domid):
    raw_offline(hv, frames(host, pv_domid, 1)[0])
    with pytest.raises(HostHang):
        host.destroy_domain(pv_domid)
    assert pv_domid in host.domains


def test_two_frames_of_one_domain_in_one_call_from_pcpu0_hang(hv, host, pv_domid):
    f = host.owned_frames(pv_domid)
    s = int(f[len(f) // 2])
    assert host.ft.owner(s + 1) == pv_domid
    with pytest.raises(HostHang):
        hv.page_offline_op(1, s, s + 1)


def test_dom0_is_a_pv_domain_too(hv, host):
    a, b = frames(host, 0, 2)
    raw_offline(hv, a)
    with pytest.raises(HostHang):
        raw_offline(hv, b)


def test_frames_without_a_pv_owner_never_take_the_lock(hv, host):
    """Free, Xen-heap, anonymous and DOMID_IO frames have no PV owner; HVM domains have an
    initialised PoD lock: any number of offlines from pCPU 0 is fine."""
    head, order = max(host.heap.chunks(), key=lambda c: c[1])
    hvm = next(d.domid for d in host.guest_domains() if d.hvm)
    todo = [head + 1, head + 2, host.xenheap_internal[0], host.xenheap_internal[1],
            host.anonymous[0], host.anonymous[1], 0x10, 0x11] + frames(host, hvm, 3)
    for m in todo:
        assert raw_offline(hv, m)[0] == 0
    assert {d.pod_lock for d in host.guest_domains() if not d.hvm} == {"pristine"}


def test_lock_first_taken_off_pcpu0_stays_sane(hv, host, pv_domid):
    assert hv.set_vcpu_affinity(0, 0, [1]) == 0
    fs = frames(host, pv_domid, 5)
    for m in fs:
        assert raw_offline(hv, m)[0] == 0
    assert host.domains[pv_domid].pod_lock == "sane"
    # ...and then even pCPU 0 is safe
    assert hv.set_vcpu_affinity(0, 0, [0, 1]) == 0
    assert raw_offline(hv, frames(host, pv_domid, 1, skip=5)[0])[0] == 0
    host.destroy_domain(pv_domid)
    assert all(host.ft.state(m) == 2 for m in fs)


def test_machine_checks_run_off_pcpu0(host, pv_domid):
    for m in frames(host, pv_domid, 3):
        assert sysctl.machine_check_offline(host, m)[0] == 0
    assert host.domains[pv_domid].pod_lock == "sane"


def test_the_model_can_be_switched_off(small_host):
    h = small_host(quirks=Quirks(pod_lock_hang=False))
    occupy_freed_fixed_frames(h)
    d = h.create_domain("pv", 64)
    hv = SimHypervisor(h)
    for m in frames(h, d.domid, 3):
        assert raw_offline(hv, m)[0] == 0
    h.destroy_domain(d.domid)


# -- the workaround ------------------------------------------------------------------------------------

def test_hptool_path_never_hangs_across_cycles_and_destroy(hv, host, pv_domid):
    fs = frames(host, pv_domid, 4)
    d0 = frames(host, 0, 2)
    before = [list(a) for a in host.domains[0].affinity]
    for cycle in range(6):
        for m in fs + d0:
            r = hptool.mem_offline(hv, m)
            assert r.exit_code == 1 and "No suspend port" in r.stderr
            assert host.domains[0].affinity == before
        for m in fs + d0:
            assert hptool.mem_online(hv, m).exit_code == 0
    for m in fs[:2]:
        hptool.mem_offline(hv, m)
    assert host.domains[pv_domid].pod_lock == "sane" and host.domains[0].pod_lock == "sane"
    assert hv.destroy(pv_domid) == 0
    # lab: the domU's pending frames read "Memory Status 2: [ PAGE_OFFLINED ]" after the destroy
    for m in fs[:2]:
        assert hptool.mem_status(hv, m).stdout.endswith("Memory Status 2: [ PAGE_OFFLINED ]\n")


def test_xenpage_mem_offline_never_hangs(hv, host, pv_domid):
    guest = host.guests[pv_domid]
    data = [guest.mfn(p) for p in guest.kernel_only_pages()[10:14]]
    d0 = frames(host, 0, 2)
    for _ in range(3):
        res = mem_offline(hv, d0)
        assert [o.kind for o in res.outcomes] == [Kind.PENDING] * 2
        for m in d0:
            hptool.mem_online(hv, m)
    res = mem_offline(hv, data[:2])
    assert [o.kind for o in res.outcomes] == [Kind.EXCHANGED] * 2
    res = mem_offline(hv, data[2:])
    assert [o.kind for o in res.outcomes] == [Kind.EXCHANGED] * 2
    assert hv.vcpu_affinity(0, 0) == [0, 1]
    assert hv.destroy(pv_domid) == 0


def test_affinity_restored_even_when_the_offline_fails(hv, host, pv_domid):
    a, b = frames(host, pv_domid, 2)
    raw_offline(hv, a)  # corrupts the lock from pCPU 0 (a stock tool was here before)
    with pytest.raises(HostHang):
        hptool.mem_offline(hv, b)
    assert hv.vcpu_affinity(0, 0) == [0, 1]


def test_every_dom0_vcpu_is_pinned(small_host):
    h = small_host(nr_pcpus=4)
    # a dom0 with three vCPUs, one already kept off pCPU 0
    d0 = h.domains[0]
    d0.vcpus = 3
    d0.affinity = [[0, 1, 2, 3], [2], [0, 3]]
    hv = SimHypervisor(h)
    with off_pcpu0(hv) as target:
        assert target == [1, 2, 3]
        assert d0.affinity == [[1, 2, 3], [2], [1, 2, 3]]
    assert d0.affinity == [[0, 1, 2, 3], [2], [0, 3]]


# -- a single physical CPU ----------------------------------------------------------------------------

def test_single_pcpu_host_is_refused(small_host):
    h = small_host(nr_pcpus=1)
    occupy_freed_fixed_frames(h)
    d = h.create_domain("pv", 64)
    hv = SimHypervisor(h)
    m = frames(h, d.domid, 1)[0]
    before = h.ft.count_info.copy()
    with pytest.raises(SinglePcpuHost, match="single physical CPU"):
        hptool.mem_offline(hv, m)
    with pytest.raises(SinglePcpuHost):
        mem_offline(hv, [m])
    assert (h.ft.count_info.copy() == before).all()
    # queries and onlines do not need the workaround
    assert hptool.mem_status(hv, m).exit_code == 0
    assert hptool.mem_online(hv, m).exit_code == 0


def test_single_pcpu_host_when_forced(small_host):
    h = small_host(nr_pcpus=1)
    occupy_freed_fixed_frames(h)
    d = h.create_domain("pv", 64)
    hv = SimHypervisor(h)
    a, b = frames(h, d.domid, 2)
    with allow_single_pcpu():
        assert hptool.mem_offline(hv, a).exit_code == 1  # pending: no suspend port
        # ...and this is why it is refused by default
        with pytest.raises(HostHang):
            hptool.mem_offline(hv, b)
    with pytest.raises(SinglePcpuHost):
        hptool.mem_offline(hv, b)


def test_single_pcpu_host_through_the_command(tmp_path, xenpage_cli, small_host):
    h = small_host(nr_pcpus=1, mem_mib=256, dom0_pages=8192)
    sd = tmp_path / "one-cpu"
    h.save(host_path(sd))
    before = (host_path(sd) / "host.json").read_bytes()
    head, order = max(h.heap.chunks(), key=lambda c: c[1])
    m = head + 3
    r = xenpage_cli(sd, "mem-offline", f"{m:x}")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("xenpage: this host has a single physical CPU") and "--force" in r.stderr
    assert (host_path(sd) / "host.json").read_bytes() == before
    r = xenpage_cli(sd, "mem-offline", f"{m:x}", "--force")
    assert (r.stdout, r.returncode) == (
        f"Prepare to offline MEMORY mfn {m:x}\n"
        f"Memory mfn {m:x} offlined successfully, current state is [PG_OFFLINE_OFFLINED]\n", 0)
    assert Host.load(host_path(sd)).ft.state(m) == 2
