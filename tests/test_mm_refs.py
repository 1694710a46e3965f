"""General and type reference counts of the simulated Xen 4.17 after each kind of mapping
(xen-semantics.md 2.3-2.5, 4.3, 4.5): RO and RW L1 entries, L2/L3/L4 links (a type
reference of the lower level, validation on 0 -> 1, devalidation dropping what the entries
held), pins, vCPU root tables, and the rule that a page-table frame is never writable.

A small bare host and a domU with no kernel model: the tests write table contents into the
domU's own (not yet typed) frames, as a guest does through its direct map, and then act
only through the domU's hypercalls.  Expected values are the literal bit patterns of the
spec; the invariant checker runs after every operation.
"""

from __future__ import annotations

import numpy as np
import pytest

from xenpage.hypervisor.host import Host, HostConfig

from page_info import Dom, gen, ok, pte, tcnt, write  # noqa: E402

# count_info / type_info fields (xen-semantics.md 2.1, 2.2)
ALLOC = 0x8000000000000000
COUNT = 0x00FFFFFFFFFFFFFF
TYPE = 0xE000000000000000
NONE_T, L1T, L2T, L3T, L4T = 0, 0x2000000000000000, 0x4000000000000000, 0x6000000000000000, 0x8000000000000000
WRT = 0xE000000000000000
PINNED = 0x0800000000000000
VALID = 0x0400000000000000
TCOUNT = 0x007FFFFFFFFFFFFF
# PTE bits (2.6)
P, RW, US, A, D, G = 0x1, 0x2, 0x4, 0x20, 0x40, 0x100
NX = 1 << 63
GK = 1 << 52
LINK = P | RW | US | A | D
# mmu_update / mmuext_op numbers (4.1, 4.5)
NORMAL, MACHPHYS, PRESERVE_AD = 0, 1, 2
PIN_L1, PIN_L2, PIN_L3, PIN_L4, UNPIN, NEW_BASEPTR, NEW_USER_BASEPTR = 0, 1, 2, 3, 4, 5, 15
DOMID_SELF = 0x7FF0
EPERM, ESRCH, EBUSY, EINVAL = -1, -3, -16, -22


# -- helpers -----------------------------------------------------------------------------------

def bare(mem_mib: int = 64, dom0_pages: int = 2048) -> Host:
    return Host.boot(HostConfig(mem_bytes=mem_mib << 20), dom0_pages=dom0_pages)


def ttype(h, m) -> int:
    return int(h.ft.type_info[m]) & TYPE


def tflags(h, m) -> int:
    return int(h.ft.type_info[m]) & (PINNED | VALID)


def upd(hc, table: int, idx: int, val: int, cmd: int = NORMAL, fd: int = DOMID_SELF):
    return hc.mmu_update(np.array([[(table << 12) | (idx * 8) | cmd, val]], dtype=np.uint64), fd)


@pytest.fixture
def env():
    h = bare()
    u = Dom(h)
    ok(h)
    return h, u


# -- L1 entries --------------------------------------------------------------------------------

def test_fresh_frame_has_only_the_allocation_reference(env):
    h, u = env
    m = u.f[10]
    assert int(h.ft.count_info[m]) == ALLOC | 1
    assert int(h.ft.type_info[m]) == 0


def test_read_only_l1_entry_takes_one_general_ref_and_no_type(env):
    h, u = env
    t1, data = u.f[1], u.f[10]
    write(h, t1, {})
    assert u.hc.mmuext_op([(PIN_L1, t1)]) == (0, 1)
    ok(h)
    assert upd(u.hc, t1, 5, pte(data, P | US)) == (0, 1)
    ok(h)
    assert int(h.ft.count_info[data]) == ALLOC | 2
    assert tcnt(h, data) == 0
    # a second RO mapping of the same frame: one more general reference
    assert upd(u.hc, t1, 6, pte(data, P | US)) == (0, 1)
    assert gen(h, data) == 3 and tcnt(h, data) == 0
    ok(h)
    assert upd(u.hc, t1, 5, 0) == (0, 1) and upd(u.hc, t1, 6, 0) == (0, 1)
    assert int(h.ft.count_info[data]) == ALLOC | 1
    ok(h)


