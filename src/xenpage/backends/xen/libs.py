"""ctypes bindings of Debian's Xen 4.17 libraries, each function declared once.

Libraries (sonames from Debian bookworm's packages: libxenmisc4.17 ships libxenctrl and
libxenguest, the others have their own packages):

* ``libxenctrl.so.4.17``         domains, vCPU affinity, physinfo, page types, grant tables
* ``libxenguest.so.4.17``        page offline/online/query, ``xc_domain_resume``, ``xc_map_m2p``
                                 (these live in libxenguest, not libxenctrl)
* ``libxenforeignmemory.so.1``   foreign mappings
* ``libxencall.so.1``            raw hypercalls through hypercall buffers
* ``libxenstore.so.4``           xenstore
* ``libxentoollog.so.1``         the logger handed to the libraries

ctypes loads each library privately (``RTLD_LOCAL``); libxenguest finds libxenctrl through
its own DT_NEEDED entry, so the two share one copy.

:data:`PROTOTYPES` is the single table of every function used: its ctypes types and the C
prototype it must match.  ``tests/test_xen_abi.py`` compiles the C prototypes against
libxen-dev's headers (``__builtin_types_compatible_p``) and checks the ctypes widths, so a
declaration that drifts from the headers fails loudly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from ctypes import POINTER, c_char_p, c_int, c_longlong, c_size_t, c_uint, c_uint32, c_uint64, c_ulong, c_void_p
from dataclasses import dataclass

from . import structs as T

SONAMES = {
    "ctrl": "libxenctrl.so.4.17",
    "guest": "libxenguest.so.4.17",
    "fmem": "libxenforeignmemory.so.1",
    "call": "libxencall.so.1",
    "store": "libxenstore.so.4",
    "toollog": "libxentoollog.so.1",
}

c_bool = ctypes.c_bool
c_uint32_p = POINTER(c_uint32)
c_uint64_p = POINTER(c_uint64)
c_ulong_p = POINTER(c_ulong)
c_int_p = POINTER(c_int)
c_uint_p = POINTER(c_uint)


@dataclass(frozen=True)
class Proto:
    lib: str             # key of SONAMES
    name: str
    restype: object
    argtypes: tuple
    #: the C prototype as a function-pointer type; None for symbols without a public header
    c_type: str | None
    #: the C types of the arguments and result, for the width check (same order as argtypes)
    c_args: tuple = ()
    c_ret: str = "int"


def P(lib, name, restype, argtypes, c_ret, c_args, header=True):
    c_type = f"{c_ret} (*)({', '.join(c_args) or 'void'})" if header else None
    return Proto(lib, name, restype, tuple(argtypes), c_type, tuple(c_args), c_ret)


XCH = "xc_interface *"
PROTOTYPES: list[Proto] = [
    # -- libxentoollog
    P("toollog", "xtl_createlogger_stdiostream", c_void_p, [c_void_p, c_int, c_uint],
      "xentoollog_logger_stdiostream *", ["FILE *", "xentoollog_level", "unsigned"]),
    P("toollog", "xtl_logger_destroy", None, [c_void_p], "void", ["struct xentoollog_logger *"]),
    # -- libxenctrl
    P("ctrl", "xc_interface_open", c_void_p, [c_void_p, c_void_p, c_uint],
      XCH, ["xentoollog_logger *", "xentoollog_logger *", "unsigned"]),
    P("ctrl", "xc_interface_close", c_int, [c_void_p], "int", [XCH]),
    P("ctrl", "xc_version", c_int, [c_void_p, c_int, c_void_p], "int", [XCH, "int", "void *"]),
    P("ctrl", "xc_physinfo", c_int, [c_void_p, POINTER(T.XenSysctlPhysinfo)], "int", [XCH, "xc_physinfo_t *"]),
    P("ctrl", "xc_maximum_ram_page", c_int, [c_void_p, c_ulong_p], "int", [XCH, "unsigned long *"]),
    P("ctrl", "xc_kexec_get_range", c_int, [c_void_p, c_int, c_int, c_uint64_p, c_uint64_p],
      "int", [XCH, "int", "int", "uint64_t *", "uint64_t *"]),
    P("ctrl", "xc_domain_getinfolist", c_int, [c_void_p, c_uint32, c_uint, POINTER(T.XenDomctlGetDomainInfo)],
      "int", [XCH, "uint32_t", "unsigned int", "xc_domaininfo_t *"]),
    P("ctrl", "xc_domain_pause", c_int, [c_void_p, c_uint32], "int", [XCH, "uint32_t"]),
    P("ctrl", "xc_domain_unpause", c_int, [c_void_p, c_uint32], "int", [XCH, "uint32_t"]),
    P("ctrl", "xc_domain_destroy", c_int, [c_void_p, c_uint32], "int", [XCH, "uint32_t"]),
    P("ctrl", "xc_get_cpumap_size", c_int, [c_void_p], "int", [XCH]),
    P("ctrl", "xc_vcpu_getaffinity", c_int, [c_void_p, c_uint32, c_int, c_void_p, c_void_p, c_uint32],
      "int", [XCH, "uint32_t", "int", "xc_cpumap_t", "xc_cpumap_t", "uint32_t"]),
    P("ctrl", "xc_vcpu_setaffinity", c_int, [c_void_p, c_uint32, c_int, c_void_p, c_void_p, c_uint32],
      "int", [XCH, "uint32_t", "int", "xc_cpumap_t", "xc_cpumap_t", "uint32_t"]),
    P("ctrl", "xc_domain_get_guest_width", c_int, [c_void_p, c_uint32, c_uint_p],
      "int", [XCH, "uint32_t", "unsigned int *"]),
    # XEN_DOMCTL_getpageframeinfo3 in batches; exported by libxenctrl but declared only in its
    # private xc_private.h: int xc_get_pfn_type_batch(xc_interface *, uint32_t dom,
    # unsigned int num, xen_pfn_t *arr)
    P("ctrl", "xc_get_pfn_type_batch", c_int, [c_void_p, c_uint32, c_uint, c_uint64_p],
      "int", [XCH, "uint32_t", "unsigned int", "xen_pfn_t *"], header=False),
    # log-dirty (XEN_DOMCTL_shadow_op): on/off, and the dirty bitmap into a hypercall buffer
    P("ctrl", "xc_shadow_control", c_int, [c_void_p, c_uint32, c_uint, c_uint_p, c_uint],
      "int", [XCH, "uint32_t", "unsigned int", "unsigned int *", "unsigned int"]),
    P("ctrl", "xc_logdirty_control", c_longlong,
      [c_void_p, c_uint32, c_uint, POINTER(T.XcHypercallBuffer), c_ulong, c_uint, POINTER(T.XcShadowOpStats)],
      "long long", [XCH, "uint32_t", "unsigned int", "xc_hypercall_buffer_t *", "unsigned long",
                    "unsigned int", "xc_shadow_op_stats_t *"]),
    P("ctrl", "xc__hypercall_buffer_alloc_pages", c_void_p, [c_void_p, POINTER(T.XcHypercallBuffer), c_int],
      "void *", [XCH, "xc_hypercall_buffer_t *", "int"]),
    P("ctrl", "xc__hypercall_buffer_free_pages", None, [c_void_p, POINTER(T.XcHypercallBuffer), c_int],
      "void", [XCH, "xc_hypercall_buffer_t *", "int"]),
    P("ctrl", "xc_vcpu_getcontext", c_int, [c_void_p, c_uint32, c_uint32, c_void_p],
      "int", [XCH, "uint32_t", "uint32_t", "vcpu_guest_context_any_t *"]),
    # XENMEM_decrease_reservation / XENMEM_populate_physmap of another domain: the number of
    # extents done, or -1 with errno
    P("ctrl", "xc_domain_decrease_reservation", c_int, [c_void_p, c_uint32, c_ulong, c_uint, c_uint64_p],
      "int", [XCH, "uint32_t", "unsigned long", "unsigned int", "xen_pfn_t *"]),
    P("ctrl", "xc_domain_populate_physmap", c_int, [c_void_p, c_uint32, c_ulong, c_uint, c_uint, c_uint64_p],
      "int", [XCH, "uint32_t", "unsigned long", "unsigned int", "unsigned int", "xen_pfn_t *"]),
    P("ctrl", "xc_gnttab_get_version", c_int, [c_void_p, c_uint32], "int", [XCH, "uint32_t"]),
    P("ctrl", "xc_gnttab_map_table_v1", c_void_p, [c_void_p, c_uint32, c_int_p],
      "grant_entry_v1_t *", [XCH, "uint32_t", "int *"]),
    # -- libxenguest
    P("guest", "xc_mark_page_online", c_int, [c_void_p, c_ulong, c_ulong, c_uint32_p],
      "int", [XCH, "unsigned long", "unsigned long", "uint32_t *"]),
    P("guest", "xc_mark_page_offline", c_int, [c_void_p, c_ulong, c_ulong, c_uint32_p],
      "int", [XCH, "unsigned long", "unsigned long", "uint32_t *"]),
    P("guest", "xc_query_page_offline_status", c_int, [c_void_p, c_ulong, c_ulong, c_uint32_p],
      "int", [XCH, "unsigned long", "unsigned long", "uint32_t *"]),
    P("guest", "xc_domain_resume", c_int, [c_void_p, c_uint32, c_int], "int", [XCH, "uint32_t", "int"]),
    P("guest", "xc_map_m2p", c_void_p, [c_void_p, c_ulong, c_int, c_ulong_p],
      "xen_pfn_t *", [XCH, "unsigned long", "int", "unsigned long *"]),
    # only for side-by-side measurements of the stock tool (never used by xenpage itself)
    P("guest", "xc_exchange_page", c_int, [c_void_p, c_uint32, c_uint64], "int", [XCH, "uint32_t", "xen_pfn_t"]),
    # -- libxenforeignmemory
    P("fmem", "xenforeignmemory_open", c_void_p, [c_void_p, c_uint],
      "xenforeignmemory_handle *", ["struct xentoollog_logger *", "unsigned"]),
    P("fmem", "xenforeignmemory_close", c_int, [c_void_p], "int", ["xenforeignmemory_handle *"]),
    P("fmem", "xenforeignmemory_map", c_void_p, [c_void_p, c_uint32, c_int, c_size_t, c_uint64_p, c_int_p],
      "void *", ["xenforeignmemory_handle *", "uint32_t", "int", "size_t", "const xen_pfn_t *", "int *"]),
    P("fmem", "xenforeignmemory_unmap", c_int, [c_void_p, c_void_p, c_size_t],
      "int", ["xenforeignmemory_handle *", "void *", "size_t"]),
    # -- libxencall
    P("call", "xencall_open", c_void_p, [c_void_p, c_uint], "xencall_handle *",
      ["struct xentoollog_logger *", "unsigned"]),
    P("call", "xencall_close", c_int, [c_void_p], "int", ["xencall_handle *"]),
    P("call", "xencall_alloc_buffer", c_void_p, [c_void_p, c_size_t], "void *", ["xencall_handle *", "size_t"]),
    P("call", "xencall_free_buffer", None, [c_void_p, c_void_p], "void", ["xencall_handle *", "void *"]),
    P("call", "xencall_alloc_buffer_pages", c_void_p, [c_void_p, c_size_t], "void *",
      ["xencall_handle *", "size_t"]),
    P("call", "xencall_free_buffer_pages", None, [c_void_p, c_void_p, c_size_t], "void",
      ["xencall_handle *", "void *", "size_t"]),
    P("call", "xencall2", c_int, [c_void_p, c_uint, c_uint64, c_uint64], "int",
      ["xencall_handle *", "unsigned int", "uint64_t", "uint64_t"]),
    P("call", "xencall4", c_int, [c_void_p, c_uint, c_uint64, c_uint64, c_uint64, c_uint64], "int",
      ["xencall_handle *", "unsigned int", "uint64_t", "uint64_t", "uint64_t", "uint64_t"]),
    # -- libxenstore
    P("store", "xs_open", c_void_p, [c_ulong], "struct xs_handle *", ["unsigned long"]),
    P("store", "xs_close", None, [c_void_p], "void", ["struct xs_handle *"]),
    P("store", "xs_read", c_void_p, [c_void_p, c_uint32, c_char_p, c_uint_p], "void *",
      ["struct xs_handle *", "xs_transaction_t", "const char *", "unsigned int *"]),
    P("store", "xs_write", c_bool, [c_void_p, c_uint32, c_char_p, c_char_p, c_uint], "bool",
      ["struct xs_handle *", "xs_transaction_t", "const char *", "const void *", "unsigned int"]),
]

#: Headers the C side of the prototype table needs.
C_HEADERS = ["stdio.h", "stdbool.h", "xenctrl.h", "xenguest.h", "xenforeignmemory.h", "xencall.h",
             "xenstore.h", "xentoollog.h"]


class XenLibraryError(OSError):
    """A Xen library is missing or lacks a symbol."""


class Libs:
    """The loaded libraries, with every function of :data:`PROTOTYPES` typed."""

    def __init__(self, names: dict[str, str] | None = None):
        names = dict(SONAMES, **(names or {}))
        self.libs: dict[str, ctypes.CDLL] = {}
        for key in ("toollog", "ctrl", "guest", "fmem", "call", "store"):
            try:
                self.libs[key] = ctypes.CDLL(names[key], use_errno=True)
            except OSError as e:
                raise XenLibraryError(f"cannot load {names[key]} ({e}); is Xen 4.17's libxen "
                                      "runtime installed (libxenmisc4.17, libxencall1, "
                                      "libxenforeignmemory1, libxenstore4)?") from None
        for p in PROTOTYPES:
            try:
                fn = getattr(self.libs[p.lib], p.name)
            except AttributeError:
                raise XenLibraryError(f"{names[p.lib]} has no symbol {p.name}") from None
            fn.restype = p.restype
            fn.argtypes = list(p.argtypes)
            setattr(self, p.name, fn)
        self.libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self.libc.free.argtypes = [c_void_p]
        self.libc.free.restype = None
        self.libc.munmap.argtypes = [c_void_p, c_size_t]
        self.libc.munmap.restype = c_int

    def stderr(self) -> int:
        return c_void_p.in_dll(self.libc, "stderr").value


def errno() -> int:
    return ctypes.get_errno()


def clear_errno() -> None:
    ctypes.set_errno(0)


def neg_errno(default: int = 5) -> int:
    """The negative errno of the last failed call (EIO if the library left errno at 0)."""
    e = ctypes.get_errno()
    return -(e or default)


_LIBS: Libs | None = None


def load() -> Libs:
    global _LIBS
    if _LIBS is None:
        _LIBS = Libs()
    return _LIBS


def log_level() -> int:
    """xentoollog level for the libraries' own messages: ``$XENPAGE_XC_LOG`` = ``debug``,
    ``info``, ``error`` or ``none`` (default: critical only -- xenpage reports errors itself,
    as negative errnos turned into its own messages)."""
    return {"debug": T.XTL_DEBUG, "info": T.XTL_INFO, "error": T.XTL_ERROR, "warn": T.XTL_WARN,
            "none": T.XTL_NUM_LEVELS}.get(os.environ.get("XENPAGE_XC_LOG", "").lower(), T.XTL_CRITICAL)
