"""ctypes layouts of the Xen 4.17 x86-64 public structures the real-Xen backend passes to Xen
or reads from guest memory, each defined once.  Numbers come from :mod:`xenpage.abi`.

``tests/test_xen_abi.py`` compiles a program against libxen-dev's headers that prints the
``sizeof``/``offsetof`` of every structure in :data:`ABI_STRUCTS` (fields and nested members)
and compares them with these definitions, so an ABI mismatch fails loudly.
"""

from __future__ import annotations

import ctypes
from ctypes import Structure, Union, c_int, c_int8, c_size_t, c_uint, c_uint8, c_uint16, c_uint32, c_uint64, c_ulong, c_void_p

from ...abi import xen as X

xen_pfn_t = c_uint64       # x86: unsigned long
xen_ulong_t = c_ulong
domid_t = c_uint16
uint64_aligned_t = c_uint64

# xentoollog levels (xentoollog.h, enum xentoollog_level)
XTL_NONE, XTL_DEBUG, XTL_VERBOSE, XTL_DETAIL, XTL_PROGRESS, XTL_INFO, XTL_NOTICE, XTL_WARN, \
    XTL_ERROR, XTL_CRITICAL, XTL_NUM_LEVELS = range(11)
#: xenstore: no transaction
XBT_NULL = 0


class GuestHandle(Structure):
    """``XEN_GUEST_HANDLE(type)`` on x86: a struct holding one pointer."""
    _fields_ = [("p", c_void_p)]


# -- domctl / sysctl (through libxenctrl) ------------------------------------------------------

class XenArchDomainconfig(Structure):
    _c_name_ = "struct xen_arch_domainconfig"
    _fields_ = [("emulation_flags", c_uint32), ("misc_flags", c_uint32)]


class XenDomctlGetDomainInfo(Structure):
    """``struct xen_domctl_getdomaininfo`` == ``xc_domaininfo_t`` (domctl interface 0x15)."""
    _c_name_ = "xc_domaininfo_t"
    _fields_ = [
        ("domain", domid_t),
        ("pad1", c_uint16),
        ("flags", c_uint32),
        ("tot_pages", uint64_aligned_t),
        ("max_pages", uint64_aligned_t),
        ("outstanding_pages", uint64_aligned_t),
        ("shr_pages", uint64_aligned_t),
        ("paged_pages", uint64_aligned_t),
        ("shared_info_frame", uint64_aligned_t),
        ("cpu_time", uint64_aligned_t),
        ("nr_online_vcpus", c_uint32),
        ("max_vcpu_id", c_uint32),
        ("ssidref", c_uint32),
        ("handle", c_uint8 * 16),
        ("cpupool", c_uint32),
        ("gpaddr_bits", c_uint8),
        ("pad2", c_uint8 * 7),
        ("arch_config", XenArchDomainconfig),
    ]


class XcShadowOpStats(Structure):
    """``xc_shadow_op_stats_t`` (``struct xen_domctl_shadow_op_stats``): what the last
    log-dirty CLEAN/PEEK saw."""
    _c_name_ = "xc_shadow_op_stats_t"
    _fields_ = [("fault_count", c_uint32), ("dirty_count", c_uint32)]


class XcHypercallBuffer(Structure):
    """``xc_hypercall_buffer_t``: libxenctrl's handle of hypercall-safe memory (the dirty
    bitmap ``xc_logdirty_control`` fills); zeroed = ``DECLARE_HYPERCALL_BUFFER``."""
    _c_name_ = "xc_hypercall_buffer_t"
    _fields_ = [("hbuf", c_void_p), ("param_shadow", c_void_p), ("dir", c_int), ("ubuf", c_void_p),
                ("sz", c_size_t)]


class XenSysctlPhysinfo(Structure):
    """``struct xen_sysctl_physinfo`` == ``xc_physinfo_t``."""
    _c_name_ = "xc_physinfo_t"
    _fields_ = [
        ("threads_per_core", c_uint32),
        ("cores_per_socket", c_uint32),
        ("nr_cpus", c_uint32),
        ("max_cpu_id", c_uint32),
        ("nr_nodes", c_uint32),
        ("max_node_id", c_uint32),
        ("cpu_khz", c_uint32),
        ("capabilities", c_uint32),
        ("arch_capabilities", c_uint32),
        ("pad", c_uint32),
        ("total_pages", uint64_aligned_t),
        ("free_pages", uint64_aligned_t),
        ("scrub_pages", uint64_aligned_t),
        ("outstanding_pages", uint64_aligned_t),
        ("max_mfn", uint64_aligned_t),
        ("hw_cap", c_uint32 * 8),
    ]


# -- hypercalls issued directly (through libxencall's buffers) -------------------------------

class MmuUpdate(Structure):
    _c_name_ = "struct mmu_update"
    _fields_ = [("ptr", c_uint64), ("val", c_uint64)]


class _MmuextArg1(Union):
    _fields_ = [("mfn", xen_pfn_t), ("linear_addr", c_ulong)]


class _MmuextArg2(Union):
    _fields_ = [("nr_ents", c_uint), ("vcpumask", GuestHandle), ("src_mfn", xen_pfn_t)]


class MmuextOp(Structure):
    _c_name_ = "struct mmuext_op"
    _fields_ = [("cmd", c_uint), ("arg1", _MmuextArg1), ("arg2", _MmuextArg2)]


