"""Where Xen 4.17 puts its own frames at boot (``__start_xen`` in ``xen/arch/x86/setup.c``).

The steps that decide it, in Xen's order:

1. RAM from 1 MiB up goes to the boot allocator (``init_boot_pages``), less Xen's image
   (``_stext`` .. ``__2M_rwdata_end``) and the multiboot modules, which Xen moved to the top
   of low memory below its image (``reserve_e820_ram``): the initrd highest, the dom0 kernel
   with its decompression headroom (``bzimage_headroom``) below it.  The first MiB never does.
2. Early page tables (``alloc_xen_pagetable`` while ``system_state`` is early boot) take
   single frames from the top of the highest boot range (``alloc_boot_pages(1, 1)``).
3. ``init_frametable`` maps the frame table in 2 MiB (or 1 GiB) pieces, each
   ``alloc_boot_pages(step, step)``: aligned blocks from the top of the highest range they
   fit in (``init_frametable_chunk``).
4. ``end_boot_allocator`` gives what is left to the heap (:mod:`.bootmem`), every chunk still
   to be scrubbed (``bootscrub=idle``: ``init_heap_pages`` frees with ``need_scrub`` before
   ``SYS_STATE_active``), so each goes to the tail of its list.
5. Heap allocations follow in boot order -- the boot CPU's stack (``cpu_alloc_stack``), the
   M2P (``paging_init``: one order-9 block per 2 MiB of table, shared read-only with the
   privileged domains as DOMID_XEN's in ``subarch_init_memory``), page tables, the console
   ring (``console_init_ring``), the other CPUs' stacks and areas, ... -- each by
   ``alloc_heap_pages``' rules (:class:`.page_alloc.Heap`: the highest zone, the smallest
   order, a dirty head passed over once above order 0).
6. dom0 is built; the dom0 kernel's module is freed (``discard_initial_images``: to be
   scrubbed); the idle CPU scrubs the heap; ``init_done`` frees the init region.

What the source does not fix for one machine -- how many early page tables, and the run of
small heap allocations (xmalloc pools, per-CPU pages, page tables) between the named ones --
is stated per machine in :class:`XenBoot`, as allocation sizes in boot order; where each of
them lands is the allocator's answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .bootmem import BootAllocator
from .e820 import E820Map

#: ``sizeof(struct page_info)`` on x86-64
PAGE_INFO_BYTES = 32
#: ``STACK_ORDER`` (x86-64: 8 pages per CPU stack)
STACK_ORDER = 3
#: ``PAGETABLE_ORDER``: one M2P block maps 2 MiB of table
M2P_ORDER = 9

#: what an allocation is, for the frame table (``offline_page``'s classes)
XENHEAP, ANONYMOUS, M2P, SHARED_INFO = "xenheap", "anonymous", "m2p", "shared_info"


@dataclass
class XenBoot:
    """The machine-specific inputs of :func:`boot_frames` (frames, [start, end))."""
    #: the multiboot modules where Xen moved them (dom0 kernel with headroom, initrd)
    modules: list[tuple[int, int]]
    #: ``alloc_boot_pages(1, 1)`` calls before the heap exists (early page tables)
    boot_pagetables: int
    #: heap allocations before dom0 is built, in order: (kind, order)
    before_dom0: list[tuple[str, int]] = field(default_factory=list)
    #: heap allocations after dom0 is built (its domain's Xen pages, the daemons' event
    #: channels, ...), in order
    after_dom0: list[tuple[str, int]] = field(default_factory=list)
    #: the CPU has 1 GiB pages (``cpu_has_page1gb``: the frame table's step)
    page1gb: bool = True
    #: a range inside the image given to the boot allocator (``efi_boot_mem_unused``: the
    #: unused ``ebmalloc`` area when Xen did not boot through EFI), if known
    ebmalloc_hole: tuple[int, int] | None = None


def frametable_blocks(max_page: int, page1gb: bool = True) -> list[int]:
    """``init_frametable`` / ``init_frametable_chunk`` for RAM that is one PDX run from frame
    0 to ``max_page``: the sizes in frames of the ``alloc_boot_pages(step, step)`` calls --
    1 GiB steps where aligned and the rest allows, else 2 MiB, a step shrunk while it would
    overshoot the table's end by more than 4 pages."""
    end = max_page * PAGE_INFO_BYTES
    s, out = 0, []
    while s < end:
        step = 1 << (18 if page1gb and not s & ((1 << 30) - 1) else 9)
        while step and s + (step << 12) > end + (4 << 12):
            step >>= 9
        out.append(step)
        s += step << 12
    return out


def m2p_blocks(max_page: int) -> int:
    """``paging_init``: 2 MiB blocks of the M2P (8 bytes an entry, ``max_page`` entries)."""
    return (max_page * 8 + (1 << 21) - 1) >> 21


def boot_ranges(e820: E820Map, image: tuple[int, int], xb: XenBoot) -> BootAllocator:
    """Step 1: the boot allocator's ranges."""
    ba = BootAllocator()
    for s, e in e820.ram_frame_ranges():
        ba.add(max(s, 0x100), e)
    ba.zap(*image)
    for s, e in xb.modules:
        ba.zap(s, e)
    if xb.ebmalloc_hole:
        ba.add(*xb.ebmalloc_hole)
    return ba


@dataclass
class BootFrames:
    """What steps 1-4 leave: Xen's boot-allocator frames and the heap's ranges in order."""
    pagetables: list[int]
    frametable: list[tuple[int, int]]
    heap_ranges: list[tuple[int, int]]


def boot_frames(e820: E820Map, image: tuple[int, int], xb: XenBoot) -> BootFrames:
    """Steps 1-4 of the module docstring."""
    ba = boot_ranges(e820, image, xb)
    pts = [ba.alloc(1, 1) for _ in range(xb.boot_pagetables)]
    ft = []
    for step in frametable_blocks(e820.max_page, xb.page1gb):
        m = ba.alloc(step, step)
        ft.append((m, m + step))
    return BootFrames(pagetables=pts, frametable=ft, heap_ranges=ba.end_order())


def init_heap_chunks(s: int, e: int, max_order: int) -> list[tuple[int, int]]:
    """``_init_heap_pages``: [s, e) as the largest aligned chunks, in address order (frame
    0 is kept out, ``init_heap_pages``)."""
    s = max(s, 1)
    out = []
    while s < e:
        order = min(max_order, (e - s).bit_length() - 1, (s & -s).bit_length() - 1)
        out.append((s, order))
        s += 1 << order
    return out
