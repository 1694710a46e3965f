"""What every ``Hypervisor`` backend answers alike (see conftest.py): return conventions
(negative errnos, numpy batches), the lab-shaped host facts both share, and the error paths
that change nothing."""

from __future__ import annotations

import numpy as np
import pytest

from xenpage.abi import domctl as D
from xenpage.abi import errno as E
from xenpage.abi import sysctl as S
from xenpage.abi import xen as X
from xenpage.toolstack.hypervisor import DomainInfo, Hypervisor, PhysInfo
from xenpage.backends.xen.quirks import free_frames_followed_by_owned
from xenpage.toolstack.pcpu import off_pcpu0

INVALID = np.uint64(X.INVALID_M2P_ENTRY)
VGA_HOLE = 0xA0
XEN_IMAGE_FIRST = 0x7FA00


def test_protocol_and_kind(hv, backend):
    assert isinstance(hv, Hypervisor)
    assert hv.kind == backend


def test_physinfo(hv):
    pi = hv.physinfo()
    assert isinstance(pi, PhysInfo)
    assert pi.nr_cpus >= 1
    assert 0 < pi.free_pages <= pi.total_pages
    assert pi.max_mfn == hv.max_mfn() > 0
    assert pi.backend == hv.kind


def test_query_range_is_a_uint32_batch(hv):
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, 0x20000, 0x20007)
    assert rc == 0
    # one uint32 word per frame, viewable by numpy without a copy (numpy on the simulator,
    # array('I') on real Xen so that a one-frame query loads no numpy)
    words = np.asarray(st)
    assert words.dtype == np.uint32 and words.shape == (8,) and len(st) == 8
    assert st.tolist() == words.tolist() and int(st[0]) == int(words[0])
    known = S.PG_OFFLINE_STATUS_OFFLINED | S.PG_OFFLINE_STATUS_OFFLINE_PENDING | S.PG_OFFLINE_STATUS_BROKEN
    assert not (words & ~np.uint32(known)).any()


def test_end_before_start_is_einval(hv):
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, 0x20001, 0x20000)
    assert rc == -E.EINVAL and st is None


def test_vga_hole_query_einval_untouched(hv):
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, VGA_HOLE, VGA_HOLE)
    assert rc == -E.EINVAL
    assert int(st[0]) == S.STATUS_UNTOUCHED


def test_xen_image_frame_offline_eperm(hv):
    with off_pcpu0(hv):
        rc, st = hv.page_offline_op(S.sysctl_page_offline, XEN_IMAGE_FIRST, XEN_IMAGE_FIRST)
    assert rc == -E.EPERM
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, XEN_IMAGE_FIRST, XEN_IMAGE_FIRST)
    assert rc == 0 and not int(st[0]) & (S.PG_OFFLINE_STATUS_OFFLINED | S.PG_OFFLINE_STATUS_OFFLINE_PENDING)


def test_xen_fixed_range_is_what_offline_refuses(hv):
    """``xen_fixed_range`` (``KEXEC_RANGE_MA_XEN``) names the frames ``is_xen_fixed_mfn``
    refuses: EPERM / 0x7ff20108 at both ends, not just outside (a refusal changes nothing);
    the query sysctl cannot tell them from any frame in use (0)."""
    rng = hv.xen_fixed_range()
    assert rng is not None and 0 < rng[0] < rng[1] <= hv.max_mfn()
    for m in (rng[0], rng[1] - 1):
        with off_pcpu0(hv):
            rc, st = hv.page_offline_op(S.sysctl_page_offline, m, m)
        assert (rc, int(st[0])) == (-E.EPERM, 0x7FF20108), hex(m)
        assert (lambda r: (r[0], int(r[1][0])))(hv.page_offline_op(S.sysctl_query_page_offline, m, m)) == (0, 0)
    with off_pcpu0(hv):
        rc, st = hv.page_offline_op(S.sysctl_page_offline, rng[1], rng[1])
    assert rc != -E.EPERM
    if rc == 0 and int(st[0]) & S.PG_OFFLINE_STATUS_MASK:
        assert hv.page_offline_op(S.sysctl_page_online, rng[1], rng[1])[0] == 0


def test_free_frame_offline_online_cycle(hv):
    """Only a free frame whose successor is in use: offlining a free frame in the middle of a free
    buddy leaves misaligned chunks on Xen 4.17 (backends/xen/quirks.py) that crash Xen later."""
    q = S.sysctl_query_page_offline
    for mfn in free_frames_followed_by_owned(hv, limit=20):
        with off_pcpu0(hv):
            rc, st = hv.page_offline_op(S.sysctl_page_offline, mfn, mfn)
        assert rc == 0
        if int(st[0]) & S.PG_OFFLINE_STATUS_MASK == S.PG_OFFLINE_OFFLINED:
            break
        # owned by someone: cancel the pending offline and try the next candidate
        assert hv.page_offline_op(S.sysctl_page_online, mfn, mfn)[0] == 0
        assert int(hv.page_offline_op(q, mfn, mfn)[1][0]) == 0
    else:
        pytest.skip("no free frame just below an owned frame")
    assert int(hv.page_offline_op(q, mfn, mfn)[1][0]) == S.PG_OFFLINE_STATUS_OFFLINED
    rc, st = hv.page_offline_op(S.sysctl_page_online, mfn, mfn)
    assert rc == 0 and int(st[0]) & S.PG_ONLINE_ONLINED
    assert int(hv.page_offline_op(q, mfn, mfn)[1][0]) == 0


