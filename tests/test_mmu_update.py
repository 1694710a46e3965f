"""``mmu_update`` and ``mmuext_op`` on the simulated Xen 4.17 (xen-semantics.md 2.6, 4.1-4.6):
what a guest may and may not map, flags Xen refuses, the foreigndom encoding (FD and PFD)
including the upstream libxc defect (PFD never set -> -EINVAL), PRESERVE_AD, batches that
stop at the first failure, and MMU_MACHPHYS_UPDATE.  Errnos are the literal numbers of the
spec; "nothing changes" is checked on the whole frame table; the invariant checker runs
after every operation.
"""

from __future__ import annotations

import numpy as np
import pytest

from xenpage.abi import xen
from xenpage.hypervisor import invariants
from xenpage.hypervisor.host import Host, HostConfig

from page_info import Dom, gen, ok, pte, write  # noqa: E402

ALLOC = 0x8000000000000000
COUNT = 0x00FFFFFFFFFFFFFF
TCOUNT = 0x007FFFFFFFFFFFFF
L1T, WRT = 0x2000000000000000, 0xE000000000000000
PINNED, VALID = 0x0800000000000000, 0x0400000000000000
P, RW, US, PWT, PCD, A, D, PAT_PSE, G = 0x1, 0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x100
NX, GK = 1 << 63, 1 << 52
LINK = P | RW | US | A | D
NORMAL, MACHPHYS, PRESERVE_AD = 0, 1, 2
PIN_L1, PIN_L2, PIN_L3, PIN_L4, UNPIN = 0, 1, 2, 3, 4
DOMID_SELF, DOMID_IO = 0x7FF0, 0x7FF1
EPERM, ESRCH, EBUSY, EINVAL, ENOSYS, EOPNOTSUPP = -1, -3, -16, -22, -38, -95
INVALID_M2P = 0xFFFFFFFFFFFFFFFF


def req(table, idx, val, cmd=NORMAL):
    return [(table << 12) | (idx * 8) | cmd, val]


def mmu(hc, reqs, fd=DOMID_SELF):
    return hc.mmu_update(np.array(reqs, dtype=np.uint64).reshape(-1, 2), fd)


class Snap:
    """The whole frame table and every table's words, to prove nothing changed."""

    def __init__(self, h):
        self.h = h
        self.ci = h.ft.count_info.copy()
        self.ti = h.ft.type_info.copy()
        self.m2p = h.ft.m2p_plus1.copy()
        self.pages = {k: v.copy() for k, v in h.ft.pages.items()}

    def same(self) -> bool:
        h = self.h
        return (np.array_equal(self.ci, h.ft.count_info.copy()) and np.array_equal(self.ti, h.ft.type_info)
                and np.array_equal(self.m2p, h.ft.m2p_plus1)
                and self.pages.keys() == h.ft.pages.keys()
                and all(np.array_equal(v, h.ft.pages[k]) for k, v in self.pages.items()))


@pytest.fixture
def env():
    """dom0, guests u and v; u has a pinned L4 -> L3 -> L2 -> L1 tree (f[1..4]) whose L1
    maps u's f[10] read-write and f[11] read-only."""
    h = Host.boot(HostConfig(mem_bytes=64 << 20), dom0_pages=2048)
    u, v = Dom(h, 64, "u"), Dom(h, 32, "v")
    t4, t3, t2, t1 = u.f[1:5]
    write(h, t4, {0: pte(t3, LINK)})
    write(h, t3, {0: pte(t2, LINK)})
    write(h, t2, {0: pte(t1, LINK)})
    write(h, t1, {0: pte(u.f[10], P | RW | US | A | D), 1: pte(u.f[11], P | US)})
    assert u.hc.mmuext_op([(PIN_L4, t4)]) == (0, 1)
    ok(h)
    return h, u, v


# -- what a guest may map ------------------------------------------------------------------------

def test_guest_cannot_map_another_domains_frame(env):
    h, u, v = env
    t1 = u.f[4]
    s = Snap(h)
    assert mmu(u.hc, [req(t1, 5, pte(v.f[3], P | US))]) == (EBUSY, 0)
    assert mmu(u.hc, [req(t1, 5, pte(v.f[3], P | RW | US))]) == (EBUSY, 0)
    dom0_frame = int(h.owned_frames(0)[5])
    assert mmu(u.hc, [req(t1, 5, pte(dom0_frame, P))]) == (EBUSY, 0)
    # a free frame (count 0: page_get_owner_and_reference fails)
    free = h.heap.chunks()[-1][0]
    assert mmu(u.hc, [req(t1, 5, pte(free, P))]) == (EBUSY, 0)
    assert s.same()
    ok(h)


