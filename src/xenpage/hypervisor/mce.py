"""The simulated machine's memory errors: its DRAM, the machine-check banks that report an
error, and Xen's machine-check handler for memory errors.

* :class:`DramGeometry` -- how a machine address maps to socket / channel / DIMM / rank /
  bank group / bank / row / column on this machine (page-interleaved channels, 8 KiB rows:
  DDR4 x8, 1 KiB per device and 8 data devices per rank), and back.
* :func:`memory_error` -- what one memory error does to the machine: the bank registers an
  Icelake-SP (i10nm) memory controller latches (the record dom0 later fetches with
  ``XEN_MC_fetch``), and, for an uncorrected error, Xen's ``mc_memerr_dhandler``
  (``xen/arch/x86/cpu/mcheck/mcaction.c``): ``offline_page(mfn, broken=1)``, then for a frame
  still owned by a domain ``unmmap_broken_page`` and a vMCE -- which a PV domU cannot take
  (``-EOPNOTSUPP``), so Xen crashes it; dom0 and HAP HVM guests get the vMCE.
  A corrected error changes nothing in Xen: it is only logged.

The field-error statistics model that draws a year of such errors is the simulator's:
:mod:`xenpage.backends.sim.field`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..abi import mca as A
from ..abi import sysctl as S
from ..abi.xen import DOMID_FIRST_RESERVED, DOMID_XEN

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

PAGE_SHIFT = 12

#: CPUID of the simulated CPU: Intel family 6 model 0x6A (Icelake-SP, mcelog's "i10nm")
CPU_VENDOR = "Intel"
CPU_FAMILY = 6
CPU_MODEL = 0x6A
#: MCG_CAP: 0x1C banks, CMCI (bit 10), TES (11), SER (24), LMCE (27)
MCGCAP = 0x0000000008000C1C | (1 << 24)
#: the simulated CPUs' invariant TSC: 2 GHz, counting from the Unix epoch, so that a record's
#: TSC (what a bank read stamps it with, and what tells two reports of one time apart) follows
#: from its time
TSC_HZ = 2_000_000_000


@dataclass(frozen=True)
class DramLocation:
    socket: int
    channel: int
    dimm: int
    rank: int
    bankgroup: int
    bank: int
    row: int
    column: int

    def row_key(self) -> tuple:
        return (self.socket, self.channel, self.rank, self.bankgroup, self.bank, self.row)

    def bank_key(self) -> tuple:
        return (self.socket, self.channel, self.rank, self.bankgroup, self.bank)


@dataclass(frozen=True)
class DramGeometry:
    """Address map of the simulated machine's DRAM.

    Frames are interleaved page by page over all channels of all sockets; within a channel
    consecutive 8 KiB chunks rotate over the 16 banks (4 bank groups x 4 banks) of a rank,
    then rows advance, then ranks (two per DIMM), then DIMMs.  ``rank`` in a location is the
    rank number within the channel (as the i10nm MCi_MISC reports it)."""

    max_page: int
    sockets: int = 1
    channels: int = 2
    dimms: int = 2
    ranks: int = 2
    bankgroups: int = 4
    banks: int = 4
    row_frames: int = 2

    @property
    def nchan(self) -> int:
        return self.sockets * self.channels

    @property
    def nbanks(self) -> int:
        return self.bankgroups * self.banks

    @property
    def rows(self) -> int:
        per_chan = -(-self.max_page // self.nchan)
        chunks = -(-per_chan // self.row_frames)
        return max(1, -(-chunks // (self.nbanks * self.dimms * self.ranks)))

    @property
    def ndimms(self) -> int:
        return self.nchan * self.dimms

    def dimm_id(self, socket: int, channel: int, dimm: int) -> int:
        return (socket * self.channels + channel) * self.dimms + dimm

    def dimm_name(self, d: int) -> str:
        socket, rest = divmod(d, self.channels * self.dimms)
        channel, dimm = divmod(rest, self.dimms)
        return f"SOCKET:{socket} CHANNEL:{channel} DIMM:{dimm}"

    def decode(self, addr: int) -> DramLocation:
        """The DRAM location of machine address ``addr``."""
        mfn, off = addr >> PAGE_SHIFT, addr & 0xFFF
        ch_global = mfn % self.nchan
        local = mfn // self.nchan
        chunk, fir = divmod(local, self.row_frames)
        b = chunk % self.nbanks
        rest = chunk // self.nbanks
        row = rest % self.rows
        rank_ch = rest // self.rows
        return DramLocation(socket=ch_global // self.channels, channel=ch_global % self.channels,
                            dimm=rank_ch // self.ranks, rank=rank_ch, bankgroup=b % self.bankgroups,
                            bank=b // self.bankgroups, row=row, column=fir * 512 + off // 8)

    def decode_mfns(self, mfns: np.ndarray) -> dict[str, np.ndarray]:
        """:meth:`decode` of many frames (column of the first byte), vectorised."""
        mfns = np.asarray(mfns, dtype=np.int64)
        ch_global = mfns % self.nchan
        local = mfns // self.nchan
        chunk = local // self.row_frames
        rest = chunk // self.nbanks
        rank_ch = rest // self.rows
        return {"socket": ch_global // self.channels, "channel": ch_global % self.channels,
                "dimm": rank_ch // self.ranks, "rank": rank_ch,
                "bankgroup": (chunk % self.nbanks) % self.bankgroups,
                "bank": (chunk % self.nbanks) // self.bankgroups,
                "row": rest % self.rows, "dimm_id": (ch_global * self.dimms + rank_ch // self.ranks)}

    def encode(self, socket: int, channel: int, rank: int, bankgroup: int, bank: int, row: int,
               frame_in_row: int = 0) -> int:
        """The frame holding ``frame_in_row`` of a DRAM row (inverse of :meth:`decode`)."""
        b = bank * self.bankgroups + bankgroup
        chunk = (rank * self.rows + row) * self.nbanks + b
        local = chunk * self.row_frames + frame_in_row
        return local * self.nchan + socket * self.channels + channel

    def row_mfns(self, loc: DramLocation) -> list[int]:
        return [self.encode(loc.socket, loc.channel, loc.rank, loc.bankgroup, loc.bank, loc.row, f)
                for f in range(self.row_frames)]

    def mc_bank(self, channel: int) -> int:
        """The i10nm machine-check bank of a channel's iMC (13-15, 17-19, 21-23, 25-27)."""
        imc, ch = divmod(channel, 3)
        return 13 + 4 * imc + ch

    def misc(self, loc: DramLocation) -> int:
        """MCi_MISC as an i10nm iMC fills it: LSB 6, physical address mode, column (9..18,
        in units of 4), row (19..39), bank group (40..41, 44), bank (42..43), rank (56..58)."""
        col = (loc.column >> 2) & 0x3FF
        bg = loc.bankgroup
        return (A.MCI_MISC_PHYS_LINE | (col << 9) | ((loc.row & 0x1FFFFF) << 19)
                | ((bg & 3) << 40) | (((bg >> 2) & 1) << 44) | ((loc.bank & 3) << 42)
                | ((loc.rank & 7) << 56))