def test_rw_l1_entry_takes_a_writable_type_reference(env):
    h, u = env
    t1, data = u.f[1], u.f[10]
    write(h, t1, {})
    u.hc.mmuext_op([(PIN_L1, t1)])
    assert upd(u.hc, t1, 0, pte(data, P | RW | US)) == (0, 1)
    assert int(h.ft.count_info[data]) == ALLOC | 2
    assert int(h.ft.type_info[data]) == WRT | VALID | 1
    ok(h)
    assert upd(u.hc, t1, 1, pte(data, P | RW)) == (0, 1)
    assert gen(h, data) == 3 and int(h.ft.type_info[data]) == WRT | VALID | 2
    ok(h)
    # RW -> RO of the same frame: the writable type reference goes, the general stays
    assert upd(u.hc, t1, 1, pte(data, P)) == (0, 1)
    assert gen(h, data) == 3 and tcnt(h, data) == 1
    ok(h)
    assert upd(u.hc, t1, 0, 0) == (0, 1) and upd(u.hc, t1, 1, 0) == (0, 1)
    # a writable type dropping to 0 stays writable and validated (lazily)
    assert int(h.ft.type_info[data]) == WRT | VALID
    assert int(h.ft.count_info[data]) == ALLOC | 1
    ok(h)


def test_xen_adjusts_64bit_pv_l1_entries(env):
    """2.6: kernel mappings (no USER) get _PAGE_GUEST_KERNEL|USER; mappings without
    _PAGE_GUEST_KERNEL (user ones) get GLOBAL|USER."""
    h, u = env
    t1 = u.f[1]
    write(h, t1, {})
    u.hc.mmuext_op([(PIN_L1, t1)])
    upd(u.hc, t1, 0, pte(u.f[10], P | RW | NX))
    upd(u.hc, t1, 1, pte(u.f[11], P | RW | US))
    tab = h.ft.read_page(t1)
    assert int(tab[0]) == pte(u.f[10], P | RW | NX | US | GK)
    assert int(tab[1]) == pte(u.f[11], P | RW | US | G)
    ok(h)


def test_whitelisted_change_takes_no_new_reference(env):
    h, u = env
    t1, data = u.f[1], u.f[10]
    write(h, t1, {})
    u.hc.mmuext_op([(PIN_L1, t1)])
    upd(u.hc, t1, 0, pte(data, P | RW | US))
    before = (int(h.ft.count_info[data]), int(h.ft.type_info[data]))
    assert upd(u.hc, t1, 0, pte(data, P | RW | US | A | D | NX)) == (0, 1)
    assert (int(h.ft.count_info[data]), int(h.ft.type_info[data])) == before
    ok(h)


def test_l1_may_map_itself_read_only_but_never_writable(env):
    h, u = env
    t1 = u.f[1]
    write(h, t1, {0: pte(t1, P)})
    assert u.hc.mmuext_op([(PIN_L1, t1)]) == (0, 1)
    # alloc + pin + its own RO entry
    assert gen(h, t1) == 3 and int(h.ft.type_info[t1]) == L1T | PINNED | VALID | 1
    ok(h)
    before = h.ft.read_page(t1)
    assert upd(u.hc, t1, 1, pte(t1, P | RW)) == (EBUSY, 0)
    assert np.array_equal(h.ft.read_page(t1), before) and gen(h, t1) == 3
    ok(h)
    # validation of an L1 holding a writable self-mapping fails with the same error
    t1b = u.f[2]
    write(h, t1b, {0: pte(t1b, P | RW)})
    assert u.hc.mmuext_op([(PIN_L1, t1b)]) == (EBUSY, 0)
    assert int(h.ft.type_info[t1b]) == 0 and int(h.ft.count_info[t1b]) == ALLOC | 1
    ok(h)


# -- upper levels ------------------------------------------------------------------------------

