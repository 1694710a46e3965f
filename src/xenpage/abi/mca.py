"""Machine-check architecture: the MCi_STATUS / MCG_STATUS bits and memory-controller error
codes of the x86 MCA (Intel SDM vol. 3B ch. 16-17, as Xen's ``x86_mca.h`` and mcelog's
``mcelog.h`` name them), Xen's page-offline recovery action
(``xen/include/public/arch-x86/xen-mca.h``), and the record dom0 sees for each event (Linux's
``struct mce`` as ``/dev/mcelog`` hands it to mcelog, fed on Xen by ``XEN_MC_fetch``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

# -- IA32_MCi_STATUS ----------------------------------------------------------------------
MCI_STATUS_VAL = 1 << 63
MCI_STATUS_OVER = 1 << 62
MCI_STATUS_UC = 1 << 61
MCI_STATUS_EN = 1 << 60
MCI_STATUS_MISCV = 1 << 59
MCI_STATUS_ADDRV = 1 << 58
MCI_STATUS_PCC = 1 << 57
MCI_STATUS_S = 1 << 56
MCI_STATUS_AR = 1 << 55
#: corrected error count, bits 38..52 (mcelog adds 1 + this count to its page bucket)
MCI_STATUS_CEC_SHIFT = 38
MCI_STATUS_CEC_MASK = 0x7FFF << 38
#: model-specific error code (bits 16..31) and MCA error code (bits 0..15)
MCI_STATUS_MSCOD_SHIFT = 16
MCI_STATUS_MCACOD_MASK = 0xFFFF

# -- IA32_MCG_STATUS ----------------------------------------------------------------------
MCG_STATUS_RIPV = 1 << 0
MCG_STATUS_EIPV = 1 << 1
MCG_STATUS_MCIP = 1 << 2
MCG_STATUS_LMCE = 1 << 3

# -- IA32_MCi_MISC: address mode (Xen's intel_checkaddr wants a physical address) ----------
MCI_MISC_ADDR_LSB_MASK = 0x3F
MCI_MISC_ADDRMODE_SHIFT = 6
MCI_MISC_ADDRMODE_MASK = 0x7 << 6
MCI_MISC_PHYSMOD = 2 << 6
#: LSB 6 (a cache line), physical address mode -- what xen-mceinj injects (0x86)
MCI_MISC_PHYS_LINE = 0x86

# -- memory-controller MCA error codes: 0000 0000 1MMM CCCC ---------------------------------
MCACOD_MEMORY = 0x0080
MCACOD_MEM_GENERIC = 0x0
MCACOD_MEM_READ = 0x1
MCACOD_MEM_WRITE = 0x2
MCACOD_MEM_SCRUB = 0x4
MCACOD_CHANNEL_UNKNOWN = 0xF


def mcacod_memory(transaction: int, channel: int) -> int:
    """``1MMMCCCC``: a memory-controller error of ``transaction`` on ``channel`` (0xF:
    unspecified)."""
    return MCACOD_MEMORY | ((transaction & 7) << 4) | (channel & 0xF)


def is_memory_error(status: int) -> bool:
    """mcelog's ``test_prefix(7, status & 0xefff)``: bits 8..15 clear (12 ignored), bit 7 set."""
    return ((status & 0xEFFF) >> 7) == 1


#: Icelake-SP (i10nm) iMC MSCOD values (bits 16..23 when bits 24..31 are 0), as mcelog names them
I10NM_MSCOD_CORRECTED_READ = 0x80
I10NM_MSCOD_UNCORRECTED_READ = 0xA0
I10NM_MSCOD_CORRECTED_SCRUB = 0x08
I10NM_MSCOD_UNCORRECTED_SCRUB = 0x10


# -- xen-mca.h: the recovery action Xen records for a page it offlined ---------------------
MC_TYPE_GLOBAL = 0
MC_TYPE_BANK = 1
MC_TYPE_EXTENDED = 2
MC_TYPE_RECOVERY = 3
MC_ACTION_PAGE_OFFLINE = 1 << 0
MC_ACTION_CPU_OFFLINE = 1 << 1
MC_ACTION_CACHE_SHRINK = 1 << 2

#: mce_result of Xen's handlers (``xen/arch/x86/cpu/mcheck/mce.h``)
MCER_NOERROR = "noerror"
MCER_RECOVERED = "recovered"
MCER_CONTINUE = "continue"
MCER_RESET = "reset"


#: ``struct mce`` field widths (Linux's uapi ``asm/mce.h``, what xen-mcelog fills); the DRAM
#: location fields are decoded values, bounded at 32 bits
_FIELD_BITS = (("status", 64), ("addr", 64), ("misc", 64), ("mcgstatus", 64), ("mcgcap", 64),
               ("tsc", 64),
               ("cpu", 32), ("apicid", 32), ("bank", 8), ("socketid", 8), ("cpufamily", 32),
               ("cpumodel", 32), ("channel", 32), ("dimm", 32), ("rank", 32), ("bankgroup", 32),
               ("dram_bank", 32), ("row", 32), ("column", 32))
_LIMIT = {b: 1 << b for b in (8, 32, 64)}
_LOCATION_KEYS = ("socketid", "channel", "dimm", "rank", "bankgroup", "dram_bank", "row", "column")
#: x86's architectural limit on physical address width (CPUID 0x80000008 MAXPHYADDR)
MAX_PHYS_ADDR_BITS = 52


