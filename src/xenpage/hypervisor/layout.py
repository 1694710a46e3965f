"""A machine's boot layout, given rather than derived: what Xen 4.17 made of one real machine
at boot, so that a simulated host can be built frame for frame like it (``Host.boot`` with
``HostConfig.layout``).

The default simulated host derives its layout (``E820Map.qemu_pc``, Xen relocated to the top
of low memory, its image and freed init region at the offsets measured in the lab, dom0 and
Xen's own allocations from the heap).  What the simulator does not model from first
principles -- where Xen's boot allocator (``alloc_boot_pages``: the frame table, page tables,
per-CPU areas) and its first heap allocations put Xen's own frames, and where the dom0 builder
(``dom0_construct_pv``: its initrd frames kept, the rest in chunks) put dom0's -- a layout
states: ranges of frames per owner.  Every other RAM frame goes to the heap.

With ``xen_boot`` (:class:`.start_xen.XenBoot`) Xen's own frames are not given but derived:
the boot allocator, the frame table, the heap as ``end_boot_allocator`` leaves it, and Xen's
heap allocations in boot order, placed by the simulator's allocator; only dom0's frames stay
given.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .start_xen import XenBoot


@dataclass
class BootLayout:
    #: E820 entries as (start byte, end byte exclusive, type), as Xen hands them to dom0
    #: (``XENMEM_machine_memory_map``)
    e820: list[tuple[int, int, int]]
    #: ``xen_phys_start`` in frames ("New Xen image base address")
    xen_phys_start: int
    #: Xen's fixed image [first, end) in frames and ``_end - _start`` in bytes (``KEXEC_RANGE_MA_XEN``)
    image: tuple[int, int]
    image_bytes: int
    #: the init region Xen frees once it runs, [first, end) in frames
    init: tuple[int, int]
    #: frames dom0 owns from boot, as [first, end) ranges
    dom0: list[tuple[int, int]] = field(default_factory=list)
    #: Xen-heap frames Xen holds (``PGC_xen_heap``, no owner)
    xenheap: list[tuple[int, int]] = field(default_factory=list)
    #: frames in use with neither owner nor ``PGC_xen_heap`` (boot allocations, page tables)
    anonymous: list[tuple[int, int]] = field(default_factory=list)
    #: derive Xen's own frames instead (:mod:`.start_xen`): then ``xenheap`` and
    #: ``anonymous`` stay empty and the simulator's boot allocator and heap place them
    xen_boot: XenBoot | None = None
