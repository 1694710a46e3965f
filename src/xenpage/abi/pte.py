"""x86-64 page-table entry bits (``xen/arch/x86/include/asm/x86_64/page.h``)."""

_PAGE_PRESENT = 0x001
_PAGE_RW = 0x002
_PAGE_USER = 0x004
_PAGE_PWT = 0x008
_PAGE_PCD = 0x010
_PAGE_ACCESSED = 0x020
_PAGE_DIRTY = 0x040
_PAGE_PAT = 0x080  # in an L1 entry
_PAGE_PSE = 0x080  # in an L2/L3 entry
_PAGE_GLOBAL = 0x100
_PAGE_AVAIL = 0xE00
_PAGE_AVAIL0 = 0x200
_PAGE_AVAIL1 = 0x400
_PAGE_AVAIL2 = 0x800
#: Xen marks 64-bit PV kernel mappings with software bit 52.
_PAGE_GUEST_KERNEL = 1 << 52
_PAGE_AVAIL_HIGH = 0x7FF << 52
_PAGE_NX = 1 << 63

PADDR_BITS = 52
#: Frame field: bits 12..51 (40 bits).
PTE_FRAME_SHIFT = 12
PTE_FRAME_MASK = ((1 << 40) - 1) << 12
#: libxenguest's MFN_MASK_X86 for a 64-bit guest (applied after ">> 12").
MFN_MASK_X86 = (1 << 40) - 1
PTE_FLAGS_MASK = ~PTE_FRAME_MASK & 0xFFFFFFFFFFFFFFFF

L1_PAGETABLE_ENTRIES = 512
#: Flags a PV guest may set at any level (``BASE_DISALLOW_MASK`` complement), bits 0..11 and 52..63.
PV_ALLOWED_BASE = (_PAGE_PRESENT | _PAGE_RW | _PAGE_USER | _PAGE_ACCESSED | _PAGE_DIRTY
                   | _PAGE_AVAIL | _PAGE_AVAIL_HIGH | _PAGE_NX)
#: L1 also allows GLOBAL (cache attributes need I/O privilege).
PV_ALLOWED_L1 = PV_ALLOWED_BASE | _PAGE_GLOBAL
#: Bits whose change alone does not need new references (``l1e_has_changed`` whitelist).
L1_FASTPATH_BITS = (_PAGE_NX | _PAGE_AVAIL | _PAGE_AVAIL_HIGH | _PAGE_GLOBAL | _PAGE_DIRTY
                    | _PAGE_ACCESSED | _PAGE_USER)

FLAG_NAMES = [(_PAGE_PRESENT, "P"), (_PAGE_RW, "RW"), (_PAGE_USER, "US"), (_PAGE_PWT, "PWT"),
              (_PAGE_PCD, "PCD"), (_PAGE_ACCESSED, "A"), (_PAGE_DIRTY, "D"), (_PAGE_PSE, "PSE"),
              (_PAGE_GLOBAL, "G"), (_PAGE_AVAIL, "AVAIL"), (_PAGE_GUEST_KERNEL, "GK"),
              (_PAGE_NX, "NX")]


def pte_frame(pte: int) -> int:
    return (pte >> PTE_FRAME_SHIFT) & MFN_MASK_X86


def make_pte(frame: int, flags: int) -> int:
    return ((frame << PTE_FRAME_SHIFT) & PTE_FRAME_MASK) | (flags & PTE_FLAGS_MASK)


def flag_names(pte: int) -> str:
    return "|".join(n for b, n in FLAG_NAMES if pte & b) or "-"