def default_geometry(host: "Host") -> DramGeometry:
    """The simulated machine's DRAM: one socket, two channels of two dual-rank DIMMs."""
    return DramGeometry(max_page=host.max_page)


# -- one error ----------------------------------------------------------------------------

@dataclass
class XenAction:
    """What Xen's machine-check handler did about an uncorrected memory error."""

    mfn: int
    rc: int = 0
    status: int = 0
    #: mce_result: recovered (offlined or contained by the owner's vMCE), continue, ...
    result: str = A.MCER_NOERROR
    owner: int | None = None
    #: offlined | pending | crashed | vmce | again | xen | failed | none (corrected error)
    effect: str = "none"
    log: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"mfn": self.mfn, "rc": self.rc, "status": self.status, "result": self.result,
                "owner": self.owner, "effect": self.effect, "log": list(self.log)}


def mc_memerr_dhandler(host: "Host", mfn: int) -> XenAction:
    """Xen 4.17's ``mc_memerr_dhandler`` for an uncorrected (SRAO/SRAR) memory error on
    ``mfn`` whose address the bank reported."""
    from .sysctl import machine_check_offline
    act = XenAction(mfn)
    rc, st = machine_check_offline(host, mfn)
    act.rc, act.status = rc, st
    if rc:
        act.effect = "failed"
        act.log.append(f"(XEN) MCE: Failed to offline page {mfn:x} for MCE error")
        host.log.extend(act.log)
        return act
    low = st & S.PG_OFFLINE_STATUS_MASK
    if st & S.PG_OFFLINE_OFFLINED:
        act.result, act.effect = A.MCER_RECOVERED, "offlined"
    elif st & S.PG_OFFLINE_AGAIN:
        # offline_page already crashed the owner of an already-broken frame
        act.result, act.effect = A.MCER_CONTINUE, "again"
    elif low & S.PG_OFFLINE_PENDING and st & S.PG_OFFLINE_OWNED:
        domid = st >> S.PG_OFFLINE_OWNER_SHIFT
        act.owner = domid
        act.log.append(f"(XEN) MCE: This error page is ownded by DOM {domid}")
        d = host.domains.get(domid)
        if domid == DOMID_XEN or domid >= DOMID_FIRST_RESERVED or d is None:
            act.effect = "xen"
        elif d.privileged:
            # dom0: "Always trust dom0's MCE handler"
            act.result, act.effect = A.MCER_RECOVERED, "vmce"
            act.log.append(f"(XEN) MCE: vMCE injected to DOM{domid}")
            d.guest.setdefault("vmce", []).append(mfn)
        elif d.hvm:
            # HAP HVM: unmmap_broken_page turns the gfn p2m_ram_broken, then inject_vmce
            from . import hvm as HVM
            from . import p2m as P2M
            gfn = P2M.unmmap_broken_page(host, domid, mfn)
            if gfn < 0:
                act.log.append(f"(XEN) Unmap broken memory {mfn:x} for DOM{domid} failed")
                host.crash(domid, "mc_memerr_dhandler (unmmap_broken_page failed)")
                act.effect = "crashed"
            else:
                HVM.inject_vmce(host, domid, gfn)
                act.result, act.effect = A.MCER_RECOVERED, "vmce"
                act.log.append(f"(XEN) MCE: vMCE injected to DOM{domid}")
        else:
            # unmmap_broken_page: !paging_mode_hap -> -EOPNOTSUPP -> vmce_failed
            act.log.append(f"(XEN) Unmap broken memory {mfn:x} for DOM{domid} failed")
            host.crash(domid, "mc_memerr_dhandler (vMCE to a PV guest)")
            act.effect = "crashed"
    elif st & S.PG_OFFLINE_XENPAGE:
        act.effect, act.owner = "xen", DOMID_XEN
    else:
        act.effect = "pending"
    host.log.extend(act.log)
    return act