def test_l2_link_takes_an_l1_type_reference_and_validates_on_first_use(env):
    h, u = env
    t2, t1, data = u.f[1], u.f[2], u.f[10]
    write(h, t2, {})
    write(h, t1, {3: pte(data, P | RW)})
    assert u.hc.mmuext_op([(PIN_L2, t2)]) == (0, 1)
    assert int(h.ft.type_info[t1]) == 0  # not yet a page table: its entry holds nothing
    assert int(h.ft.count_info[data]) == ALLOC | 1
    ok(h)
    assert upd(u.hc, t2, 0, pte(t1, LINK)) == (0, 1)
    # t1: +1 general, +1 L1 type (0 -> 1 validated it); its RW entry now holds its refs
    assert int(h.ft.count_info[t1]) == ALLOC | 2
    assert int(h.ft.type_info[t1]) == L1T | VALID | 1
    assert int(h.ft.count_info[data]) == ALLOC | 2
    assert int(h.ft.type_info[data]) == WRT | VALID | 1
    ok(h)
    # a second link to the same L1: only counts change
    assert upd(u.hc, t2, 1, pte(t1, LINK)) == (0, 1)
    assert gen(h, t1) == 3 and tcnt(h, t1) == 2 and gen(h, data) == 2
    ok(h)
    # unlinking both devalidates the L1: the references its entries held are dropped,
    # the type field stays L1
    assert upd(u.hc, t2, 0, 0) == (0, 1)
    assert tcnt(h, t1) == 1 and gen(h, data) == 2
    assert upd(u.hc, t2, 1, 0) == (0, 1)
    assert int(h.ft.type_info[t1]) == L1T
    assert int(h.ft.count_info[t1]) == ALLOC | 1
    assert int(h.ft.count_info[data]) == ALLOC | 1 and tcnt(h, data) == 0
    ok(h)


def test_full_tree_pin_l4_validates_everything_and_unpin_releases_it(env):
    h, u = env
    t4, t3, t2, t1, data, ro = u.f[1], u.f[2], u.f[3], u.f[4], u.f[10], u.f[11]
    write(h, t4, {0: pte(t3, LINK)})
    write(h, t3, {0: pte(t2, LINK)})
    write(h, t2, {0: pte(t1, LINK)})
    write(h, t1, {0: pte(data, P | RW | US), 1: pte(ro, P | US), 2: pte(t1, P)})
    assert u.hc.mmuext_op([(PIN_L4, t4)]) == (0, 1)
    assert int(h.ft.type_info[t4]) == L4T | PINNED | VALID | 1
    assert int(h.ft.count_info[t4]) == ALLOC | 2
    for m, t in ((t3, L3T), (t2, L2T), (t1, L1T)):
        assert int(h.ft.type_info[m]) == t | VALID | 1
    assert int(h.ft.count_info[t3]) == ALLOC | 2 and int(h.ft.count_info[t2]) == ALLOC | 2
    assert int(h.ft.count_info[t1]) == ALLOC | 3  # L2 entry + its own RO self-mapping
    assert int(h.ft.count_info[data]) == ALLOC | 2 and int(h.ft.type_info[data]) == WRT | VALID | 1
    assert int(h.ft.count_info[ro]) == ALLOC | 2 and tcnt(h, ro) == 0
    # Xen's private L4 slots were filled, the linear slot pointing at the L4 itself
    assert int(h.ft.read_page(t4)[258]) >> 12 == t4
    ok(h)
    assert u.hc.mmuext_op([(UNPIN, t4)]) == (0, 1)
    for m, t in ((t4, L4T), (t3, L3T), (t2, L2T), (t1, L1T)):
        assert int(h.ft.type_info[m]) == t, hex(int(h.ft.type_info[m]))
        assert int(h.ft.count_info[m]) == ALLOC | 1
    assert int(h.ft.count_info[data]) == ALLOC | 1 and int(h.ft.count_info[ro]) == ALLOC | 1
    ok(h)


def test_l3_and_l4_links_take_type_refs_of_the_level_below(env):
    h, u = env
    t4, t3, t2 = u.f[1], u.f[2], u.f[3]
    write(h, t4, {})
    write(h, t3, {})
    write(h, t2, {})
    u.hc.mmuext_op([(PIN_L4, t4)])
    assert upd(u.hc, t4, 0, pte(t3, LINK)) == (0, 1)
    assert int(h.ft.type_info[t3]) == L3T | VALID | 1 and gen(h, t3) == 2
    assert upd(u.hc, t3, 7, pte(t2, LINK)) == (0, 1)
    assert int(h.ft.type_info[t2]) == L2T | VALID | 1 and gen(h, t2) == 2
    ok(h)
    # Xen adds USER to L2/L3 entries and ACCESSED|USER to L4 entries
    assert int(h.ft.read_page(t4)[0]) & (A | US) == A | US
    # dropping the L4 link devalidates t3, which drops its link to t2
    assert upd(u.hc, t4, 0, 0) == (0, 1)
    assert int(h.ft.type_info[t3]) == L3T and int(h.ft.type_info[t2]) == L2T
    assert gen(h, t3) == 1 and gen(h, t2) == 1
    ok(h)


