"""``memory_op`` sub-commands (``xen/include/public/memory.h``)."""

XENMEM_increase_reservation = 0
XENMEM_decrease_reservation = 1
XENMEM_maximum_ram_page = 2
XENMEM_current_reservation = 3
XENMEM_maximum_reservation = 4
XENMEM_machphys_mfn_list = 5
XENMEM_populate_physmap = 6
XENMEM_add_to_physmap = 7
XENMEM_exchange = 11
XENMEM_machphys_mapping = 12


def XENMEMF_address_bits(bits: int) -> int:
    """``mem_flags`` of a reservation: allocate below 2^bits bytes (0: anywhere)."""
    return bits & 0xFF


def XENMEMF_get_address_bits(flags: int) -> int:
    return flags & 0xFF

#: The M2P is mapped in 2 MiB chunks: each chunk holds 2^18 eight-byte entries.
M2P_SHIFT = 21
M2P_CHUNK_SIZE = 1 << M2P_SHIFT
M2P_ENTRIES_PER_CHUNK = M2P_CHUNK_SIZE // 8