def test_guest_cannot_map_its_own_page_table_writable(env):
    h, u, v = env
    t4, t3, t2, t1 = u.f[1:5]
    s = Snap(h)
    for tab in (t4, t3, t2, t1):
        assert mmu(u.hc, [req(t1, 7, pte(tab, P | RW | US))]) == (EBUSY, 0)
    assert s.same()
    # read-only is fine, and costs one general reference
    assert mmu(u.hc, [req(t1, 7, pte(t2, P | US))]) == (0, 1)
    assert gen(h, t2) == 3 and int(h.ft.type_info[t2]) & TCOUNT == 1
    ok(h)


def test_mmio_and_dom_io_frames(env):
    """DOMID_IO frames (the VGA hole at 0xa0) and frames beyond the frame table: a domU
    without I/O access gets -EPERM; dom0 maps them without taking any reference."""
    h, u, v = env
    t1 = u.f[4]
    s = Snap(h)
    assert mmu(u.hc, [req(t1, 9, pte(0xA0, P))]) == (EPERM, 0)
    assert mmu(u.hc, [req(t1, 9, pte(h.nframes + 5, P))]) == (EPERM, 0)
    assert s.same()
    d0 = [int(m) for m in h.owned_frames(0)[:4]]
    write(h, d0[0], {0: pte(0xA0, P | RW | PCD), 1: pte(h.nframes + 5, P)})
    before = int(h.ft.count_info[0xA0])
    assert h.hypercalls(0).mmuext_op([(PIN_L1, d0[0])]) == (0, 1)
    assert int(h.ft.count_info[0xA0]) == before
    ok(h)
    assert h.hypercalls(0).mmuext_op([(UNPIN, d0[0])]) == (0, 1)
    ok(h)


def test_disallowed_flags(env):
    h, u, v = env
    t4, t3, t2, t1 = u.f[1:5]
    write(h, u.f[5], {})
    s = Snap(h)
    # L1: cache attributes need I/O privilege
    for bad in (PWT, PCD, PAT_PSE):
        assert mmu(u.hc, [req(t1, 6, pte(u.f[12], P | bad))]) == (EINVAL, 0)
    # L2/L3: no superpages (PSE), no GLOBAL
    for tab in (t2, t3):
        assert mmu(u.hc, [req(tab, 3, pte(u.f[5], LINK | PAT_PSE))]) == (EINVAL, 0)
        assert mmu(u.hc, [req(tab, 3, pte(u.f[5], LINK | G))]) == (EINVAL, 0)
    # L4: Xen's private slots 256..271 (incl. the linear slot 258)
    for slot in (256, 258, 271):
        assert mmu(u.hc, [req(t4, slot, 0)]) == (EINVAL, 0)
        assert mmu(u.hc, [req(t4, slot, pte(u.f[5], LINK))]) == (EINVAL, 0)
    assert s.same()
    # validation refuses the same flags
    write(h, u.f[6], {0: pte(u.f[12], P | PCD)})
    assert u.hc.mmuext_op([(PIN_L1, u.f[6])]) == (EINVAL, 0)
    write(h, u.f[7], {0: pte(u.f[8], LINK | PAT_PSE)})
    assert u.hc.mmuext_op([(PIN_L2, u.f[7])]) == (EINVAL, 0)
    ok(h)


def test_control_domain_may_set_cache_attributes(env):
    h, u, v = env
    d0 = [int(m) for m in h.owned_frames(0)[:4]]
    write(h, d0[0], {0: pte(d0[1], P | RW | PCD | PWT)})
    assert h.hypercalls(0).mmuext_op([(PIN_L1, d0[0])]) == (0, 1)
    ok(h)


def test_linear_self_entries(env):
    """An L2 entry pointing at its own table: read-only is a linear mapping holding nothing;
    read-write is refused."""
    h, u, v = env
    t2 = u.f[3]
    s = Snap(h)
    assert mmu(u.hc, [req(t2, 9, pte(t2, LINK))]) == (EINVAL, 0)
    assert s.same()
    assert mmu(u.hc, [req(t2, 9, pte(t2, P | US | A))]) == (0, 1)
    assert gen(h, t2) == 2 and int(h.ft.type_info[t2]) & TCOUNT == 1
    ok(h)


# -- the foreigndom argument ------------------------------------------------------------------