def test_link_to_a_frame_of_the_wrong_type_fails_and_changes_nothing(env):
    h, u = env
    t2, t1, data = u.f[1], u.f[2], u.f[10]
    write(h, t2, {})
    write(h, t1, {0: pte(data, P | RW)})
    u.hc.mmuext_op([(PIN_L2, t2), (PIN_L1, t1)])
    # an L2 entry must point at an L1, not at an L2 (read-write: not a linear mapping)
    other2 = u.f[3]
    write(h, other2, {})
    u.hc.mmuext_op([(PIN_L2, other2)])
    snap = (h.ft.count_info.copy(), h.ft.type_info.copy())
    assert upd(u.hc, t2, 0, pte(other2, LINK)) == (EINVAL, 0)
    # an L2 entry pointing at a frame mapped writable somewhere
    assert upd(u.hc, t2, 0, pte(data, LINK)) == (EINVAL, 0)
    assert np.array_equal(snap[0], h.ft.count_info.copy()) and np.array_equal(snap[1], h.ft.type_info)
    ok(h)


def test_validation_error_of_a_lower_table_is_returned(env):
    """get_page_from_l2e returns what validating the L1 returned: -EBUSY when the L1 maps
    another domain's frame."""
    h, u = env
    v = Dom(h, 16, "v")
    t2, t1 = u.f[1], u.f[2]
    write(h, t2, {})
    write(h, t1, {0: pte(v.f[3], P)})
    u.hc.mmuext_op([(PIN_L2, t2)])
    assert upd(u.hc, t2, 0, pte(t1, LINK)) == (EBUSY, 0)
    assert int(h.ft.type_info[t1]) == 0 and int(h.ft.count_info[t1]) == ALLOC | 1
    ok(h)


# -- pins -------------------------------------------------------------------------------------

def test_pin_and_unpin_counts_and_errors(env):
    h, u = env
    t1 = u.f[1]
    write(h, t1, {0: pte(u.f[10], P)})
    assert u.hc.mmuext_op([(PIN_L1, t1)]) == (0, 1)
    assert int(h.ft.count_info[t1]) == ALLOC | 2
    assert int(h.ft.type_info[t1]) == L1T | PINNED | VALID | 1
    ok(h)
    snap = (h.ft.count_info.copy(), h.ft.type_info.copy())
    assert u.hc.mmuext_op([(PIN_L1, t1)]) == (EINVAL, 0)  # already pinned
    assert u.hc.mmuext_op([(PIN_L2, t1)]) == (EINVAL, 0)  # in use as another type
    assert np.array_equal(snap[0], h.ft.count_info.copy()) and np.array_equal(snap[1], h.ft.type_info)
    ok(h)
    assert u.hc.mmuext_op([(UNPIN, t1)]) == (0, 1)
    assert int(h.ft.count_info[t1]) == ALLOC | 1 and int(h.ft.type_info[t1]) == L1T
    assert int(h.ft.count_info[u.f[10]]) == ALLOC | 1
    assert u.hc.mmuext_op([(UNPIN, t1)]) == (EINVAL, 0)  # not pinned
    ok(h)


def test_pin_of_a_frame_that_is_not_the_callers(env):
    h, u = env
    v = Dom(h, 16, "v")
    write(h, v.f[1], {})
    assert u.hc.mmuext_op([(PIN_L1, v.f[1])]) == (EINVAL, 0)
    free = h.heap.chunks()[0][0]
    assert u.hc.mmuext_op([(PIN_L1, free)]) == (EINVAL, 0)
    assert u.hc.mmuext_op([(UNPIN, v.f[1])]) == (EINVAL, 0)
    # naming another domain as the owner needs privilege over it
    assert u.hc.mmuext_op([(PIN_L1, v.f[1])], v.id) == (EPERM, 0)
    assert u.hc.mmuext_op([(PIN_L1, u.f[1])], u.id) == (ESRCH, 0)  # itself by id
    ok(h)


