"""The machine under the simulated host: QEMU's E820 map as Xen 4.17 printed it in the lab,
``mfn_valid`` (PDX groups) and ``page_is_ram_type``, the ``page_info`` bit layout
(xen-semantics.md 2.1), the frame table's storage, and the layout Xen leaves at boot
(DOMID_IO's frames, Xen's relocated image and freed init region, Xen-heap and anonymous
allocations, dom0)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpage.abi import mm
from xenpage.abi.xen import DOMID_IO, INVALID_M2P_ENTRY
from xenpage.hypervisor.e820 import E820Map, MiB
from xenpage.hypervisor.frametable import FrameTable, expand_fingerprint

GiB = 1 << 30


# -- E820 -----------------------------------------------------------------------------------------

def test_lab_e820_for_2_gib():
    """xen-lab.md: RAM 0x0-0x9fbff and 0x100000-0x7ffdffff; reserved 0x9fc00-0x9ffff,
    0xf0000-0xfffff, 0x7ffe0000-0x7fffffff, 0xfffc0000-0xffffffff, 0xfd00000000-0xffffffffff;
    max_mfn 0x7ffe0."""
    e = E820Map.qemu_pc(2048 * MiB)
    assert [(x["start"], x["end"], x["type"]) for x in e.to_json()] == [
        ("0x0", "0x9fbff", "RAM"), ("0x9fc00", "0x9ffff", "RESERVED"),
        ("0xf0000", "0xfffff", "RESERVED"), ("0x100000", "0x7ffdffff", "RAM"),
        ("0x7ffe0000", "0x7fffffff", "RESERVED"), ("0xfffc0000", "0xffffffff", "RESERVED"),
        ("0xfd00000000", "0xffffffffff", "RESERVED")]
    assert e.max_page == 0x7FFE0
    assert e.ram_frame_ranges() == [(0, 0x9F), (0x100, 0x7FFE0)]
    assert E820Map.from_state(e.to_state()) == e


@pytest.mark.parametrize("mib,low_end,high", [
    (3072, 0xBFFE0, None),                  # all below 4 GiB
    (3583, None, None),                     # (not a multiple of 2 MiB: refused)
    (3584, 0xBFFE0, (0x100000, 0x120000)),  # 3.5 GiB: QEMU splits at 3 GiB (ram_size >= 3.5G)
    (4096, 0xBFFE0, (0x100000, 0x140000)),
    (256 * 1024, 0xBFFE0, (0x100000, 0x4040000)),
])
def test_qemu_ram_split(mib, low_end, high):
    if low_end is None:
        with pytest.raises(ValueError):
            E820Map.qemu_pc(mib * MiB)
        return
    e = E820Map.qemu_pc(mib * MiB)
    rr = e.ram_frame_ranges()
    assert rr[0] == (0, 0x9F) and rr[1] == (0x100, low_end)
    assert rr[2:] == ([high] if high else [])
    assert e.max_page == (high[1] if high else low_end)


def test_ram_adds_up():
    for mib in (64, 2048, 4096):
        e = E820Map.qemu_pc(mib * MiB)
        frames = sum(t - s for s, t in e.ram_frame_ranges())
        # everything but 0x9f000-0xfffff (the EBDA frame and the legacy hole) and the 128 KiB
        # SeaBIOS keeps at the top of low RAM
        assert frames == (mib * MiB >> 12) - 0x61 - 0x20


@pytest.mark.parametrize("mib", [0, 32, 63, 65, 2047])
def test_qemu_sizes_refused(mib):
    with pytest.raises(ValueError):
        E820Map.qemu_pc(mib * MiB)


def test_page_is_ram_needs_the_whole_frame():
    e = E820Map.qemu_pc(2048 * MiB)
    assert e.is_ram(0x9E) and not e.is_ram(0x9F)   # 0x9f000-0x9fbff RAM, 0x9fc00 reserved
    assert not e.is_ram(0xA0) and not e.is_ram(0xFF) and e.is_ram(0x100)
    assert e.is_ram(0x7FFDF) and not e.is_ram(0x7FFE0)
    w = e.ram_window(0x9C, 8)
    assert w.tolist() == [True, True, True, False, False, False, False, False]


def test_mfn_valid_follows_pdx_groups():
    e = E820Map.qemu_pc(4096 * MiB)
    v = lambda m: bool(e.valid_window(m, 1)[0])  # noqa: E731
    # below max_page, in a 256 MiB group (2^16 frames) that holds RAM
    assert v(0) and v(0xA0) and v(0xFF) and v(0x9F)
    assert v(0xBFFE0) and v(0xBFFFF)          # reserved, but the group has RAM
    assert not v(0xC0000) and not v(0xFFFFF)  # the PCI hole: groups without RAM
    assert v(0x100000) and v(0x13FFFF)
    assert not v(0x140000) and not v(0xFD00000)  # max_page and beyond
    w = e.valid_window(0xBFFFE, 4)
    assert w.tolist() == [True, True, False, False]
    # on the 2 GiB lab machine everything below max_page is valid, nothing above
    e2 = E820Map.qemu_pc(2048 * MiB)
    assert e2.valid_window(0, 0x7FFE0).all() and not e2.valid_window(0x7FFE0, 0x100).any()


# -- page_info bit layout (xen-semantics.md 2.1) --------------------------------------------------

def test_count_info_layout():
    assert mm.PGC_allocated == 0x8000000000000000
    assert mm.PGC_xen_heap == 0x4000000000000000
    assert mm.PGC_extra == 0x2000000000000000
    assert mm.PGC_broken == 0x1000000000000000
    assert mm.PGC_state == 0x0C00000000000000
    assert (mm.PGC_state_inuse, mm.PGC_state_offlining, mm.PGC_state_offlined, mm.PGC_state_free) \
        == (0, 0x0400000000000000, 0x0800000000000000, 0x0C00000000000000)
    assert mm.PGC_need_scrub == 0x0200000000000000
    assert mm.PGC_shadowed_pt == 0x0100000000000000
    assert mm.PGC_count_mask == 0x00FFFFFFFFFFFFFF
    assert mm.PGC_preserved == mm.PGC_extra | mm.PGC_need_scrub  # not state, not broken


# -- the frame table ---------------------------------------------------------------------------------

def test_frame_table_fields():
    ft = FrameTable(4096)
    assert ft.state(5) == mm.STATE_INUSE and ft.owner(5) is None
    ft.set_owner(5, 0)
    ft.set_owner(6, DOMID_IO)
    assert (ft.owner(5), ft.owner(6)) == (0, DOMID_IO)
    ft.set_owner(5, None)
    assert ft.owner(5) is None
    ft.set_state(np.array([7, 8]), mm.STATE_OFFLINED)
    ft.count_info[7] |= np.uint64(mm.PGC_broken | 3)
    ft.set_state(7, mm.STATE_FREE)
    assert ft.state(7) == mm.STATE_FREE and ft.count(7) == mm.PGC_broken | mm.PGC_state_free | 3
    assert ft.states(6, 3).tolist() == [0, 3, 2]


def test_m2p_invalid_by_default():
    ft = FrameTable(1024)
    assert ft.m2p(3) == INVALID_M2P_ENTRY
    ft.set_m2p(3, 0)
    ft.set_m2p(slice(10, 13), np.array([7, 8, INVALID_M2P_ENTRY], dtype=np.uint64))
    assert ft.m2p(3) == 0 and [ft.m2p(m) for m in (10, 11, 12)] == [7, 8, INVALID_M2P_ENTRY]
    assert ft.m2p_array(np.array([3, 4, 11])).tolist() == [0, INVALID_M2P_ENTRY, 8]
    ft.set_m2p(3, -1)
    assert ft.m2p(3) == INVALID_M2P_ENTRY


def test_page_content_stays_compact_until_it_cannot():
    ft = FrameTable(64)
    ft.set_fingerprint(4, 0x1234)
    assert np.array_equal(ft.read_page(4), expand_fingerprint(0x1234))
    assert ft.fingerprint(4) == 0x1234 and not ft.pages
    ft.write_page(5, expand_fingerprint(0x99))
    assert not ft.pages and ft.fingerprint(5) == 0x99
    words = np.arange(512, dtype=np.uint64)
    ft.write_page(6, words)
    assert 6 in ft.pages and np.array_equal(ft.read_page(6), words)
    ft.read_page(6)[0] = 7  # a copy
    assert ft.read_page(6)[0] == 0
    t = ft.table(7)
    t[3] = 0xABC
    assert ft.read_page(7)[3] == 0xABC
    ft.set_fingerprint(np.array([6, 7]), 0)
    assert not ft.pages


def test_frame_table_arrays_round_trip():
    ft = FrameTable(256)
    ft.count_info[3] = np.uint64(mm.PGC_allocated | 1)
    ft.set_owner(3, 1)
    ft.set_m2p(3, 9)
    ft.write_page(4, np.arange(512, dtype=np.uint64))
    back = FrameTable.from_arrays(256, {k: v.copy() for k, v in ft.to_arrays().items()})
    for f in FrameTable.FIELDS:
        assert np.array_equal(getattr(back, f), getattr(ft, f))
    assert back.pages.keys() == {4} and np.array_equal(back.pages[4], ft.pages[4])


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_free_frames_cost_no_count_memory():
    """count_info is stored as a byte of flags and state per frame and the count apart: a
    table whose every frame is free holds 1 byte a frame, not 8 (Xen's word has the state
    bits set in every free frame)."""
    ft = FrameTable(64 * GiB >> 12)
    every = np.ones(ft.nframes, dtype=bool)
    before = _rss()
    ft.set_count_info_where(every, mm.PGC_state_free)
    grew = _rss() - before
    assert ft.state(0) == ft.state(ft.nframes - 1) == mm.STATE_FREE
    assert ft.count(12345) == mm.PGC_state_free
    assert 15 * MiB < grew < 24 * MiB  # the 16 MiB of flags, not 128 MiB of words
    del ft


def test_a_written_frame_costs_a_page_not_a_huge_page():
    """One word written every 2 MiB of a frame-table array makes 4 KiB resident each, not
    a transparent huge page (numpy asks for those on large arrays)."""
    ft = FrameTable(64 * GiB >> 12)
    before = _rss()
    for f in FrameTable.FIELDS:
        a = getattr(ft, f)
        a[::(2 * MiB) // a.itemsize] = 1
    grew = _rss() - before  # 7 arrays, 472 words in all
    assert grew < 8 * MiB, grew
    del ft


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["set", "set_many", "or", "and", "add_at", "slice",
                                           "state", "where"]),
                          st.lists(st.integers(0, 31), min_size=1, max_size=6),
                          st.integers(0, 2**64 - 1)), max_size=25))
def test_count_info_reads_and_writes_xen_values(ops):
    """Whatever is written through ``ft.count_info`` (scalars, index arrays with repeats,
    slices, read-modify-write, ``add_at``) reads back as the same writes on one uint64 word
    per frame would, and the per-field views (state, flags, count) agree with it."""
    ft = FrameTable(32)
    ref = np.zeros(32, dtype=np.uint64)
    for op, idx, v in ops:
        i, many = idx[0], np.array(idx, dtype=np.int64)
        if op == "set":
            ft.count_info[i] = v
            ref[i] = v
        elif op == "set_many":
            vals = (np.uint64(v) >> np.arange(many.size, dtype=np.uint64))
            ft.count_info[many] = vals
            ref[many] = vals
        elif op == "or":
            ft.count_info[i] |= np.uint64(v)
            ref[i] |= np.uint64(v)
        elif op == "and":
            ft.count_info[many] &= np.uint64(v)
            ref[many] &= np.uint64(v)
        elif op == "add_at":
            if (ref[many] & np.uint64(mm.PGC_count_mask)).max() + many.size >= mm.PGC_count_mask:
                continue  # Xen checks the count before it would overflow into the flags
            ft.count_info.add_at(many, 1)
            np.add.at(ref, many, np.uint64(1))
        elif op == "slice":
            ft.count_info[i:i + 5] = np.uint64(v)
            ref[i:i + 5] = np.uint64(v)
        elif op == "state":
            ft.set_state(many, v & 3)
            ref[many] = (ref[many] & np.uint64(~mm.PGC_state & (2**64 - 1))) \
                | np.uint64((v & 3) << mm.PGC_state_shift)
        else:
            mask = np.zeros(32, dtype=bool)
            mask[many] = True
            ft.set_count_info_where(mask, v)
            ref[mask] = v
        assert np.array_equal(ft.count_info.copy(), ref)
    assert ft.states().tolist() == ((ref >> np.uint64(mm.PGC_state_shift)) & np.uint64(3)).tolist()
    assert np.array_equal(ft.counts(), ref & np.uint64(mm.PGC_count_mask))
    for flag in (mm.PGC_allocated, mm.PGC_xen_heap, mm.PGC_broken, mm.PGC_need_scrub):
        assert np.array_equal(ft.has_flag(flag), (ref & np.uint64(flag)) != 0)
    assert [ft.count(m) for m in range(32)] == ref.tolist()
    assert [ft.state(m) for m in range(32)] == ft.states_of(np.arange(32)).tolist()


def test_count_info_is_not_an_array_by_accident():
    ft = FrameTable(16)
    for misuse in (lambda: np.asarray(ft.count_info), lambda: ft.count_info == 0,
                   lambda: list(ft.count_info), lambda: ft.count_info & np.uint64(1)):
        with pytest.raises(TypeError):
            misuse()
    assert ft.count_info.copy().dtype == np.uint64 and len(ft.count_info) == 16


def test_untouched_frames_cost_no_memory():
    """np.zeros arrays are not resident until written: a 64 GiB frame table is cheap."""
    import resource
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ft = FrameTable(64 * GiB >> 12)
    ft.count_info[12345] = 1
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (after - before) * 1024 < 64 * MiB  # the arrays total 16 M x 35 B = 560 MiB
    del ft


# -- the layout at boot ------------------------------------------------------------------------------

def test_boot_layout_matches_the_lab(host):
    assert host.max_page == 0x7FFE0
    assert host.xen_phys_start == 0x7F800              # "New Xen image base address: 0x7f800000"
    assert (host.xen_image[0], host.xen_image[1] - 1) == (0x7FA00, 0x7FDA6)
    assert (host.xen_init[1] - host.xen_init[0]) * 4 == 656  # "Freed 656kB init memory"


def test_boot_domid_io_frames(host):
    # the first MiB and every valid non-RAM frame below max_page: shared with DOMID_IO
    valid = host.e820.valid_window(0, host.nframes)
    ram = host.e820.ram_window(0, host.nframes)
    io = valid & ~ram
    io[:0x100] = True
    idx = np.flatnonzero(io)
    assert (host.ft.owner1[idx] == DOMID_IO + 1).all()
    assert (host.ft.count_info[idx] == np.uint64(mm.PGC_allocated | 1)).all()
    assert (host.ft.type_info[idx] == np.uint64(mm.PGT_writable_page | mm.PGT_validated | 1)).all()
    assert not (host.ft.owner1[~io] == DOMID_IO + 1).any()


def test_boot_xen_allocations(host):
    for m in host.xenheap_internal:
        assert host.ft.count(m) == mm.PGC_xen_heap and host.ft.owner(m) is None
    for m in host.anonymous:
        assert host.ft.count(m) == 0 and host.ft.owner(m) is None and host.ft.state(m) == mm.STATE_INUSE
    xs, xe = host.xen_image
    i0, i1 = host.xen_init
    img = np.arange(xs, xe)
    outside_init = img[(img < i0) | (img >= i1)]
    # the image outside its freed init region is never in the heap
    assert (host.ft.states(xs, xe - xs)[(img < i0) | (img >= i1)] == mm.STATE_INUSE).all()
    assert all(host.ft.owner(int(m)) is None for m in outside_init[::37])
    # the freed init region went back to the heap: free or handed out since
    assert (host.ft.states(i0, i1 - i0) != mm.STATE_OFFLINED).all()


def test_boot_domains(host):
    for d in host.guest_domains():
        owned = host.owned_frames(d.domid)
        domheap = np.setdiff1d(owned, np.array(d.xenheap_pages, dtype=np.int64))
        assert domheap.size == d.tot_pages
        si = d.xenheap_pages[0]
        assert host.ft.count(si) & mm.PGC_xen_heap and host.ft.count(si) & mm.PGC_allocated
    d0 = host.domains[0]
    assert d0.privileged and d0.tot_pages == 1024 * 256
    # dom0's P2M and the M2P agree
    p2m = host.p2m[0]
    assert np.array_equal(host.ft.m2p_array(p2m.astype(np.int64)), np.arange(p2m.size, dtype=np.uint64))


def test_boot_free_frames_are_exactly_the_heap(host):
    st = host.ft.states(0, host.nframes)
    assert int((st == mm.STATE_FREE).sum()) == host.heap.free_pages
    assert not (st == mm.STATE_OFFLINED).any() and not (st == mm.STATE_OFFLINING).any()
    assert not ((host.ft.count_info.copy() & np.uint64(mm.PGC_broken)) != 0).any()