def test_dom0_without_pfd_gets_einval_and_nothing_changes(env):
    """The upstream xc_exchange_page defect (7.A1): foreigndom = domid makes Xen look for the
    guest's table among dom0's frames: the whole batch fails on its first request."""
    h, u, v = env
    t1 = u.f[4]
    dom0 = h.hypercalls(0)
    s = Snap(h)
    e0 = int(h.ft.read_page(t1)[0])
    batch = [req(t1, 0, e0 & ~P, PRESERVE_AD), req(t1, 1, 0, PRESERVE_AD)]
    assert mmu(dom0, batch, u.id) == (EINVAL, 0)
    assert mmu(dom0, batch, xen.foreigndom(u.id)) == (EINVAL, 0)
    assert s.same()
    ok(h)
    # with the page-table owner encoded ((domid+1) << 16 | domid) it works
    assert xen.foreigndom(u.id, u.id) == ((u.id + 1) << 16) | u.id
    assert mmu(dom0, batch, xen.foreigndom(u.id, u.id)) == (0, 2)
    assert int(h.ft.read_page(t1)[0]) == e0 & ~P
    assert int(h.ft.count_info[u.f[10]]) == ALLOC | 1 and int(h.ft.count_info[u.f[11]]) == ALLOC | 1
    ok(h)
    # and restores (the frame field was kept, PRESERVE_AD keeps A/D)
    assert mmu(dom0, [req(t1, 0, e0 & ~(A | D), PRESERVE_AD)], xen.foreigndom(u.id, u.id)) == (0, 1)
    assert int(h.ft.read_page(t1)[0]) == e0
    assert int(h.ft.count_info[u.f[10]]) == ALLOC | 2
    ok(h)


def test_foreigndom_errors(env):
    h, u, v = env
    t1 = u.f[4]
    dom0 = h.hypercalls(0)
    s = Snap(h)
    r = [req(t1, 5, pte(u.f[12], P))]
    assert mmu(dom0, r, 0) == (ESRCH, 0)                      # FD = the caller itself
    assert mmu(u.hc, r, u.id) == (ESRCH, 0)
    assert mmu(dom0, r, 77) == (ESRCH, 0)                     # unknown FD
    assert mmu(dom0, r, xen.foreigndom(u.id, 77)) == (ESRCH, 0)  # unknown PFD
    # a guest naming another domain, as data owner or as page-table owner
    assert mmu(u.hc, r, v.id) == (EPERM, 0)
    assert mmu(u.hc, r, xen.foreigndom(v.id, v.id)) == (EPERM, 0)
    assert mmu(u.hc, r, xen.foreigndom(DOMID_SELF, v.id)) == (EPERM, 0)
    # ... whose permission is only checked per request: an empty batch succeeds
    assert mmu(u.hc, [], xen.foreigndom(v.id, v.id)) == (0, 0)
    # PFD = the caller itself is the same as no PFD
    assert mmu(u.hc, r, xen.foreigndom(DOMID_SELF, u.id)) == (0, 1)
    ok(h)
    assert mmu(u.hc, [req(t1, 5, 0)]) == (0, 1)
    assert s.same()


def test_pfd_without_vcpu_and_hvm_pfd(env):
    h, u, v = env
    dom0 = h.hypercalls(0)
    z = Dom(h, 8, "novcpu", vcpus=0)
    assert mmu(dom0, [req(z.f[1], 0, 0)], xen.foreigndom(z.id, z.id)) == (EINVAL, 0)
    hvm = Dom(h, 64, "hvm", hvm=True)
    assert mmu(dom0, [req(hvm.f[1], 0, 0)], xen.foreigndom(hvm.id, hvm.id)) == (EOPNOTSUPP, 0)
    ok(h)


def test_upper_levels_need_fd_equal_pfd(env):
    h, u, v = env
    t2, t1 = u.f[3], u.f[4]
    dom0 = h.hypercalls(0)
    s = Snap(h)
    assert mmu(dom0, [req(t2, 1, 0)], xen.foreigndom(v.id, u.id)) == (EINVAL, 0)
    assert s.same()
    # an L1 of u may be given a mapping of v's frame by the control domain (FD = v)
    assert mmu(dom0, [req(t1, 8, pte(v.f[2], P | US))], xen.foreigndom(v.id, u.id)) == (0, 1)
    assert int(h.ft.count_info[v.f[2]]) == ALLOC | 2
    ok(h)
    assert mmu(dom0, [req(t1, 8, 0)], xen.foreigndom(u.id, u.id)) == (0, 1)
    ok(h)


# -- PRESERVE_AD, batches, raw writes ------------------------------------------------------------

