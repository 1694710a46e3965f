"""``struct page_info`` bit layouts of Xen 4.17 x86-64 (``xen/arch/x86/include/asm/mm.h``).

Fields grow down from bit 63 (``PG_shift(i) = 64 - i``).
"""

# count_info
PGC_allocated = 1 << 63
PGC_xen_heap = 1 << 62
PGC_extra = 1 << 61
PGC_broken = 1 << 60
PGC_state_shift = 58
PGC_state = 3 << 58
PGC_state_inuse = 0 << 58
PGC_state_offlining = 1 << 58
PGC_state_offlined = 2 << 58
PGC_state_free = 3 << 58
PGC_need_scrub = 1 << 57
PGC_shadowed_pt = 1 << 56
PGC_count_mask = (1 << 56) - 1
#: Bits kept by assign_pages(): extra | need_scrub on x86 (state and broken are NOT kept).
PGC_preserved = PGC_extra | PGC_need_scrub

STATE_INUSE, STATE_OFFLINING, STATE_OFFLINED, STATE_FREE = 0, 1, 2, 3
STATE_NAMES = {STATE_INUSE: "inuse", STATE_OFFLINING: "offlining",
               STATE_OFFLINED: "offlined", STATE_FREE: "free"}

# type_info
PGT_type_mask = 7 << 61
PGT_none = 0 << 61
PGT_l1_page_table = 1 << 61
PGT_l2_page_table = 2 << 61
PGT_l3_page_table = 3 << 61
PGT_l4_page_table = 4 << 61
PGT_seg_desc_page = 5 << 61
PGT_shared_page = 6 << 61
PGT_writable_page = 7 << 61
PGT_locked = 1 << 60
PGT_pinned = 1 << 59
PGT_validated = 1 << 58
PGT_pae_xen_l2 = 1 << 57
PGT_partial = 1 << 56
PGT_non_coherent = 1 << 55
PGT_count_mask = (1 << 55) - 1

PGT_NAMES = {PGT_none: "none", PGT_l1_page_table: "l1", PGT_l2_page_table: "l2",
             PGT_l3_page_table: "l3", PGT_l4_page_table: "l4", PGT_seg_desc_page: "seg_desc",
             PGT_shared_page: "shared", PGT_writable_page: "writable"}


def pgt_level(level: int) -> int:
    """PGT type of an Ln page table (1..4)."""
    return level << 61


def level_of(type_info: int) -> int:
    """Page-table level (1..4) of a type_info, 0 when not a page-table type."""
    t = (type_info & PGT_type_mask) >> 61
    return t if 1 <= t <= 4 else 0

#: Largest buddy order of Xen's heap on x86 (``MAX_ORDER``, xen/include/asm-x86/config.h).
MAX_ORDER = 20
