"""The Linux 6.1-like PV guest (xenpage.guests.linux_pv) on the simulated Xen 4.17 host: it
boots through hypercalls only, its page tables have the shape Linux 6.1 gives a PV guest of
that size, its workload keeps every page's content verifiable, it suspends through xenstore
(``control/shutdown`` = ``suspend``, xen-semantics.md 6.3) and carries on after a fast
resume, its destruction offlines its pending frames, and a saved host reloads with all of it.

Page-table shape of Linux 6.1 x86-64 PV (arch/x86/xen/mmu_pv.c), N pages of RAM, P = N/512
P2M pages, K kernel-image pages, G = 4 grant frames, 3 processes with one user L1 each:

===== ========================================================== ===== ===== =======
level tables                                                      64MiB 1GiB  4GiB
===== ========================================================== ===== ===== =======
L4    init_top_pgt + a kernel and a user pgd per process (pinned)   7     7     7
L3    direct map (level3_ident_pgt), level3_kernel_pgt, vmalloc,    7     7     7
      level3_user_vsyscall, one per process
L2    direct map N/2^18, level2_kernel_pgt, level2_fixmap_pgt,      7     7    10
      vmalloc, one per process
L1    direct map N/512 and vmalloc (P+1+G)/512, pinned one by one  36   517  2056
      (xen_alloc_pte_init); user L1s, pinned (xen_pgd_pin)
L1    kernel image K/512 (from the domain builder) and              4    10    10
      level1_fixmap_pgt x2: not pinned
===== ========================================================== ===== ===== =======

The test counts them as dom0 sees them, with getpageframeinfo3 over the guest's P2M.
"""

from __future__ import annotations

import numpy as np
import pytest

from xenpage.backends.sim import SimHypervisor
from xenpage.guests import linux_pv as L
from xenpage.hypervisor import invariants, sysctl
from xenpage.hypervisor.host import Host, HostConfig

NOTAB, L1TAB, L2TAB, L3TAB, L4TAB = 0x0, 0x10000000, 0x20000000, 0x30000000, 0x40000000
LPINTAB = 0x80000000
XEN_DOMINF_shutdown, XEN_DOMINF_running = 0x4, 0x20
SHUTDOWN_suspend, SHUTDOWN_poweroff = 2, 0
EINVAL = -22
P, RW, US = 0x1, 0x2, 0x4


def ok(h):
    assert invariants.check(h) == []


def boot(mem_mib=256, guest_mib=32, seed=3, dom0_mib=64):
    h = Host.boot(HostConfig(mem_bytes=mem_mib << 20), dom0_pages=dom0_mib * 256)
    d = h.create_domain("lin", guest_mib * 256)
    g = L.LinuxPV.boot(h, d.domid, seed=seed)
    return h, g


@pytest.fixture
def lin():
    h, g = boot()
    hv = SimHypervisor(h)
    hv.set_vcpu_affinity(0, 0, [1])  # offline from pCPU 1 (the PoD-lock hang needs pCPU 0)
    return h, g, hv


def suspend(hv, domid):
    assert hv.xs_write(f"/local/domain/{domid}/control/shutdown", "suspend") == 0
    hv.wait(0)


def resume(hv, domid):
    assert hv.resume(domid) == 0
    hv.wait(0)


# -- boot -----------------------------------------------------------------------------------------

def test_boot_is_clean(lin):
    h, g, hv = lin
    ok(h)
    assert g.verify() == []
    d = h.domains[g.domid]
    m2 = g.p2m()
    assert d.guest_table[0] == m2[g.procs[0].kpgd]
    assert d.guest_table_user[0] == m2[g.procs[0].upgd]
    assert d.tot_pages == 32 * 256
    # the builder's P2M was handed over to the guest's own frames
    assert g.domid not in h.p2m
    assert np.array_equal(h.pv_p2m(g.domid).astype(np.int64), m2)
    # xenstored and xenconsoled map the rings, dom0's backends the grant rings
    assert len(g.daemon_maps) == 2 and len(g.rings) == 2
    assert all(m.mapper == 0 and m.granter == g.domid for m in h.grants.maptrack.values())
    # vcpu_info and the FIFO event-channel pages are mapped by Xen itself
    xm = {m.what: m.mfns[0] for m in h.foreign.maps.values() if m.mapper == 0x7FF2}
    assert xm == {k: int(m2[pf]) for k, pf in g.tables["xen_mapped"].items()}
    assert set(xm) == {"vcpu_info", "evtchn_fifo_control", "evtchn_fifo_array"}


def _shape(h, g):
    rc, types = h.hypercalls(0).getpageframeinfo3(g.domid, g.p2m())
    assert rc == 0
    t = types.astype(np.int64)
    count = {}
    for lvl, name in ((L1TAB, "L1"), (L2TAB, "L2"), (L3TAB, "L3"), (L4TAB, "L4")):
        count[name] = int((t == lvl).sum())
        count[name + "+pin"] = int((t == (lvl | LPINTAB)).sum())
    return count