def test_dom0_pins_a_guest_table_with_foreigndom(env):
    h, u = env
    t1 = u.f[1]
    write(h, t1, {0: pte(u.f[10], P | RW)})
    dom0 = h.hypercalls(0)
    assert dom0.mmuext_op([(PIN_L1, t1)], u.id) == (0, 1)
    assert int(h.ft.type_info[t1]) == L1T | PINNED | VALID | 1
    assert dom0.mmuext_op([(PIN_L1, t1)]) == (EINVAL, 0)  # not dom0's frame
    assert dom0.mmuext_op([(UNPIN, t1)], u.id) == (0, 1)
    ok(h)


def test_a_page_mapped_writable_cannot_be_pinned_and_pinned_one_not_mapped_writable(env):
    h, u = env
    t1, other = u.f[1], u.f[2]
    write(h, t1, {0: pte(other, P | RW)})
    u.hc.mmuext_op([(PIN_L1, t1)])
    write(h, other, {})  # (other is writable-typed now; its content is irrelevant)
    assert u.hc.mmuext_op([(PIN_L1, other)]) == (EINVAL, 0)
    ok(h)
    t1b = u.f[3]
    write(h, t1b, {})
    u.hc.mmuext_op([(PIN_L1, t1b)])
    assert upd(u.hc, t1, 1, pte(t1b, P | RW)) == (EBUSY, 0)
    assert upd(u.hc, t1, 1, pte(t1b, P)) == (0, 1)
    ok(h)


# -- vCPU root tables -------------------------------------------------------------------------

def test_new_baseptr_moves_a_general_and_an_l4_type_reference(env):
    h, u = env
    a, b = u.f[1], u.f[2]
    write(h, a, {})
    write(h, b, {})
    assert u.hc.mmuext_op([(NEW_BASEPTR, a)]) == (0, 1)
    assert int(h.ft.count_info[a]) == ALLOC | 2 and int(h.ft.type_info[a]) == L4T | VALID | 1
    assert h.domains[u.id].guest_table[0] == a
    ok(h)
    assert u.hc.mmuext_op([(NEW_BASEPTR, a)]) == (0, 1)  # the same root again: no change
    assert gen(h, a) == 2 and tcnt(h, a) == 1
    assert u.hc.mmuext_op([(NEW_BASEPTR, b)]) == (0, 1)
    assert int(h.ft.count_info[a]) == ALLOC | 1 and int(h.ft.type_info[a]) == L4T
    assert int(h.ft.type_info[b]) == L4T | VALID | 1
    ok(h)
    assert u.hc.mmuext_op([(NEW_USER_BASEPTR, a)]) == (0, 1)
    assert int(h.ft.type_info[a]) == L4T | VALID | 1 and h.domains[u.id].guest_table_user[0] == a
    assert u.hc.mmuext_op([(NEW_USER_BASEPTR, 0)]) == (0, 1)  # 0 clears the user root
    assert int(h.ft.type_info[a]) == L4T and h.domains[u.id].guest_table_user[0] == 0
    ok(h)


def test_new_baseptr_errors(env):
    h, u = env
    v = Dom(h, 16, "v")
    data, t1 = u.f[10], u.f[1]
    write(h, t1, {0: pte(data, P | RW)})
    u.hc.mmuext_op([(PIN_L1, t1)])
    assert u.hc.mmuext_op([(NEW_BASEPTR, data)]) == (EINVAL, 0)  # writable in use
    assert u.hc.mmuext_op([(NEW_BASEPTR, v.f[1])]) == (EINVAL, 0)  # not its frame
    assert h.hypercalls(0).mmuext_op([(NEW_BASEPTR, u.f[2])], u.id) == (EPERM, 0)
    assert h.domains[u.id].guest_table in ([], [0])
    ok(h)


def test_relinquish_on_destroy_frees_every_table_and_data_frame(env):
    h, u = env
    t4, t3, t2, t1 = u.f[1], u.f[2], u.f[3], u.f[4]
    write(h, t4, {0: pte(t3, LINK)})
    write(h, t3, {0: pte(t2, LINK)})
    write(h, t2, {0: pte(t1, LINK)})
    write(h, t1, {i: pte(u.f[10 + i], P | RW) for i in range(20)})
    u.hc.mmuext_op([(PIN_L4, t4), (NEW_BASEPTR, t4)])
    free0 = h.heap.free_pages
    h.destroy_domain(u.id)
    assert h.heap.free_pages == free0 + 64 + 1  # its frames and its shared_info
    ok(h)