def test_preserve_ad_keeps_the_in_memory_accessed_and_dirty_bits(env):
    h, u, v = env
    t1, data = u.f[4], u.f[10]
    e0 = int(h.ft.read_page(t1)[0])
    assert e0 & (A | D) == A | D
    assert mmu(u.hc, [req(t1, 0, 0, PRESERVE_AD)]) == (0, 1)
    assert int(h.ft.read_page(t1)[0]) == A | D   # not present, A/D carried over
    assert int(h.ft.count_info[data]) == ALLOC | 1
    ok(h)
    assert mmu(u.hc, [req(t1, 0, pte(data, P | RW | US), PRESERVE_AD)]) == (0, 1)
    assert int(h.ft.read_page(t1)[0]) == pte(data, P | RW | US | A | D | G)
    ok(h)
    # a normal update writes exactly what it is given (plus Xen's flag adjustment)
    assert mmu(u.hc, [req(t1, 0, pte(data, P | RW | US))]) == (0, 1)
    assert int(h.ft.read_page(t1)[0]) == pte(data, P | RW | US | G)
    ok(h)


def test_batch_stops_at_the_first_failure(env):
    h, u, v = env
    t1 = u.f[4]
    batch = [req(t1, 20, pte(u.f[20], P)), req(t1, 21, pte(u.f[21], P)),
             req(t1, 22, pte(v.f[1], P)), req(t1, 23, pte(u.f[23], P))]
    assert mmu(u.hc, batch) == (EBUSY, 2)
    tab = h.ft.read_page(t1)
    assert tab[20] != 0 and tab[21] != 0 and tab[22] == 0 and tab[23] == 0
    assert gen(h, u.f[20]) == 2 and gen(h, u.f[21]) == 2 and gen(h, u.f[23]) == 1
    ok(h)
    assert mmu(u.hc, [req(t1, 24, 0, 7)]) == (ENOSYS, 0)
    assert u.hc.mmuext_op([(99, 0)]) == (ENOSYS, 0)


def test_update_of_a_frame_that_is_not_a_page_table(env):
    """A frame that cannot be page-locked gets a transient writable type and a raw write;
    a writable-typed frame in use is written as it is; a page table in use as another level
    through its own validation."""
    h, u, v = env
    data, mapped = u.f[30], u.f[10]
    assert mmu(u.hc, [req(data, 3, 0x1234)]) == (0, 1)
    assert int(h.ft.read_page(data)[3]) == 0x1234
    assert int(h.ft.type_info[data]) == WRT | VALID  # lingering writable type, count 0
    assert mmu(u.hc, [req(mapped, 4, 0x5678)]) == (0, 1)
    assert int(h.ft.read_page(mapped)[4]) == 0x5678 and int(h.ft.type_info[mapped]) & TCOUNT == 1
    ok(h)
    # a devalidated former L1 becomes writable when written raw
    t1b = u.f[31]
    write(h, t1b, {})
    u.hc.mmuext_op([(PIN_L1, t1b)])
    u.hc.mmuext_op([(UNPIN, t1b)])
    assert int(h.ft.type_info[t1b]) == L1T
    assert mmu(u.hc, [req(t1b, 0, pte(v.f[1], P))]) == (0, 1)  # raw: no validation
    assert int(h.ft.type_info[t1b]) == WRT | VALID
    # ... and so cannot be pinned as an L1 any more with that content
    assert u.hc.mmuext_op([(PIN_L1, t1b)]) == (EBUSY, 0)
    ok(h)


# -- MMU_MACHPHYS_UPDATE -----------------------------------------------------------------------

def test_machphys_update(env):
    h, u, v = env
    m, g = u.f[40], 40
    assert h.ft.m2p(m) == g
    assert mmu(u.hc, [req(m, 0, 0x999, MACHPHYS)]) == (0, 1)
    assert h.ft.m2p(m) == 0x999
    assert invariants.check(h)  # the M2P now disagrees with the P2M
    assert mmu(u.hc, [req(m, 0, g, MACHPHYS)]) == (0, 1)
    ok(h)
    s = Snap(h)
    assert mmu(u.hc, [req(v.f[3], 0, 1, MACHPHYS)]) == (EINVAL, 0)      # not its frame
    assert mmu(u.hc, [req(v.f[3], 0, 1, MACHPHYS)], v.id) == (EPERM, 0)  # FD another domain
    dom0 = h.hypercalls(0)
    assert mmu(dom0, [req(v.f[3], 0, 1, MACHPHYS)], xen.foreigndom(v.id, v.id)) == (EPERM, 0)
    hvm = Dom(h, 64, "hvm", hvm=True)
    s = Snap(h)
    assert mmu(dom0, [req(hvm.f[3], 0, 3, MACHPHYS)], hvm.id) == (EINVAL, 0)
    assert s.same()
    # the control domain with FD = guest (no PFD) fixes a guest's M2P entry
    assert mmu(dom0, [req(v.f[3], 0, 0x77, MACHPHYS)], v.id) == (0, 1)
    assert h.ft.m2p(v.f[3]) == 0x77
    assert mmu(dom0, [req(v.f[3], 0, 3, MACHPHYS)], v.id) == (0, 1)
    ok(h)