@pytest.mark.parametrize("guest_mib,mem_mib,expect", [
    (64, 256, {"L4": 0, "L4+pin": 7, "L3": 7, "L3+pin": 0, "L2": 7, "L2+pin": 0,
               "L1": 4, "L1+pin": 36}),
    (1024, 1280, {"L4": 0, "L4+pin": 7, "L3": 7, "L3+pin": 0, "L2": 7, "L2+pin": 0,
                  "L1": 10, "L1+pin": 517}),
])
def test_page_table_shape_is_linux_6_1_pv(guest_mib, mem_mib, expect):
    h, g = boot(mem_mib, guest_mib)
    assert _shape(h, g) == expect
    n = guest_mib * 256
    p = -(-n // 512)
    # the same numbers from the formulas of the module docstring
    assert expect["L1+pin"] == -(-n // 512) + -(-(p + 1 + 4) // 512) + 3
    assert expect["L1"] == -(-max(8, min(4096, n // 16)) // 512) + 2
    assert expect["L2"] == -(-n // (512 * 512)) + 3 + 3
    ok(h)


def test_virtual_layout(lin):
    """Walk the address space as the MMU would: direct map, kernel image, vmalloc P2M,
    fixmap shared_info, user pgds with the vsyscall L3."""
    h, g, hv = lin
    m2 = g.p2m()
    root = int(m2[g.procs[0].kpgd])
    for pf in (0, 5, len(m2) - 1, g.tables["direct_l1"][0]):
        mfn, e = g.walk(root, g.direct_va(pf))
        assert mfn == m2[pf]
        is_table = g.role[pf] in L.TABLE_ROLES
        assert bool(e & RW) == (not is_table)
    k0 = g.tables["ktext"][0]
    mfn, e = g.walk(root, 0xFFFFFFFF80000000)
    assert mfn == m2[k0] and not e & RW
    for i, pf in enumerate(g.tables["p2m"]):
        mfn, e = g.walk(root, 0xFFFFC90000000000 + i * 4096)
        assert mfn == m2[pf]
    # the grant frames follow the P2M in the vmalloc area, read-write
    gf = h.grants.frames[g.domid]
    for i, fr in enumerate(gf):
        mfn, e = g.walk(root, 0xFFFFC90000000000 + (g.tables["gnt_vslot"] + i) * 4096)
        assert mfn == fr and e & RW
    # fixmap: level3_kernel_pgt[511] -> level2_fixmap_pgt[506] -> level1_fixmap_pgt[0]
    va = (0xFFFF << 48) | (511 << 39) | (511 << 30) | (506 << 21) | (L.FIX_SHARED_INFO << 12)
    mfn, e = g.walk(root, va)
    assert mfn == h.domains[g.domid].xenheap_pages[0] and e & RW
    # every kernel pgd shares the same kernel L3s; every user pgd the vsyscall L3
    for pr in g.procs:
        k = h.ft.read_page(int(m2[pr.kpgd]))
        s = h.ft.read_page(int(m2[g.tables["swapper"]]))
        for slot in (L.DIRECT_L4, L.VMALLOC_L4, L.KERNEL_L4):
            assert (int(k[slot]) >> 12) & ((1 << 40) - 1) == (int(s[slot]) >> 12) & ((1 << 40) - 1)
        u = h.ft.read_page(int(m2[pr.upgd]))
        assert (int(u[L.VSYSCALL_L4]) >> 12) & ((1 << 40) - 1) == m2[g.tables["vsyscall_l3"]]
        assert int(u[L.DIRECT_L4]) == 0  # no kernel mappings in the user pgd


# -- workload --------------------------------------------------------------------------------------

def test_workload_keeps_content_verified(lin):
    h, g, hv = lin
    before = g.expect.copy()
    for _ in range(10):
        g.step(50)
        assert g.verify() == []
        ok(h)
    assert g.steps == 500 and not g.faults
    assert (g.expect != before).sum() > 50


def test_running_guest_notices_a_changed_page(lin):
    """The workload re-reads its memory window by window: a page changed behind its back
    becomes a fault, reported by verify()."""
    h, g, hv = lin
    pf = int(np.flatnonzero(g.expect)[100])
    h.ft.content[g.mfn(pf)] ^= np.uint64(1)
    assert any(f"pfn {pf:#x}" in p for p in g.verify())
    for _ in range(2000):
        g.step(1)
        if g.faults:
            break
    assert g.faults and f"pfn {pf:#x}" in g.faults[0]


def test_workload_maps_and_unmaps_user_pages(lin):
    h, g, hv = lin
    free0 = len(g.free)
    for _ in range(40):
        g._map_or_unmap()
        ok(h)
    assert len(g.free) != free0 or any(g.role[pf] == L.FREE for pr in g.procs for pf, _ in pr.pages.values())
    assert g.verify() == []


# -- suspend / resume ------------------------------------------------------------------------------

def test_suspend_through_xenstore_and_fast_resume(lin):
    h, g, hv = lin
    g.step(50)
    suspend(hv, g.domid)
    info = hv.domain_info(g.domid)
    assert info.flags & XEN_DOMINF_shutdown and not info.flags & XEN_DOMINF_running
    assert (info.flags >> 16) & 0xFF == SHUTDOWN_suspend == info.shutdown_reason
    assert hv.xs_read(f"/local/domain/{g.domid}/control/shutdown") == ""
    assert g.suspended and g.suspends == 1
    # a suspended guest does nothing
    steps, expect = g.steps, g.expect.copy()
    g.step(100)
    assert g.steps == steps and np.array_equal(g.expect, expect)
    ok(h)
    resume(hv, g.domid)
    info = hv.domain_info(g.domid)
    assert not info.flags & XEN_DOMINF_shutdown and info.flags & XEN_DOMINF_running
    assert not g.suspended and g.resumes == 1
    assert "cancelled=True" in g.log[-1] and "ok" in g.log[-1]
    g.step(100)
    assert g.steps == steps + 100 and g.verify() == []
    ok(h)
    assert hv.resume(g.domid) == EINVAL  # not suspended any more


def test_poweroff_through_xenstore(lin):
    h, g, hv = lin
    hv.xs_write(f"/local/domain/{g.domid}/control/shutdown", "poweroff")
    hv.wait(0)
    info = hv.domain_info(g.domid)
    assert info.shutdown and info.shutdown_reason == SHUTDOWN_poweroff


# -- destruction -------------------------------------------------------------------------------------

def test_destroying_a_guest_offlines_its_pending_frames(lin):
    h, g, hv = lin
    picks = [g.kernel_only_pages()[3], g.tables["direct_l1"][2], g.tables["p2m"][0],
             g.procs[1].ul1[0], g.rings[0]["pfn"]]
    mfns = [g.mfn(pf) for pf in picks]
    for m in mfns:
        rc, st = sysctl.page_offline_op(h, 0, 1, m, m, pcpu=1)
        assert (rc, int(st[0])) == (0, 0x1004 | (g.domid << 16))
    ok(h)
    free0 = h.heap.free_pages
    assert hv.destroy(g.domid) == 0
    for m in mfns:
        rc, st = sysctl.page_offline_op(h, 0, 3, m, m, pcpu=1)
        assert (rc, int(st[0])) == (0, 0x2)
        assert m in h.heap.offlined_list and h.ft.owner(m) is None
    # every other frame of the guest (and its shared_info and grant frames) is free again
    assert h.heap.free_pages == free0 + 32 * 256 - len(mfns) + 1 + 4
    assert g.domid not in h.guests and hv.domain_info(g.domid) is None
    ok(h)


# -- exchange (the toolstack on this guest) -------------------------------------------------------

def test_exchanged_frames_keep_the_guest_working(lin):
    from xenpage.toolstack.exchange import exchange_pages
    from xenpage.toolstack.outcomes import Kind
    h, g, hv = lin
    picks = [g.kernel_only_pages()[9], g.user_pages("shared")[1], g.procs[2].ul1[0],
             g.tables["direct_l1"][4], g.tables["p2m"][1], g.tables["xen_mapped"]["vcpu_info"]]
    mfns = [g.mfn(pf) for pf in picks]
    for m in mfns:
        sysctl.page_offline_op(h, 0, 1, m, m, pcpu=1)
    suspend(hv, g.domid)
    outs = exchange_pages(hv, g.domid, mfns)
    assert [o.kind for o in outs] == [Kind.EXCHANGED] * 5 + [Kind.ROLLED_BACK]
    resume(hv, g.domid)
    for m in mfns[:5]:
        assert h.ft.state(m) == 2  # offlined
    assert h.ft.state(mfns[5]) == 1  # Xen's own mapping keeps vcpu_info pending
    g.step(200)
    assert g.verify() == []
    ok(h)


# -- persistence ----------------------------------------------------------------------------------

def test_save_and_load_keep_everything(lin, tmp_path):
    h, g, hv = lin
    g.step(120)
    m = g.mfn(g.kernel_only_pages()[2])
    sysctl.page_offline_op(h, 0, 1, m, m, pcpu=1)
    h.save(tmp_path / "host")
    h2 = Host.load(tmp_path / "host")
    ok(h2)
    g2 = h2.guests[g.domid]
    assert g2 is not g and g2.verify() == []
    assert g2.steps == g.steps and len(g2.procs) == len(g.procs)
    assert np.array_equal(h2.ft.count_info.copy(), h.ft.count_info.copy())
    assert np.array_equal(h2.ft.type_info, h.ft.type_info)
    assert h2.ft.state(m) == 1  # still offline-pending
    # both copies continue identically (the guest's random state was saved too)
    g.step(150)
    g2.step(150)
    assert np.array_equal(g.expect, g2.expect)
    assert np.array_equal(h.ft.content, h2.ft.content)
    assert g2.verify() == [] and not g2.faults
    ok(h2)
    # and the reloaded guest still suspends and resumes
    hv2 = SimHypervisor(h2)
    suspend(hv2, g.domid)
    assert hv2.domain_info(g.domid).shutdown_reason == SHUTDOWN_suspend
    resume(hv2, g.domid)
    g2.step(20)
    assert g2.verify() == []
    ok(h2)