def memory_error(host: "Host", geometry: DramGeometry, addr: int, uncorrected: bool = False,
                 count: int = 1, time: float | None = None, scrub: bool = False,
                 cpu: int = 0) -> tuple[A.McRecord, XenAction]:
    """One memory error at machine address ``addr`` (``count`` corrected errors coalesced in
    one report).  Returns the record dom0 fetches and what Xen did.  Raises ValueError for
    an address that is not RAM (DRAM errors happen in DRAM)."""
    mfn = addr >> PAGE_SHIFT
    if not (0 <= mfn < host.nframes) or not host.e820.is_ram(mfn):
        raise ValueError(f"address {addr:#x} (mfn {mfn:x}) is not RAM")
    loc = geometry.decode(addr)
    ch_in_imc = loc.channel % 3
    if uncorrected:
        mscod = A.I10NM_MSCOD_UNCORRECTED_SCRUB if scrub else A.I10NM_MSCOD_UNCORRECTED_READ
        status = (A.MCI_STATUS_VAL | A.MCI_STATUS_UC | A.MCI_STATUS_EN | A.MCI_STATUS_MISCV
                  | A.MCI_STATUS_ADDRV | A.MCI_STATUS_S)
        if not scrub:
            status |= A.MCI_STATUS_AR
        mcg = A.MCG_STATUS_MCIP | A.MCG_STATUS_RIPV
    else:
        mscod = A.I10NM_MSCOD_CORRECTED_SCRUB if scrub else A.I10NM_MSCOD_CORRECTED_READ
        status = A.MCI_STATUS_VAL | A.MCI_STATUS_EN | A.MCI_STATUS_MISCV | A.MCI_STATUS_ADDRV
        status |= (max(0, min(count - 1, 0x7FFF))) << A.MCI_STATUS_CEC_SHIFT
        mcg = 0
    trans = A.MCACOD_MEM_SCRUB if scrub else A.MCACOD_MEM_READ
    status |= (mscod << A.MCI_STATUS_MSCOD_SHIFT) | A.mcacod_memory(trans, ch_in_imc)
    rec = A.McRecord(status=status, addr=addr & ~0x3F, misc=geometry.misc(loc), mcgstatus=mcg,
                     cpu=cpu, bank=geometry.mc_bank(loc.channel), time=time, socketid=loc.socket,
                     apicid=cpu, mcgcap=MCGCAP, cpuvendor=CPU_VENDOR, cpufamily=CPU_FAMILY,
                     cpumodel=CPU_MODEL, channel=loc.channel, dimm=loc.dimm, rank=loc.rank,
                     bankgroup=loc.bankgroup, dram_bank=loc.bank, row=loc.row, column=loc.column,
                     tsc=int(round(time * TSC_HZ)) if time is not None else None, source="sim")
    if uncorrected:
        act = mc_memerr_dhandler(host, mfn)
    else:
        act = XenAction(mfn, effect="none")
        host.log.append(f"(XEN) MCE: The hardware reports a non fatal, correctable incident "
                        f"occurred on CPU {cpu}.")
    return rec, act


