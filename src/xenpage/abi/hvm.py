"""HVM numbers: p2m types and EPT entry bits (``xen/arch/x86/include/asm/p2m.h``,
``asm/hvm/vmx/vmx.h``), shadow/log-dirty control (``public/domctl.h``), the migration stream's
record types (``tools/libs/guest/xg_sr_stream_format.h``) and the pre-copy policy of
``xg_sr_save.c``; plus xenpage's own extension (not a Xen 4.17 interface), named as such.
"""

# -- p2m_type_t (Xen 4.17) -----------------------------------------------------------------
p2m_ram_rw = 0
p2m_invalid = 1
p2m_ram_logdirty = 2
p2m_ram_ro = 3
p2m_mmio_dm = 4
p2m_mmio_direct = 5
p2m_populate_on_demand = 6
p2m_grant_map_rw = 7
p2m_grant_map_ro = 8
p2m_ram_paging_out = 9
p2m_ram_paged = 10
p2m_ram_paging_in = 11
p2m_ram_shared = 12
p2m_ram_broken = 13
p2m_map_foreign = 14
p2m_ioreq_server = 15

P2M_TYPE_NAMES = {
    p2m_ram_rw: "ram_rw", p2m_invalid: "invalid", p2m_ram_logdirty: "ram_logdirty",
    p2m_ram_ro: "ram_ro", p2m_mmio_dm: "mmio_dm", p2m_mmio_direct: "mmio_direct",
    p2m_populate_on_demand: "populate_on_demand", p2m_grant_map_rw: "grant_map_rw",
    p2m_grant_map_ro: "grant_map_ro", p2m_ram_paging_out: "ram_paging_out",
    p2m_ram_paged: "ram_paged", p2m_ram_paging_in: "ram_paging_in",
    p2m_ram_shared: "ram_shared", p2m_ram_broken: "ram_broken",
    p2m_map_foreign: "map_foreign", p2m_ioreq_server: "ioreq_server",
}

#: Types whose frame the guest can write (a logdirty entry faults first, then becomes ram_rw).
P2M_WRITABLE = (p2m_ram_rw, p2m_ram_logdirty)

# -- page orders of EPT leaf entries ------------------------------------------------------
PAGE_ORDER_4K = 0
PAGE_ORDER_2M = 9
PAGE_ORDER_1G = 18
EPT_LEVELS = 4
EPT_ENTRIES = 512

# -- ept_entry_t bits (``union ept_entry``) ------------------------------------------------
EPTE_R = 1 << 0
EPTE_W = 1 << 1
EPTE_X = 1 << 2
EPTE_EMT_SHIFT = 3          # 3 bits, memory type (6 = write-back)
EPTE_IPAT = 1 << 6
EPTE_SP = 1 << 7            # superpage (leaf above level 1)
EPTE_A = 1 << 8
EPTE_D = 1 << 9
EPTE_RECALC = 1 << 10
EPTE_MFN_SHIFT = 12
EPTE_MFN_MASK = ((1 << 40) - 1) << 12
EPTE_P2MT_SHIFT = 52        # ``sa_p2mt``: 6 bits of software-available p2m type
EPTE_P2MT_MASK = 0x3F << 52
MTRR_TYPE_WRBACK = 6

# -- XEN_DOMCTL_shadow_op (public/domctl.h) ------------------------------------------------
XEN_DOMCTL_SHADOW_OP_OFF = 0
XEN_DOMCTL_SHADOW_OP_ENABLE_TEST = 1
XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY = 2
XEN_DOMCTL_SHADOW_OP_CLEAN = 11
XEN_DOMCTL_SHADOW_OP_PEEK = 12
#: ``mode`` flag of CLEAN for the last round of a save (log-dirty may then stop tracking)
XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL = 1 << 0

# -- migration stream v3 record types (xg_sr_stream_format.h) ------------------------------
REC_TYPE_END = 0x00000000
REC_TYPE_PAGE_DATA = 0x00000001
REC_TYPE_X86_PV_INFO = 0x00000002
REC_TYPE_X86_PV_P2M_FRAMES = 0x00000003
REC_TYPE_X86_PV_VCPU_BASIC = 0x00000004
REC_TYPE_SHARED_INFO = 0x00000007
REC_TYPE_X86_TSC_INFO = 0x00000008
REC_TYPE_HVM_CONTEXT = 0x00000009
REC_TYPE_HVM_PARAMS = 0x0000000A
REC_TYPE_TOOLSTACK = 0x0000000B
REC_TYPE_STATIC_DATA_END = 0x00000010
REC_TYPE_X86_CPUID_POLICY = 0x00000011
#: libxl's own stream wraps libxc's and adds the device model's state
LIBXL_REC_EMULATOR_CONTEXT = 0x00000003

#: write_batch sends at most this many pfns per PAGE_DATA record (``MAX_BATCH_SIZE``)
MAX_BATCH_SIZE = 1024
#: bytes of a record header (type + length) and of a PAGE_DATA header (count + reserved)
REC_HEADER_BYTES = 8
PAGE_DATA_HEADER_BYTES = 8
#: each pfn of a PAGE_DATA record is a uint64 (type << 32 | pfn)
PAGE_DATA_PFN_BYTES = 8

# -- the pre-copy policy of xg_sr_save.c (``simple_precopy_policy``) -----------------------
SPP_MAX_ITERATIONS = 5
SPP_TARGET_DIRTY_COUNT = 50
XGS_POLICY_ABORT = -1
XGS_POLICY_CONTINUE_PRECOPY = 0
XGS_POLICY_STOP_AND_COPY = 1
