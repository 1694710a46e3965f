"""``XEN_SYSCTL_page_offline_op`` (``xen/include/public/sysctl.h``)."""

XEN_SYSCTL_page_offline_op = 14

# op->cmd
sysctl_page_offline = 1
sysctl_page_online = 2
sysctl_query_page_offline = 3

# Result flags of offline/online, bits 0..7 (PG_OFFLINE_STATUS_MASK).
PG_OFFLINE_STATUS_MASK = 0xFF
PG_OFFLINE_INVALID = 0x01
PG_OFFLINE_OFFLINED = 0x02
PG_ONLINE_ONLINED = 0x02
PG_OFFLINE_PENDING = 0x04
PG_OFFLINE_FAILED = 0x08
PG_ONLINE_FAILED = 0x08
PG_OFFLINE_AGAIN = 0x10

# Qualifiers, bits 8..13.
PG_OFFLINE_MISC_MASK = 0xFF0
PG_OFFLINE_XENPAGE = 0x100
PG_OFFLINE_DOM0PAGE = 0x200
PG_OFFLINE_ANONYMOUS = 0x400
PG_OFFLINE_NOT_CONV_RAM = 0x800
PG_OFFLINE_OWNED = 0x1000
PG_OFFLINE_BROKEN = 0x2000
PG_ONLINE_BROKEN = 0x2000

PG_OFFLINE_OWNER_SHIFT = 16

# Query results (a separate namespace reusing the same numbers).
PG_OFFLINE_STATUS_OFFLINED = 0x2
PG_OFFLINE_STATUS_ONLINE = 0x4
PG_OFFLINE_STATUS_OFFLINE_PENDING = 0x8
PG_OFFLINE_STATUS_BROKEN = 0x10

#: What an untouched status slot reads: the hypervisor fills the array byte-wise with
#: PG_OFFLINE_INVALID before the loop (``XEN_SYSCTL_page_offline_op`` in sysctl.c).
STATUS_UNTOUCHED = 0x01010101

#: The range fields of the sysctl are 32-bit.
MFN_FIELD_MAX = 0xFFFFFFFF

OFFLINE_FLAG_NAMES = {
    PG_OFFLINE_INVALID: "INVALID",
    PG_OFFLINE_OFFLINED: "OFFLINED",
    PG_OFFLINE_PENDING: "PENDING",
    PG_OFFLINE_FAILED: "FAILED",
    PG_OFFLINE_AGAIN: "AGAIN",
    PG_OFFLINE_XENPAGE: "XENPAGE",
    PG_OFFLINE_DOM0PAGE: "DOM0PAGE",
    PG_OFFLINE_ANONYMOUS: "ANONYMOUS",
    PG_OFFLINE_NOT_CONV_RAM: "NOT_CONV_RAM",
    PG_OFFLINE_OWNED: "OWNED",
    PG_OFFLINE_BROKEN: "BROKEN",
}
ONLINE_FLAG_NAMES = {
    PG_OFFLINE_INVALID: "INVALID",
    PG_ONLINE_ONLINED: "ONLINED",
    PG_ONLINE_FAILED: "FAILED",
    PG_ONLINE_BROKEN: "BROKEN",
}
QUERY_FLAG_NAMES = {
    PG_OFFLINE_STATUS_OFFLINED: "OFFLINED",
    PG_OFFLINE_STATUS_ONLINE: "ONLINE",
    PG_OFFLINE_STATUS_OFFLINE_PENDING: "OFFLINE_PENDING",
    PG_OFFLINE_STATUS_BROKEN: "BROKEN",
}


#: the ``cmd`` that answered a status word, by name (the CLI's ``--json`` says which)
OP_NAMES = {sysctl_page_offline: "offline", sysctl_page_online: "online",
            sysctl_query_page_offline: "query"}


def decode(status: int, cmd: int = sysctl_page_offline) -> dict:
    """Decode one 32-bit status word into its named bits and owner field."""
    names = {sysctl_page_offline: OFFLINE_FLAG_NAMES, sysctl_page_online: ONLINE_FLAG_NAMES,
             sysctl_query_page_offline: QUERY_FLAG_NAMES}[cmd]
    low = status & 0xFFFF
    flags = [n for bit, n in sorted(names.items()) if low & bit]
    # one shape for every command's answer (the CLI's --json, every command): a query's
    # word has no owner field (None); ``untouched``: the slot Xen never wrote (0x01010101)
    return {"op": OP_NAMES[cmd], "status": status, "hex": f"0x{status:08x}", "flags": flags,
            "owner": status >> PG_OFFLINE_OWNER_SHIFT if cmd != sysctl_query_page_offline else None,
            "untouched": status == STATUS_UNTOUCHED}
