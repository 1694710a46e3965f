"""The E820 memory map and the frame-validity rules that depend on it.

Xen decides two things from it: whether a frame has a ``page_info`` at all (``mfn_valid``,
true below ``max_page`` in every 256 MiB PDX group that holds some RAM) and whether it is
conventional RAM (``page_is_ram_type(mfn, RAM_TYPE_CONVENTIONAL)``, which requires the
whole 4 KiB frame to lie inside an E820 RAM range).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..abi.xen import PAGE_SHIFT, PAGE_SIZE

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5
TYPE_NAMES = {E820_RAM: "RAM", E820_RESERVED: "RESERVED", E820_ACPI: "ACPI",
              E820_NVS: "ACPI NVS", E820_UNUSABLE: "UNUSABLE"}

#: ``PDX_GROUP_SHIFT`` = L2_PAGETABLE_SHIFT with a 32-byte page_info: one group is 2^16 frames.
PDX_GROUP_FRAMES_SHIFT = 16

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class E820Entry:
    start: int  # bytes, inclusive
    end: int    # bytes, exclusive
    type: int

    def to_json(self) -> dict:
        return {"start": f"0x{self.start:x}", "end": f"0x{self.end - 1:x}",
                "type": TYPE_NAMES.get(self.type, str(self.type))}


@dataclass
class E820Map:
    entries: list[E820Entry] = field(default_factory=list)

    @classmethod
    def qemu_pc(cls, mem_bytes: int) -> "E820Map":
        """The map QEMU's ``pc`` machine (SeaBIOS) gives a guest of ``mem_bytes`` RAM, as Xen
        4.17 printed it in the lab for ``-m 2048``: RAM below 640 KiB minus the EBDA, the BIOS
        area reserved, RAM from 1 MiB to the top of low memory minus 128 KiB (reserved), the
        BIOS flash below 4 GiB, memory above 3.5 GiB moved above 4 GiB, and the reserved
        window at 0xfd00000000."""
        if mem_bytes < 64 * MiB or mem_bytes % (2 * MiB):
            raise ValueError("memory size must be a multiple of 2 MiB and at least 64 MiB")
        # pc_init1: RAM of 3.5 GiB or more is split at 3 GiB (gigabyte_align); less stays low.
        low = mem_bytes if mem_bytes < 0xE0000000 else 0xC0000000
        high = mem_bytes - low
        ents = [
            E820Entry(0x0, 0x9FC00, E820_RAM),
            E820Entry(0x9FC00, 0xA0000, E820_RESERVED),
            E820Entry(0xF0000, 0x100000, E820_RESERVED),
            E820Entry(0x100000, low - 0x20000, E820_RAM),
            E820Entry(low - 0x20000, low, E820_RESERVED),
            E820Entry(0xFFFC0000, 0x100000000, E820_RESERVED),
        ]
        if high:
            ents.append(E820Entry(0x100000000, 0x100000000 + high, E820_RAM))
        ents.append(E820Entry(0xFD00000000, 0x10000000000, E820_RESERVED))
        return cls(sorted(ents, key=lambda e: e.start))

    def ram_frame_ranges(self) -> list[tuple[int, int]]:
        """[first, last+1) frame ranges fully covered by RAM entries."""
        out = []
        for e in self.entries:
            if e.type != E820_RAM:
                continue
            s = (e.start + PAGE_SIZE - 1) >> PAGE_SHIFT
            t = e.end >> PAGE_SHIFT
            if t > s:
                out.append((s, t))
        return out

    @property
    def max_page(self) -> int:
        """First frame past the last RAM frame (``max_page``, XENMEM_maximum_ram_page)."""
        return max(t for _, t in self.ram_frame_ranges())

    @property
    def lowmem_ram_end(self) -> int:
        """End (exclusive frame) of the highest RAM range below 4 GiB."""
        return max(t for s, t in self.ram_frame_ranges() if t <= (1 << 20))

    def ram_window(self, start: int, n: int) -> np.ndarray:
        """``page_is_ram_type(mfn, RAM_TYPE_CONVENTIONAL)`` for frames ``start .. start+n-1``."""
        m = np.zeros(n, dtype=bool)
        for s, t in self.ram_frame_ranges():
            a, b = max(s, start), min(t, start + n)
            if b > a:
                m[a - start:b - start] = True
        return m

    def valid_window(self, start: int, n: int) -> np.ndarray:
        """``mfn_valid`` for frames ``start .. start+n-1``: below max_page and inside a PDX
        group (2^16 frames) that holds some RAM (``__mfn_valid``, xen/arch/x86/x86_64/mm.c)."""
        v = np.zeros(n, dtype=bool)
        g = PDX_GROUP_FRAMES_SHIFT
        for s, t in self.ram_frame_ranges():
            gs, gt = (s >> g) << g, (((t - 1) >> g) + 1) << g
            a, b = max(gs, start), min(gt, start + n, self.max_page)
            if b > a:
                v[a - start:b - start] = True
        return v

    def is_ram(self, mfn: int) -> bool:
        return any(s <= mfn < t for s, t in self.ram_frame_ranges())

    def to_json(self) -> list[dict]:
        return [e.to_json() for e in self.entries]

    def to_state(self) -> list[list[int]]:
        return [[e.start, e.end, e.type] for e in self.entries]

    @classmethod
    def from_state(cls, rows: list[list[int]]) -> "E820Map":
        return cls([E820Entry(int(a), int(b), int(c)) for a, b, c in rows])