def test_offline_each_answers_as_one_frame_calls(hv):
    """``page_offline_each``: int32 errnos and uint32 words, element by element what a
    one-frame ``page_offline_op`` answers (a query changes nothing: the same frames twice)."""
    q = S.sysctl_query_page_offline
    mfns = np.array([0x20003, VGA_HOLE, 0x20000, XEN_IMAGE_FIRST, 0x20001, hv.max_mfn() + 5],
                    dtype=np.int64)
    rcs, st = hv.page_offline_each(q, mfns)
    assert rcs.dtype == np.int32 and st.dtype == np.uint32 and rcs.shape == st.shape == (6,)
    for m, rc, w in zip(mfns.tolist(), rcs.tolist(), st.tolist()):
        rc1, st1 = hv.page_offline_op(q, m, m)
        assert (rc, w) == (rc1, int(st1[0])), hex(m)
    assert rcs[1] == -E.EINVAL and st[1] == S.STATUS_UNTOUCHED
    with pytest.raises(ValueError):
        hv.page_offline_each(q, np.array([S.MFN_FIELD_MAX + 1]))


def test_offline_each_offlines_and_onlines_a_free_frame(hv):
    """The offline and online calls by array, on a free frame whose successor is in use (the
    only free frame Xen 4.17 offlines without misaligning its heap), and a Xen-image frame."""
    q = S.sysctl_query_page_offline
    for mfn in free_frames_followed_by_owned(hv, limit=20):
        with off_pcpu0(hv):
            rcs, st = hv.page_offline_each(S.sysctl_page_offline, np.array([mfn, XEN_IMAGE_FIRST]))
        assert rcs.tolist() == [0, -E.EPERM]
        if int(st[0]) & S.PG_OFFLINE_STATUS_MASK == S.PG_OFFLINE_OFFLINED:
            break
        assert hv.page_offline_each(S.sysctl_page_online, np.array([mfn]))[0][0] == 0
    else:
        pytest.skip("no free frame just below an owned frame")
    assert int(st[1]) == S.PG_OFFLINE_XENPAGE | S.PG_OFFLINE_FAILED | (X.DOMID_XEN << S.PG_OFFLINE_OWNER_SHIFT)
    assert int(hv.page_offline_op(q, mfn, mfn)[1][0]) == S.PG_OFFLINE_STATUS_OFFLINED
    rcs, st = hv.page_offline_each(S.sysctl_page_online, np.array([mfn]))
    assert rcs[0] == 0 and int(st[0]) & S.PG_ONLINE_ONLINED
    assert int(hv.page_offline_op(q, mfn, mfn)[1][0]) == 0


def test_domains(hv):
    doms = hv.domain_list()
    assert all(isinstance(d, DomainInfo) for d in doms)
    d0 = hv.domain_info(0)
    assert d0 is not None and d0.domid == 0 and d0.name == "Domain-0"
    assert d0.nr_vcpus >= 1 and not d0.hvm and not d0.dying
    assert 0 in {d.domid for d in doms}
    assert hv.domain_info(0x7000) is None
    assert hv.domain_info(X.DOMID_XEN) is None


def test_vcpu_affinity_round_trip(hv):
    n = hv.physinfo().nr_cpus
    saved = hv.vcpu_affinity(0, 0)
    assert saved and all(isinstance(c, int) for c in saved)
    try:
        assert hv.set_vcpu_affinity(0, 0, [n - 1]) == 0
        assert hv.vcpu_affinity(0, 0) == [n - 1]
        assert hv.set_vcpu_affinity(0, 0, []) == -E.EINVAL
        assert hv.vcpu_affinity(0, 0) == [n - 1]
    finally:
        assert hv.set_vcpu_affinity(0, 0, saved) == 0
    assert hv.vcpu_affinity(0, 0) == saved


def test_off_pcpu0_pins_and_restores(hv):
    if hv.physinfo().nr_cpus < 2:
        pytest.skip("single pCPU")
    nv = hv.domain_info(0).nr_vcpus
    before = [hv.vcpu_affinity(0, v) for v in range(nv)]
    with off_pcpu0(hv) as target:
        assert 0 not in target
        assert all(0 not in hv.vcpu_affinity(0, v) for v in range(nv))
    assert [hv.vcpu_affinity(0, v) for v in range(nv)] == before


def test_xenstore(hv):
    assert hv.xs_read("/local/domain/0/name") == "Domain-0"
    assert hv.xs_read("/xenpage-contract/does/not/exist") is None
    assert hv.xs_write("/local/domain/0/data/xenpage-contract", "v1") == 0
    assert hv.xs_read("/local/domain/0/data/xenpage-contract") == "v1"


