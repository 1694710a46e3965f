"""Xen 4.17's boot-time allocator (``xen/common/page_alloc.c``, "BOOT-TIME ALLOCATOR").

Before the buddy heap exists, ``__start_xen`` hands RAM to a list of free frame ranges kept in
address order (``init_boot_pages`` -> ``bootmem_region_add``).  ``alloc_boot_pages`` walks that
list from its highest range down and takes the top of the first range the request fits in,
aligned down; what lay above the allocation in that range becomes a range of its own.
``end_boot_allocator`` then gives every range left to the heap: first the lowest non-empty one
(the boot CPU's node), then the others from the highest down.
"""

from __future__ import annotations


class BootAllocator:
    """``bootmem_region_list``: free [start, end) frame ranges in address order."""

    def __init__(self) -> None:
        self.regions: list[list[int]] = []

    def add(self, s: int, e: int) -> None:
        """``bootmem_region_add``: insert before the first range ending above ``s``."""
        if s >= e:
            return
        i = next((k for k, r in enumerate(self.regions) if s < r[1]), len(self.regions))
        if i < len(self.regions) and e > self.regions[i][0]:
            raise ValueError(f"boot range [{s:#x}, {e:#x}) overlaps {self.regions[i]}")
        self.regions.insert(i, [s, e])

    def zap(self, s: int, e: int) -> None:
        """``bootmem_region_zap``: take [s, e) out of the ranges (``badpage=``)."""
        for r in list(self.regions):
            if e <= r[0]:
                break
            if s >= r[1]:
                continue
            if s <= r[0]:
                r[0] = min(e, r[1])
            elif e >= r[1]:
                r[1] = s
            else:
                end = r[1]
                r[1] = s
                self.add(e, end)

    def alloc(self, nr: int, align: int = 1) -> int:
        """``alloc_boot_pages(nr, align)`` (a release build: no ``highmem_start`` special
        case): the first range from the top whose end, less ``nr`` and aligned down, is still
        inside it; the frames above the allocation stay free as a range of their own."""
        for r in reversed(self.regions):
            pg = (r[1] - nr) & ~(align - 1)
            if pg >= r[1] or pg < r[0]:
                continue
            end = r[1]
            r[1] = pg
            self.add(pg + nr, end)
            return pg
        raise MemoryError(f"alloc_boot_pages({nr}, {align}): no range fits")

    def end_order(self) -> list[tuple[int, int]]:
        """``end_boot_allocator``: the ranges in the order they go to the heap -- the lowest
        non-empty one first, then the rest from the highest down."""
        live = [(s, e) for s, e in self.regions if s < e]
        if not live:
            return []
        return [live[0]] + live[:0:-1]
