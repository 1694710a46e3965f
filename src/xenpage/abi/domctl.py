"""Domain control numbers (``xen/include/public/domctl.h``)."""

# xen_domctl_getdomaininfo.flags
XEN_DOMINF_dying = 1 << 0
XEN_DOMINF_hvm_guest = 1 << 1
XEN_DOMINF_shutdown = 1 << 2
XEN_DOMINF_paused = 1 << 3
XEN_DOMINF_blocked = 1 << 4
XEN_DOMINF_running = 1 << 5
XEN_DOMINF_debugged = 1 << 6
XEN_DOMINF_xs_domain = 1 << 7
XEN_DOMINF_hap = 1 << 8
XEN_DOMINF_shutdownshift = 16
XEN_DOMINF_shutdownmask = 0xFF

# XEN_DOMCTL_setvcpuaffinity / getvcpuaffinity flags.
XEN_VCPUAFFINITY_HARD = 1 << 0
XEN_VCPUAFFINITY_SOFT = 1 << 1

#: getpageframeinfo3 takes at most this many frames per call.
GETPAGEFRAMEINFO3_MAX = 1024

# getpageframeinfo3 page types (XEN_DOMCTL_PFINFO_*).
XEN_DOMCTL_PFINFO_LTAB_SHIFT = 28
XEN_DOMCTL_PFINFO_NOTAB = 0x0 << 28
XEN_DOMCTL_PFINFO_L1TAB = 0x1 << 28
XEN_DOMCTL_PFINFO_L2TAB = 0x2 << 28
XEN_DOMCTL_PFINFO_L3TAB = 0x3 << 28
XEN_DOMCTL_PFINFO_L4TAB = 0x4 << 28
XEN_DOMCTL_PFINFO_LTABTYPE_MASK = 0x7 << 28
XEN_DOMCTL_PFINFO_LPINTAB = 0x8 << 28
XEN_DOMCTL_PFINFO_XTAB = 0xF << 28
XEN_DOMCTL_PFINFO_XALLOC = 0xE << 28
XEN_DOMCTL_PFINFO_BROKEN = 0xD << 28
XEN_DOMCTL_PFINFO_LTAB_MASK = 0xF << 28

PFINFO_NAMES = {
    XEN_DOMCTL_PFINFO_NOTAB: "NOTAB",
    XEN_DOMCTL_PFINFO_L1TAB: "L1TAB",
    XEN_DOMCTL_PFINFO_L2TAB: "L2TAB",
    XEN_DOMCTL_PFINFO_L3TAB: "L3TAB",
    XEN_DOMCTL_PFINFO_L4TAB: "L4TAB",
    XEN_DOMCTL_PFINFO_XTAB: "XTAB",
    XEN_DOMCTL_PFINFO_XALLOC: "XALLOC",
    XEN_DOMCTL_PFINFO_BROKEN: "BROKEN",
}


def pfinfo_name(t: int) -> str:
    """Readable page type, e.g. ``L1TAB|LPINTAB``."""
    if t in (XEN_DOMCTL_PFINFO_XTAB, XEN_DOMCTL_PFINFO_BROKEN, XEN_DOMCTL_PFINFO_XALLOC):
        return PFINFO_NAMES[t]
    base = PFINFO_NAMES.get(t & XEN_DOMCTL_PFINFO_LTABTYPE_MASK, hex(t))
    return base + ("|LPINTAB" if t & XEN_DOMCTL_PFINFO_LPINTAB else "")


def shutdown_reason(flags: int) -> int:
    return (flags >> XEN_DOMINF_shutdownshift) & XEN_DOMINF_shutdownmask