def test_m2p_out_of_range_is_invalid(hv):
    mx = hv.max_mfn()
    out = hv.m2p(np.array([-1, mx, mx + 5]))
    assert out.dtype == np.uint64 and (out == INVALID).all()


def _p2m(hv, domid):
    rc, frames, n = hv.pv_p2m_frames(domid)
    assert rc == 0 and n > 0
    assert frames.dtype == np.int64 and frames.size == -(-n // 512)
    m = hv.map_foreign(domid, frames, False)
    assert not isinstance(m, int)
    p2m = m.array.ravel()[:n].copy()
    m.unmap()
    return p2m


def test_pv_p2m_and_m2p_agree(hv, pv_domid):
    p2m = _p2m(hv, pv_domid)
    valid = np.flatnonzero(p2m < np.uint64(hv.max_mfn()))
    assert valid.size > 1000
    back = hv.m2p(p2m[valid].astype(np.int64))
    assert (back == valid.astype(np.uint64)).mean() > 0.99
    rc, fl, fll = hv.pv_p2m_frame_lists(pv_domid)
    assert rc == 0 and fl.dtype == np.int64


def test_page_types_of_a_pv_guest(hv, pv_domid):
    p2m = _p2m(hv, pv_domid)
    valid = np.flatnonzero(p2m < np.uint64(hv.max_mfn()))
    rc, t = hv.page_types(pv_domid, p2m[valid].astype(np.int64))
    assert rc == 0 and t.dtype == np.uint32 and t.size == valid.size
    lvl = (t & np.uint32(D.XEN_DOMCTL_PFINFO_LTABTYPE_MASK)) >> np.uint32(28)
    assert (lvl == 4).any() and (lvl == 1).any() and (lvl == 0).sum() > valid.size // 2
    assert (t[lvl == 4] & np.uint32(D.XEN_DOMCTL_PFINFO_LPINTAB)).any()
    rc, t = hv.page_types(pv_domid, np.array([hv.max_mfn() + 1]))
    assert rc == 0 and int(t[0]) == D.XEN_DOMCTL_PFINFO_XTAB


def test_foreign_map_read_only(hv, pv_domid):
    p2m = _p2m(hv, pv_domid)
    mfn = int(p2m[np.flatnonzero(p2m < np.uint64(hv.max_mfn()))[100]])
    m = hv.map_foreign(pv_domid, [mfn], False)
    assert not isinstance(m, int)
    assert m.array.shape == (1, 512) and m.array.dtype == np.uint64
    assert not m.writable
    with pytest.raises(PermissionError):
        m.flush()
    m.unmap()
    assert hv.map_foreign(pv_domid, [], False).array.shape == (0, 512)


def test_foreign_map_of_a_frame_not_the_guests_fails(hv, pv_domid):
    r = hv.map_foreign(pv_domid, [hv.max_mfn() + 0x10], False)
    assert isinstance(r, int) and r < 0


def test_grant_entries(hv, pv_domid):
    rc, g = hv.grant_entries(pv_domid)
    assert rc == 0 and g.dtype == np.uint64 and g.size and g.size % 512 == 0
    assert hv.grant_entries(0x7000)[0] == -E.ESRCH


def test_mmu_update_error_paths_change_nothing(hv, pv_domid):
    fd = X.foreigndom(pv_domid, pv_domid)
    assert hv.mmu_update(np.zeros((0, 2), dtype=np.uint64), fd) == (0, 0)
    # a "page table" frame the guest does not own (frame 0 belongs to Xen)
    req = np.array([[(0 << 12) | X.MMU_NORMAL_PT_UPDATE, 0]], dtype=np.uint64)
    assert hv.mmu_update(req, fd) == (-E.EINVAL, 0)
    # an absent page-table owner
    assert hv.mmu_update(req, X.foreigndom(0x7000, 0x7000))[0] == -E.ESRCH


def test_mmuext_unpin_of_unpinned_frame_einval(hv, pv_domid):
    p2m = _p2m(hv, pv_domid)
    valid = np.flatnonzero(p2m < np.uint64(hv.max_mfn()))
    rc, t = hv.page_types(pv_domid, p2m[valid].astype(np.int64))
    data = int(p2m[valid[np.flatnonzero(t == 0)[10]]])
    assert hv.mmuext_op([], pv_domid) == (0, 0)
    assert hv.mmuext_op([(X.MMUEXT_UNPIN_TABLE, data)], pv_domid) == (-E.EINVAL, 0)


def test_memory_exchange_of_a_frame_not_the_guests(hv, pv_domid):
    rc, nr, out = hv.memory_exchange(pv_domid, [0], [0])
    assert rc == -E.EINVAL and nr == 0


def test_pause_unpause_and_resume_of_a_running_guest(hv, pv_domid):
    assert hv.pause(pv_domid) == 0
    try:
        assert hv.domain_info(pv_domid).paused
    finally:
        assert hv.unpause(pv_domid) == 0
    assert not hv.domain_info(pv_domid).paused
    assert hv.resume(pv_domid) == -E.EINVAL          # not suspended: nothing is touched
    assert hv.resume(0x7000) == -E.ESRCH