def _short(v: int) -> str:
    t = f"{v:#x}"
    return t if len(t) <= 24 else f"{t[:12]}...({v.bit_length()} bits)"


@dataclass
class McRecord:
    """One machine-check event as dom0 logs it (``struct mce``): bank registers, the CPU,
    time, and -- where the memory controller decodes it -- the DRAM location.  Fields that
    were absent in the source are ``None``."""

    status: int = 0
    addr: int | None = None
    misc: int | None = None
    mcgstatus: int = 0
    cpu: int = 0
    bank: int = 0
    time: float | None = None
    socketid: int | None = None
    apicid: int | None = None
    mcgcap: int | None = None
    cpuvendor: str | None = None
    cpufamily: int | None = None
    cpumodel: int | None = None
    # DRAM location (decoded by the memory controller / EDAC / mcelog), when known
    channel: int | None = None
    dimm: int | None = None
    rank: int | None = None
    bankgroup: int | None = None
    dram_bank: int | None = None
    row: int | None = None
    column: int | None = None
    #: the CPU's time stamp counter when the bank was read (``struct mce``'s ``tsc``), if known
    tsc: int | None = None
    #: the record's identity (:meth:`identity`), set by its source; empty: none can be given,
    #: and the record is never taken for another one
    ident: str = ""
    #: where it came from ("mcelog:/var/log/mcelog:12", "sim", ...) and the raw text
    source: str = ""
    raw: str = ""
    extra: dict = field(default_factory=dict)

    # -- derived ------------------------------------------------------------------------
    @property
    def valid(self) -> bool:
        return bool(self.status & MCI_STATUS_VAL)

    @property
    def uncorrected(self) -> bool:
        return bool(self.status & MCI_STATUS_UC)

    @property
    def corrected(self) -> bool:
        return not self.uncorrected

    @property
    def has_addr(self) -> bool:
        return bool(self.status & MCI_STATUS_ADDRV) and self.addr is not None

    @property
    def memory(self) -> bool:
        return is_memory_error(self.status)

    @property
    def corrected_count(self) -> int:
        return (self.status & MCI_STATUS_CEC_MASK) >> MCI_STATUS_CEC_SHIFT

    @property
    def mfn(self) -> int | None:
        return (self.addr >> 12) if self.has_addr else None

    def kind(self) -> str:
        """``ce`` (corrected), ``uc`` (uncorrected) or ``other`` (no address to act on)."""
        if not self.has_addr:
            return "other"
        return "uc" if self.uncorrected else "ce"

    def defect(self) -> str | None:
        """Why this record cannot be a machine check at all, or None: a field wider than
        ``struct mce`` holds it (MCA registers 64 bits, ``extcpu``/``apicid`` 32, ``bank``
        and ``socketid`` 8), an address past any x86 physical address (MAXPHYADDR <= 52), a
        time that is not a finite number of seconds, or a parse error of its text."""
        if self.extra.get("parse_error"):
            return str(self.extra["parse_error"])
        d = self.__dict__
        for k, bits in _FIELD_BITS:
            v = d[k]
            if v is not None and not 0 <= v < _LIMIT[bits]:
                return f"{k} {_short(v)} does not fit struct mce's {bits}-bit field"
        if self.addr is not None and self.addr >> MAX_PHYS_ADDR_BITS:
            return f"addr {_short(self.addr)} is beyond any physical address (2^{MAX_PHYS_ADDR_BITS})"
        if self.time is not None and not (math.isfinite(self.time) and 0 <= self.time < 2 ** 63):
            return f"time {self.time!r} is not a time"
        return None

    def identity(self) -> str:
        """What makes this machine check this one and no other: the bank registers as the
        CPU reported them (MCi_ADDR only when ADDRV says it is valid, MCi_MISC only when
        MISCV does), MCG_STATUS, the CPU, the bank, and when it happened -- the wall-clock
        second and the time stamp counter.  Empty when the record carries neither a time nor
        a TSC: two such records with the same registers may be two errors, and only their
        source's position can tell them apart."""
        t = int(self.time) if self.time is not None and math.isfinite(self.time) else 0
        tsc = self.tsc or 0
        if not t and not tsc:
            return ""
        st = self.status
        addr = self.addr if st & MCI_STATUS_ADDRV and self.addr is not None else ""
        misc = self.misc if st & MCI_STATUS_MISCV and self.misc is not None else ""
        # time first: identities of records arriving in order sort in order (the list's
        # index of them grows at its end)
        return (f"{t:011d}:{tsc:016x}:{self.cpu}:{self.bank}:{st:x}:"
                f"{addr if addr == '' else format(addr, 'x')}:"
                f"{misc if misc == '' else format(misc, 'x')}:{self.mcgstatus:x}")

    def location(self) -> dict:
        d = self.__dict__
        return {k: d[k] for k in _LOCATION_KEYS if d[k] is not None}

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("raw", None)
        d["kind"] = self.kind()
        d["mfn"] = self.mfn
        if self.addr is not None:
            d["addr_hex"] = f"{self.addr:#x}"
        d["status_hex"] = f"{self.status:#x}"
        return d
