"""Xen 4.17's boot allocator and __start_xen's memory steps (hypervisor.bootmem, .start_xen)."""

from __future__ import annotations

from hypothesis import given, strategies as st

from xenpage.hypervisor.bootmem import BootAllocator
from xenpage.hypervisor.e820 import E820Map, MiB
from xenpage.hypervisor.start_xen import (XenBoot, boot_frames, frametable_blocks,
                                          init_heap_chunks, m2p_blocks)


def test_alloc_boot_pages_takes_the_top_of_the_highest_range_that_fits():
    ba = BootAllocator()
    ba.add(0x100, 0x69769)
    ba.add(0x7fda7, 0x7ffe0)
    # single frames: the top of the highest range, downwards
    assert [ba.alloc(1, 1) for _ in range(3)] == [0x7ffdf, 0x7ffde, 0x7ffdd]
    # an aligned 2 MiB block does not fit above the image: the range below, aligned down;
    # what lay above it stays free as a range of its own
    assert ba.alloc(512, 512) == 0x69400
    assert ba.regions == [[0x100, 0x69400], [0x69600, 0x69769], [0x7fda7, 0x7ffdd]]
    assert ba.alloc(512, 512) == 0x69200
    # end_boot_allocator: the lowest range first, then the others from the highest down
    assert ba.end_order() == [(0x100, 0x69200), (0x7fda7, 0x7ffdd), (0x69600, 0x69769)]


def test_zap_splits_a_range():
    ba = BootAllocator()
    ba.add(0x100, 0x1000)
    ba.zap(0x200, 0x300)
    ba.zap(0xF00, 0x2000)
    assert ba.regions == [[0x100, 0x200], [0x300, 0xF00]]


def test_the_frame_table_and_the_m2p_sizes():
    # 2 GiB: 0x7ffe0 page_infos of 32 bytes: eight 2 MiB blocks; the M2P: two 2 MiB blocks
    assert frametable_blocks(0x7FFE0) == [512] * 8
    assert m2p_blocks(0x7FFE0) == 2
    # 1 TiB: 8 GiB of frame table in 1 GiB steps where the CPU has 1 GiB pages
    assert frametable_blocks(1 << 28) == [1 << 18] * 8
    assert frametable_blocks(1 << 28, page1gb=False) == [512] * 4096
    # a step that would overshoot the end by more than 4 pages shrinks
    assert frametable_blocks(0x100) == [1, 1]


@given(st.integers(0, 1 << 20), st.integers(1, 1 << 16))
def test_init_heap_chunks_cover_the_range_with_aligned_chunks(s, n):
    e = s + n
    chunks = init_heap_chunks(s, e, 18)
    pos = max(s, 1)
    for head, order in chunks:
        assert head == pos and head % (1 << order) == 0 and order <= 18
        pos += 1 << order
    assert pos == max(e, 1)


def test_boot_frames_on_the_lab_machine_shape():
    """The lab's machine (QEMU -m 2048): the frame table below the dom0 kernel's module,
    the heap's ranges in end_boot_allocator's order."""
    e820 = E820Map.qemu_pc(2048 * MiB)
    xb = XenBoot(modules=[(0x69769, 0x6E5E1), (0x6E5E1, 0x7FA00)], boot_pagetables=5)
    bf = boot_frames(e820, (0x7FA00, 0x7FDA7), xb)
    assert bf.pagetables == [0x7FFDF, 0x7FFDE, 0x7FFDD, 0x7FFDC, 0x7FFDB]
    assert min(a for a, _ in bf.frametable) == 0x68600 and max(b for _, b in bf.frametable) == 0x69600
    assert bf.heap_ranges == [(0x100, 0x68600), (0x7FDA7, 0x7FFDB), (0x69600, 0x69769)]
