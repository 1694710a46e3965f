"""Core hypercall numbers and constants (``xen/include/public/xen.h``)."""

# Hypercall numbers.
HYPERVISOR_mmu_update = 1
HYPERVISOR_memory_op = 12
HYPERVISOR_grant_table_op = 20
HYPERVISOR_mmuext_op = 26
HYPERVISOR_sched_op = 29
HYPERVISOR_sysctl = 35
HYPERVISOR_domctl = 36
HYPERVISOR_kexec_op = 37

# Special domain ids.
DOMID_FIRST_RESERVED = 0x7FF0
DOMID_SELF = 0x7FF0
DOMID_IO = 0x7FF1
DOMID_XEN = 0x7FF2
DOMID_COW = 0x7FF3
DOMID_INVALID = 0x7FF4
DOMID_IDLE = 0x7FFF
DOMID_MASK = 0x7FFF

# mmu_update sub-commands (ptr & 7).
MMU_NORMAL_PT_UPDATE = 0
MMU_MACHPHYS_UPDATE = 1
MMU_PT_UPDATE_PRESERVE_AD = 2
MMU_PT_UPDATE_NO_TRANSLATE = 3
MMU_CMD_MASK = 7

# mmuext_op commands.
MMUEXT_PIN_L1_TABLE = 0
MMUEXT_PIN_L2_TABLE = 1
MMUEXT_PIN_L3_TABLE = 2
MMUEXT_PIN_L4_TABLE = 3
MMUEXT_UNPIN_TABLE = 4
MMUEXT_NEW_BASEPTR = 5
MMUEXT_TLB_FLUSH_LOCAL = 6
MMUEXT_NEW_USER_BASEPTR = 15

#: Feature flag advertising MMU_PT_UPDATE_PRESERVE_AD.
XENFEAT_mmu_pt_update_preserve_ad = 5

# SCHEDOP_shutdown reasons (sched.h).
SCHEDOP_shutdown = 2
SHUTDOWN_poweroff = 0
SHUTDOWN_reboot = 1
SHUTDOWN_suspend = 2
SHUTDOWN_crash = 3
SHUTDOWN_watchdog = 4
SHUTDOWN_soft_reset = 5
SHUTDOWN_NAMES = {0: "poweroff", 1: "reboot", 2: "suspend", 3: "crash", 4: "watchdog", 5: "soft_reset"}

#: ``INVALID_M2P_ENTRY`` (~0UL) and the "shared" marker (~0UL - 1).
INVALID_M2P_ENTRY = 0xFFFFFFFFFFFFFFFF
SHARED_M2P_ENTRY = 0xFFFFFFFFFFFFFFFE
INVALID_MFN = 0xFFFFFFFFFFFFFFFF

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# xen_version sub-commands (version.h).
XENVER_version = 0
XENVER_extraversion = 1
#: Xen's own command line (``xen_commandline_t``: char[1024])
XENVER_commandline = 9
XEN_COMMANDLINE_LEN = 1024

#: vcpu_info slots in shared_info (``XEN_LEGACY_MAX_VCPUS``, x86).
XEN_LEGACY_MAX_VCPUS = 32


def foreigndom(pg_owner: int, pt_owner: int | None = None) -> int:
    """The ``foreigndom`` argument of mmu_update: bits 15..0 name the owner of the data frames
    (FD), bits 31..16 hold ``pt_owner + 1`` when the page tables belong to a foreign domain
    (PFD); 0 there means "the caller's own tables" (``do_mmu_update``, xen/arch/x86/mm.c)."""
    if pt_owner is None:
        return pg_owner & 0xFFFF
    return (((pt_owner + 1) & 0xFFFF) << 16) | (pg_owner & 0xFFFF)


def split_foreigndom(fd: int) -> tuple[int, int | None]:
    """Inverse of :func:`foreigndom`: ``(pg_owner, pt_owner or None for the caller)``."""
    x = (fd >> 16) & 0xFFFF
    return fd & 0xFFFF, (x - 1 if x else None)