# -- Xen's badpage= boot option (xen/common/page_alloc.c, init_boot_pages) -----------------

#: ``static char __initdata opt_badpage[100]``: a longer value is cut to 99 characters
#: (``string_param``; the parser reports -E2BIG and keeps the truncated string).
BADPAGE_MAX_CHARS = 99


def simple_strtoul(s: str, i: int = 0, base: int = 0) -> tuple[int, int]:
    """Xen's ``simple_strtoul``: base 0 means ``0x`` hex, a leading ``0`` octal, else
    decimal; no blanks or sign; stops at the first character that is not a digit of the
    base.  Returns (value, index after the number)."""
    if base == 0:
        base = 10
        if i < len(s) and s[i] == "0":
            base = 8
            i += 1
            if i + 1 < len(s) and s[i] in "xX" and s[i + 1] in "0123456789abcdefABCDEF":
                i += 1
                base = 16
    v = 0
    while i < len(s):
        c = s[i]
        if c.isdigit():
            d = ord(c) - 48
        elif c in "abcdefABCDEF":
            d = ord(c.upper()) - 55
        else:
            break
        if d >= base:
            break
        v = v * base + d
        i += 1
    return v & 0xFFFFFFFFFFFFFFFF, i


def parse_badpage(opt: str) -> list[tuple[int, int]]:
    """The frame ranges ``[start, end]`` Xen withholds from its heap for ``badpage=opt``
    (after cutting the value to 99 characters): ``start[-end]`` items separated by commas,
    numbers read by :func:`simple_strtoul`; ``end < start`` means ``start`` alone; parsing
    stops at the first item followed by anything but a comma."""
    s = opt[:BADPAGE_MAX_CHARS]
    i, out = 0, []
    while i < len(s):
        a, i = simple_strtoul(s, i)
        b = a
        if i < len(s) and s[i] == "-":
            b, i = simple_strtoul(s, i + 1)
            if b < a:
                b = a
        if i < len(s) and s[i] == ",":
            i += 1
        elif i < len(s):
            break
        out.append((a, b))
    return out
