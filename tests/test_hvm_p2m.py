"""The simulated HVM p2m (EPT-like): the builder's superpages, splits from the HAP pool,
log-dirty (XEN_DOMCTL_shadow_op), guest accesses through the p2m, the vMCE path, populate for
a restore, persistence -- with the invariant checker clean after every operation."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from hvmtools import bare_host, hvm_host
from xenpage.abi import errno as E
from xenpage.abi import hvm as H
from xenpage.abi import sysctl as S
from xenpage.abi.xen import INVALID_MFN
from xenpage.hypervisor import hvm as HV
from xenpage.hypervisor import invariants, paging
from xenpage.hypervisor.host import Host

CLEAN, PEEK = H.XEN_DOMCTL_SHADOW_OP_CLEAN, H.XEN_DOMCTL_SHADOW_OP_PEEK
ENABLE, OFF = H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY, H.XEN_DOMCTL_SHADOW_OP_OFF


def ok(h):
    assert invariants.check(h) == []


def test_builder_maps_2m_superpages_and_the_tables_follow():
    h, hv, g = hvm_host(guest_mib=8)
    p = h.ept[1]
    assert p.size == 2048 and set(p.order.tolist()) == {9}
    assert (p.type == H.p2m_ram_rw).all()
    # four 2 MiB leaves: a level-2 table under a level-3 table under the root, no level-1
    assert p.tables() == {4: 1, 3: 1, 2: 1, 1: 0}
    walk = p.walk(700)
    assert [(lvl, kind) for lvl, kind, _ in walk] == [(4, "table"), (3, "table"), (2, "leaf")]
    e = walk[-1][2]
    assert e & H.EPTE_SP and e & H.EPTE_W
    assert (e & H.EPTE_MFN_MASK) >> 12 == int(p.mfn[512]) and int(p.mfn[512]) % 512 == 0
    assert h.p2m[1] is p.mfn
    assert g.verify() == []
    ok(h)


def test_builder_maps_1g_superpages_for_a_big_guest():
    h = Host.boot(__import__("xenpage.hypervisor.host", fromlist=["HostConfig"]).HostConfig(
        mem_bytes=2560 << 20), dom0_pages=8192)
    d = h.create_domain("big", 262144 + 1024, hvm=True)  # 1 GiB + 4 MiB
    p = h.ept[d.domid]
    assert (p.order[:262144] == 18).all() and (p.order[262144:] == 9).all()
    assert p.walk(5)[-1][0] == 3 and p.walk(5)[-1][2] & H.EPTE_SP
    assert p.tables() == {4: 1, 3: 1, 2: 1, 1: 0}
    # retiring one 4 KiB frame needs two splits: 1 GiB -> 2 MiB leaves, one 2 MiB -> 4 KiB
    used = p.pool_used()
    assert p.set_entries(np.array([100]), [int(p.mfn[100])], H.p2m_ram_rw) == 0
    assert p.stats["split_1g"] == 1 and p.stats["split_2m"] == 1
    assert p.pool_used() == used + 2
    assert (p.order[:512] == 0).all() and (p.order[512:262144] == 9).all()
    assert p.walk(100)[-1][0] == 1 and not p.walk(100)[-1][2] & H.EPTE_SP
    ok(h)


def test_split_is_all_or_nothing_when_the_hap_pool_is_exhausted():
    h, hv, g = hvm_host(guest_mib=8)
    p = h.ept[1]
    p.pool_pages = p.pool_used() + 1
    before = p.order.copy()
    assert p.split(np.array([3, 600])) == -E.ENOMEM   # two 2 MiB blocks, room for one
    assert np.array_equal(p.order, before)
    assert p.split(np.array([3, 7])) == 0               # one block
    assert (p.order[:512] == 0).all()
    ok(h)


def test_log_dirty_enable_write_fault_clean_peek_off():
    h, hv, g = hvm_host(guest_mib=8)
    p = h.ept[1]
    rc, _, _ = paging.shadow_control(h, 0, 1, ENABLE)
    assert rc == 0 and (p.type == H.p2m_ram_logdirty).all()
    assert not p.walk(10)[-1][2] & H.EPTE_W              # write-protected in the EPT
    assert paging.shadow_control(h, 0, 1, ENABLE)[0] == -E.EINVAL
    ok(h)
    HV.guest_write(h, 1, [10, 11, 10, 1500], [1, 2, 3, 4])
    assert p.dirty_count == 3 and p.fault_count == 3
    assert (p.type[[10, 11, 1500]] == H.p2m_ram_rw).all()
    assert (p.order[:512] == 0).all() and (p.order[1024:1536] == 0).all()  # shattered
    ok(h)
    rc, bm, stt = paging.shadow_control(h, 0, 1, PEEK, 2048)
    assert rc == 0 and np.flatnonzero(bm).tolist() == [10, 11, 1500] and stt.dirty_count == 3
    rc, bm, stt = paging.shadow_control(h, 0, 1, CLEAN, 2048)
    assert np.flatnonzero(bm).tolist() == [10, 11, 1500] and (stt.fault_count, stt.dirty_count) == (3, 3)
    assert (p.type == H.p2m_ram_logdirty).all() and not p.dirty.any()
    rc, bm, stt = paging.shadow_control(h, 0, 1, CLEAN, 2048)
    assert not bm.any() and stt.dirty_count == 0
    ok(h)
    assert paging.shadow_control(h, 0, 1, OFF)[0] == 0
    assert (p.type == H.p2m_ram_rw).all()
    assert paging.shadow_control(h, 0, 1, CLEAN, 2048)[0] == -E.EINVAL
    ok(h)


def test_shadow_op_errors():
    h, hv, g = hvm_host(guest_mib=4)
    assert paging.shadow_control(h, 1, 1, ENABLE)[0] == -E.EPERM      # not the control domain
    assert paging.shadow_control(h, 0, 77, ENABLE)[0] == -E.ESRCH
    assert paging.shadow_control(h, 0, 1, 99)[0] == -E.EINVAL


def test_pv_log_dirty_marks_pfns_the_guest_writes():
    """A PV guest's bitmap is indexed by pfn (paging_mark_dirty reads the M2P), marked by
    the first write after a CLEAN (the shadow write fault); frames that are not the guest's,
    or have no valid M2P entry, are never marked."""
    h, hv, g = hvm_host(guest_mib=4)
    pv = h.create_domain("pv", 256).domid
    m = h.p2m[pv].astype(np.int64)
    hc = h.hypercalls(pv)
    assert paging.shadow_control(h, 0, pv, ENABLE)[0] == 0
    assert paging.shadow_control(h, 0, pv, ENABLE)[0] == -E.EINVAL
    h.ft.set_m2p(int(m[7]), 200)           # frame m[7] now claims pfn 200
    hc.wrote([int(m[5]), int(m[9])])
    hc.wrote([int(m[9]), int(m[7])])       # a second write to a dirty page: no new fault
    hc.wrote([int(h.p2m[1][0])])           # not this guest's frame: ignored
    h.ft.set_m2p(int(m[11]), -1)
    hc.wrote([int(m[11])])                 # no valid M2P entry: ignored
    rc, bm, stt = paging.shadow_control(h, 0, pv, PEEK, 256)
    assert rc == 0 and np.flatnonzero(bm).tolist() == [5, 9, 200]
    assert (stt.dirty_count, stt.fault_count) == (3, 3)
    rc, packed, _ = paging.shadow_control(h, 0, pv, CLEAN, 256, packed=True)
    assert packed.dtype == np.uint8 and packed.size == 32
    assert np.flatnonzero(np.unpackbits(packed, bitorder="little")).tolist() == [5, 9, 200]
    rc, bm, stt = paging.shadow_control(h, 0, pv, CLEAN, 256)
    assert not bm.any() and (stt.dirty_count, stt.fault_count) == (0, 0)
    hc.wrote([int(m[9])])
    assert np.flatnonzero(paging.shadow_control(h, 0, pv, CLEAN, 100)[1]).tolist() == [9]
    assert paging.shadow_control(h, 0, pv, OFF)[0] == 0
    hc.wrote([int(m[3])])                  # log-dirty off: nothing recorded
    assert paging.shadow_control(h, 0, pv, CLEAN, 256)[0] == -E.EINVAL


def test_workload_dirties_pages_at_its_rate_and_shape():
    h, hv, g = hvm_host(guest_mib=8, rate=10000, shape="hotcold", wss=0.5, hot_pages=64, hot_frac=1.0)
    paging.shadow_control(h, 0, 1, ENABLE)
    hv.wait(0.1)                                   # 1000 writes, all to the hot set
    assert g.writes == 1000
    _, bm, stt = paging.shadow_control(h, 0, 1, CLEAN, 2048)
    assert stt.dirty_count == int(bm.sum()) <= 64
    assert set(np.flatnonzero(bm).tolist()) <= set(g.working_set()[:64].tolist())
    hv.pause(1)
    hv.wait(0.1)                                   # a paused guest writes nothing
    assert g.writes == 1000 and paging.shadow_control(h, 0, 1, PEEK, 2048)[2].dirty_count == 0
    hv.unpause(1)
    g.workload.shape, g.workload.wss = "sequential", 100
    g._ws = None
    hv.wait(0.02)                                  # 200 writes sweep 100 pages twice
    assert paging.shadow_control(h, 0, 1, PEEK, 2048)[2].dirty_count == 100
    assert g.verify() == []
    ok(h)


def test_machine_check_on_a_guest_frame_makes_the_gfn_broken_and_the_guest_drops_it():
    h, hv, g = hvm_host(guest_mib=4, rate=5000)
    gfn = 300
    m = g.mfn(gfn)
    rc, st, got = HV.machine_check_guest_frame(h, m)
    assert rc == 0 and got == gfn
    assert st & S.PG_OFFLINE_PENDING and st & S.PG_OFFLINE_BROKEN
    p = h.ept[1]
    assert p.type[gfn] == H.p2m_ram_broken and p.walk(gfn)[-1][2] & 7 == 0  # no access
    assert gfn in g.poisoned
    hv.wait(0.5)
    assert g.verify() == []
    assert HV.guest_write(h, 1, [gfn], [5]).tolist() == [gfn]                # unusable
    rc, types = hv.page_types(1, [gfn, gfn + 1])
    assert types[0] == 0xD << 28 and types[1] == 0                            # BROKEN, NOTAB
    ok(h)


def test_populate_physmap_for_a_restore():
    h, hv = bare_host()
    rc, d = hv.domain_create("in", True, 600)
    assert rc == 0 and h.domains[d].pause_count == 1
    p = h.ept[d]
    rc, m = hv.populate_physmap(d, np.arange(0, 512))
    assert rc == 512 and (p.order[:512] == 0).all() and (p.type[:512] == H.p2m_ram_rw).all()
    old = int(p.mfn[3])
    assert hv.populate_physmap(d, [3])[0] == 1             # p2m_add_page replaces the entry:
    assert int(p.mfn[3]) != old and h.ft.m2p_plus1[old] == 0 and h.ft.owner(old) == d  # old kept
    rc, m = hv.populate_physmap(d, np.arange(512, 700))     # max_pages 600: 87 done
    assert rc == 87 and h.domains[d].tot_pages == 600
    assert hv.maximum_gpfn(d) == 598
    assert int(p.mfn[650]) == INVALID_MFN
    ok(h)


def test_p2m_state_survives_save_and_load(tmp_path):
    h, hv, g = hvm_host(guest_mib=4, rate=2000)
    paging.shadow_control(h, 0, 1, ENABLE)
    hv.wait(0.05)
    HV.machine_check_guest_frame(h, g.mfn(5))
    h.save(tmp_path / "h")
    h2 = Host.load(tmp_path / "h")
    p, p2 = h.ept[1], h2.ept[1]
    for a in ("mfn", "type", "order", "dirty"):
        assert np.array_equal(getattr(p, a), getattr(p2, a))
    assert p2.logdirty and p2.dirty_count == p.dirty_count and h2.clock == h.clock
    assert h2.guests[1].verify() == [] and h2.guests[1].writes == g.writes
    assert invariants.check(h2) == []


def test_invariant_checker_catches_a_bad_p2m():
    h, hv, g = hvm_host(guest_mib=4)
    p = h.ept[1]
    p.order[3] = 0                                           # a 2 MiB block half split
    assert any("mixes" in x or "cover" in x for x in invariants.check(h))
    p.order[3] = 9
    p.mfn[7], p.mfn[8] = p.mfn[8], p.mfn[7]                 # superpage not a run
    assert any("superpage" in x or "M2P" in x for x in invariants.check(h))
    p.mfn[7], p.mfn[8] = p.mfn[8], p.mfn[7]
    ok(h)
    paging.enable(p)
    p.type[9] = H.p2m_ram_rw                                 # writable behind log-dirty's back
    assert any("log-dirty" in x for x in invariants.check(h))


@given(st.lists(st.tuples(st.sampled_from(["write", "clean", "enable", "off", "split", "mce"]),
                          st.integers(0, 1023)), max_size=12))
def test_p2m_property_invariants_hold_after_any_sequence(ops):
    h, hv, g = hvm_host(guest_mib=4, mem_mib=64, dom0_mib=8)
    p = h.ept[1]
    for op, x in ops:
        if op == "write":
            g.write(1 + x % 50)
        elif op == "clean" and p.logdirty:
            paging.shadow_control(h, 0, 1, CLEAN, p.size)
        elif op == "enable" and not p.logdirty:
            paging.shadow_control(h, 0, 1, ENABLE)
        elif op == "off":
            paging.shadow_control(h, 0, 1, OFF)
        elif op == "split":
            p.split(np.array([x]))
        elif op == "mce" and x not in g.poisoned and p.type[x] in H.P2M_WRITABLE:
            HV.machine_check_guest_frame(h, int(p.mfn[x]))
        assert invariants.check(h) == [], op
    assert g.verify() == []


def test_maximum_gpfn_of_a_pv_guest_is_its_max_pfn_less_one():
    """``domain_get_maximum_gpfn`` for a PV guest: the ``max_pfn`` its kernel wrote into the
    shared info page, less one, and 0 (never -1) before it wrote any."""
    from simworld import small_host
    host, hv = small_host()
    pv = next(d for d in hv.domain_list() if d.domid and not d.hvm)
    n = int(host.domains[pv.domid].p2m_max_pfn)
    assert n > 1 and hv.maximum_gpfn(pv.domid) == n - 1
    host.domains[pv.domid].p2m_max_pfn = 0
    assert hv.maximum_gpfn(pv.domid) == 0