class XenMemoryReservation(Structure):
    _c_name_ = "struct xen_memory_reservation"
    _fields_ = [
        ("extent_start", GuestHandle),     # XEN_GUEST_HANDLE(xen_pfn_t)
        ("nr_extents", xen_ulong_t),
        ("extent_order", c_uint),
        ("mem_flags", c_uint),
        ("domid", domid_t),
    ]


class XenMemoryExchange(Structure):
    _c_name_ = "struct xen_memory_exchange"
    _c_fields_ = {"in_": "in"}
    _fields_ = [("in_", XenMemoryReservation), ("out", XenMemoryReservation),
                ("nr_exchanged", xen_ulong_t)]


# -- guest memory read through foreign mappings -------------------------------------------------

class GrantEntryV1(Structure):
    _c_name_ = "grant_entry_v1_t"
    _fields_ = [("flags", c_uint16), ("domid", domid_t), ("frame", c_uint32)]


class VcpuTimeInfo(Structure):
    _c_name_ = "struct vcpu_time_info"
    _fields_ = [("version", c_uint32), ("pad0", c_uint32), ("tsc_timestamp", c_uint64),
                ("system_time", c_uint64), ("tsc_to_system_mul", c_uint32), ("tsc_shift", c_int8),
                ("flags", c_uint8), ("pad1", c_uint8 * 2)]


class ArchVcpuInfo(Structure):
    _c_name_ = "struct arch_vcpu_info"
    _fields_ = [("cr2", c_ulong), ("pad", c_ulong)]


class VcpuInfo(Structure):
    _c_name_ = "struct vcpu_info"
    _fields_ = [("evtchn_upcall_pending", c_uint8), ("evtchn_upcall_mask", c_uint8),
                ("evtchn_pending_sel", xen_ulong_t), ("arch", ArchVcpuInfo), ("time", VcpuTimeInfo)]


class ArchSharedInfo(Structure):
    _c_name_ = "struct arch_shared_info"
    _fields_ = [
        ("max_pfn", c_ulong),
        ("pfn_to_mfn_frame_list_list", xen_pfn_t),
        ("nmi_reason", c_ulong),
        ("p2m_cr3", c_ulong),
        ("p2m_vaddr", c_ulong),
        ("p2m_generation", c_ulong),
    ]


class SharedInfo(Structure):
    _c_name_ = "struct shared_info"
    _fields_ = [
        ("vcpu_info", VcpuInfo * X.XEN_LEGACY_MAX_VCPUS),
        ("evtchn_pending", xen_ulong_t * 64),
        ("evtchn_mask", xen_ulong_t * 64),
        ("wc_version", c_uint32),
        ("wc_sec", c_uint32),
        ("wc_nsec", c_uint32),
        ("wc_sec_hi", c_uint32),
        ("arch", ArchSharedInfo),
    ]


class VcpuGuestContextX8664(Structure):
    """``vcpu_guest_context_x86_64_t`` (``xc_vcpu_getcontext`` of a 64-bit PV vCPU): only
    ``ctrlreg[3]`` (the vCPU's page-table base, an MFN shifted by 12) is read; the register
    file and trap table are kept opaque."""
    _c_name_ = "vcpu_guest_context_x86_64_t"
    _fields_ = [
        ("fpu_ctxt", c_uint8 * 512),
        ("flags", c_uint64),
        ("user_regs", c_uint8 * 200),        # struct cpu_user_regs_x86_64
        ("trap_ctxt", c_uint8 * (16 * 256)),  # struct trap_info_x86_64[256]
        ("ldt_base", c_uint64), ("ldt_ents", c_uint64),
        ("gdt_frames", c_uint64 * 16), ("gdt_ents", c_uint64),
        ("kernel_ss", c_uint64), ("kernel_sp", c_uint64),
        ("ctrlreg", c_uint64 * 8),
        ("debugreg", c_uint64 * 8),
        ("event_callback_eip", c_uint64), ("failsafe_callback_eip", c_uint64),
        ("syscall_callback_eip", c_uint64), ("vm_assist", c_uint64),
        ("fs_base", c_uint64), ("gs_base_kernel", c_uint64), ("gs_base_user", c_uint64),
    ]


#: ``vcpu_guest_context_any_t`` is a union of the x86_64 and x86_32 layouts; the 64-bit one is
#: the larger, checked by the ABI test against the union's own size.
VCPU_CONTEXT_ANY_SIZE = 5168


#: Every structure the ABI test checks against the C headers.
ABI_STRUCTS = [XcShadowOpStats, XcHypercallBuffer, XenArchDomainconfig, XenDomctlGetDomainInfo, XenSysctlPhysinfo, MmuUpdate, MmuextOp,
               XenMemoryReservation, XenMemoryExchange, GrantEntryV1, VcpuTimeInfo, ArchVcpuInfo,
               VcpuInfo, ArchSharedInfo, SharedInfo, VcpuGuestContextX8664]


def layout(cls) -> list[tuple[str, int, int]]:
    """``(C member designator, offset, size)`` of every member, nested structs and unions
    flattened (``arg1.mfn``, ``in.nr_extents``); arrays are checked as a whole."""
    out: list[tuple[str, int, int]] = []

    def walk(c, prefix: str, base: int):
        names = getattr(c, "_c_fields_", {})
        for name, typ in c._fields_:
            f = getattr(c, name)
            cname = prefix + names.get(name, name)
            out.append((cname, base + f.offset, f.size))
            if isinstance(typ, type) and issubclass(typ, (Structure, Union)) and typ is not GuestHandle:
                walk(typ, cname + ".", base + f.offset)

    walk(cls, "", 0)
    return out


def sizeof(cls) -> int:
    return ctypes.sizeof(cls)
