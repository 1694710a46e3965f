"""Machine-check records as dom0 sees them: mcelog's text.

On Xen, dom0's Linux fetches machine-check telemetry from the hypervisor (``XEN_MC_fetch``,
the ``xen-mcelog`` driver) and offers it as ``/dev/mcelog``; the mcelog daemon decodes it
into ``/var/log/mcelog``.  :func:`parse_mcelog` reads that text the way ``mcelog --ascii``
(``decodefatal`` in mcelog.c) reads logs -- syslog and kernel prefixes skipped -- and
accepts:

* mcelog's decoded records (``Hardware event. This is not a software error.`` /
  ``MCE n`` / ``CPU c BANK b`` / ``MISC m ADDR a`` / ``TIME t date`` / ``STATUS s MCGSTATUS g``
  / ``MCGCAP .. APICID .. SOCKETID ..`` / ``CPUID Vendor .. Family .. Model ..``), with the
  i10nm memory-controller lines (``bank: .. bankgroup: .. row: .. column: ..``, ``rank: ..``)
  and ``SOCKET:s CHANNEL:c DIMM:d`` locations;
* ``mcelog --raw`` and mce-inject input (``CPU c`` / ``BANK b`` / ``STATUS ..`` ...);
* Xen console lines (``(XEN) MCE: The hardware reports a non fatal, correctable incident
  occurred on CPU c.`` / ``(XEN) Bank b: status at addr``).

Records are separated by a disclaimer or ``MCE n`` line, a blank line, or a second ``CPU``
line.  When the location is not printed but the record comes from an i10nm (Icelake-SP and
later) memory controller, it is decoded from MCi_MISC as mcelog's ``i10nm_imc_misc`` does.

:class:`McelogFile` reads a log incrementally and remembers where it stopped (in the store),
so a restarted service neither loses nor double-counts records; a rotated log starts over.
"""

from __future__ import annotations

import os
import re
import sys
import time as _time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator

from ..abi import mca as A
from ..abi.mca import McRecord

DISCLAIMER = "Hardware event. This is not a software error."

_HEXKEYS = re.compile(r"(?<![\w])(MCGSTATUS|STATUS|ADDR|MISC|TSC|MCGCAP|APICID)\s+(?:0[xX])?([0-9a-fA-F]+)(?![\w])")
_TSC = re.compile(r"(?<![\w])TSC\s+(?:0[xX])?([0-9a-fA-F]+)(?![\w])")
_SOCKET = re.compile(r"(?<![\w:])SOCKETID\s+(\d+)")
_TIME = re.compile(r"(?<![\w])TIME\s+(\d+)")
_PROCESSOR = re.compile(r"PROCESSOR\s+(\d+):(?:0[xX])?([0-9a-fA-F]+)")
_CPUID = re.compile(r"CPUID Vendor (\S+) Family (\d+) Model (\d+)")
_CPU_MCE = re.compile(r"CPU (\d+): Machine Check Exception: ([0-9a-fA-F]+) Bank (\d+): ([0-9a-fA-F]+)")
_CPU_BANK = re.compile(r"CPU (\d+)(?: BANK)? (\d+)\b")
_CPU_ONLY = re.compile(r"CPU (\d+)\s*$")
_BANK_ONLY = re.compile(r"BANK (\d+)\s*$")
_MCE_N = re.compile(r"MCE \d+\s*$")
_XEN_CE = re.compile(r"\(XEN\).*correctable incident occurred on CPU (\d+)")
_XEN_BANK = re.compile(r"\(XEN\) Bank (\d+): ([0-9a-fA-F]+) at\s+([0-9a-fA-F]+)")
_I10NM_ROW = re.compile(r"bank: 0x([0-9a-f]+) bankgroup: 0x([0-9a-f]+) row: 0x([0-9a-f]+) column: 0x([0-9a-f]+)")
_I10NM_RANK = re.compile(r"rank: 0x([0-9a-f]+) subrank: 0x([0-9a-f]+)")
_LOCATION = re.compile(r"SOCKET:(\d+) CHANNEL:(\d+|\?) DIMM:(\d+|\?)")

#: Intel family 6 models mcelog decodes with i10nm.c (Icelake-SP/-D, Sapphire/Emerald
#: Rapids, Granite Rapids)
I10NM_MODELS = {0x6A, 0x6C, 0x8F, 0xCF, 0xAD, 0xAE}
I10NM_IMC_BANKS = {13: (0, 0), 14: (0, 1), 15: (0, 2), 17: (1, 0), 18: (1, 1), 19: (1, 2),
                   21: (2, 0), 22: (2, 1), 23: (2, 2), 25: (3, 0), 26: (3, 1), 27: (3, 2)}


def skipgunk(s: str) -> str:
    """mcelog's ``skipgunk``: drop a syslog ``mcelog:`` prefix, a ``<n>`` priority, a
    ``[timestamp]`` and ``mce: [Hardware Error]:``."""
    p = s.find("mcelog: ")
    if p >= 0:
        s = s[p + len("mcelog: "):]
    s = s.strip()
    if s.startswith("<"):
        k = s.find(">")
        s = s[k + 1:] if k >= 0 else ""
        s = s.strip()
    if s.startswith("["):
        k = s.find("]")
        s = s[k + 1:] if k >= 0 else ""
        s = s.strip()
    if s.startswith("mce: [Hardware Error]:"):
        s = s[len("mce: [Hardware Error]:"):]
    return s.strip()


def decode_i10nm(rec: McRecord) -> None:
    """Fill the DRAM location from MCi_MISC of an i10nm iMC bank (mcelog's
    ``i10nm_imc_misc`` and ``i10nm_memerr_misc``), where the text did not give it."""
    if rec.misc is None or rec.bank not in I10NM_IMC_BANKS:
        return
    if rec.cpuvendor not in (None, "Intel") or rec.cpufamily not in (None, 6):
        return
    if rec.cpumodel is not None and rec.cpumodel not in I10NM_MODELS:
        return
    if rec.cpumodel is None:
        return
    misc, st = rec.misc, rec.status
    if rec.row is None:
        rec.column = ((misc >> 9) & 0x3FF) << 2
        rec.row = (misc >> 19) & 0x1FFFFF
        rec.dram_bank = (misc >> 42) & 3
        rec.bankgroup = ((misc >> 40) & 3) | (((misc >> 44) & 1) << 2)
    if rec.rank is None:
        rec.rank = (misc >> 56) & 7
    if rec.channel is None and A.is_memory_error(st) and (st & 0xF) != 0xF:
        imc, _ = I10NM_IMC_BANKS[rec.bank]
        rec.channel = imc * 3 + (st & 0xF)
    if rec.socketid is None:
        rec.socketid = 0


@dataclass
class _Partial:
    start: int
    first_line: int
    lines: list = field(default_factory=list)
    fields: dict = field(default_factory=dict)
    has_cpu: bool = False

    @property
    def has_data(self) -> bool:
        return "status" in self.fields or "addr" in self.fields or "parse_error" in self.fields


class McelogParser:
    """Incremental parser: feed lines (with their byte offsets), collect complete records.
    ``position`` is where the first unfinished record starts: what to resume from."""

    def __init__(self, source: str = "", start_offset: int = 0, start_line: int = 1):
        self.source = source
        self.cur: _Partial | None = None
        self.position = start_offset
        self.lineno = start_line - 1
        self.done: list[McRecord] = []

    def _new(self, offset: int) -> _Partial:
        self.cur = _Partial(offset, self.lineno)
        return self.cur

    def _finish(self, next_offset: int) -> None:
        if self.cur is not None and self.cur.has_data:
            self.done.append(self._build(self.cur))
        self.cur = None
        self.position = next_offset

    def feed(self, line: str, offset: int = 0, end: int | None = None) -> list[McRecord]:
        """One line (without or with its newline); ``offset``/``end``: its byte span."""
        self.lineno += 1
        end = offset + len(line.encode()) if end is None else end
        s = skipgunk(line)
        cur = self.cur
        if not s:
            if cur is not None and cur.has_data:
                self._finish(end)
            elif cur is None:
                self.position = end
            return self._take()
        if s.startswith(DISCLAIMER) or "HARDWARE ERROR" in s or _MCE_N.match(s):
            if cur is not None and cur.has_data:
                self._finish(offset)
            if self.cur is None:
                self._new(offset)
            self.cur.lines.append(line.rstrip("\n"))
            return self._take()
        m_ce = _XEN_CE.search(s)
        m_cpu = None if s.startswith("CPUID") else (
            _CPU_MCE.match(s) or _CPU_BANK.match(s) or _CPU_ONLY.match(s)) if s.startswith("CPU ") else None
        if (m_cpu or m_ce) and cur is not None and (cur.has_cpu and cur.has_data):
            self._finish(offset)
            cur = None
        if cur is None:
            cur = self._new(offset)
        cur.lines.append(line.rstrip("\n"))
        try:
            self._fields(cur, s, m_ce, m_cpu)
        except ValueError as e:  # e.g. a decimal field past int()'s digit limit: the record
            cur.fields.setdefault("parse_error", f"line {self.lineno}: {str(e)[:120]}")  # is poison
        return self._take()

    def _fields(self, cur: _Partial, s: str, m_ce, m_cpu) -> None:
        f = cur.fields
        if m_ce:
            f["cpu"] = int(m_ce.group(1))
            cur.has_cpu = True
        elif m_cpu:
            cur.has_cpu = True
            f["cpu"] = int(m_cpu.group(1))
            if m_cpu.re is _CPU_MCE:
                f["mcgstatus"] = int(m_cpu.group(2), 16)
                f["bank"] = int(m_cpu.group(3))
                f["status"] = int(m_cpu.group(4), 16)
            elif m_cpu.re is _CPU_BANK:
                f["bank"] = int(m_cpu.group(2))
            m = _TSC.search(s)  # mcelog prints it on the CPU line: "CPU c BANK b TSC t"
            if m:
                f["tsc"] = int(m.group(1), 16)
        m = _XEN_BANK.search(s)
        if m:
            f["bank"], f["status"], f["addr"] = int(m.group(1)), int(m.group(2), 16), int(m.group(3), 16)
        m = _BANK_ONLY.match(s)
        if m:
            f["bank"] = int(m.group(1))
        m = _CPUID.match(s)
        if m:
            f["cpuvendor"], f["cpufamily"], f["cpumodel"] = m.group(1), int(m.group(2)), int(m.group(3))
        elif not m_cpu and not _XEN_BANK.search(s):
            for k, v in _HEXKEYS.findall(s):
                f[k.lower()] = int(v, 16)
            m = _SOCKET.search(s)
            if m:
                f["socketid"] = int(m.group(1))
            m = _TIME.search(s)
            if m:
                f["time"] = float(m.group(1))
            m = _PROCESSOR.search(s)
            if m:
                f["cpuvendor"] = {"0": "Intel", "2": "AMD"}.get(m.group(1), m.group(1))
                cpuid = int(m.group(2), 16)
                fam = (cpuid >> 8) & 0xF
                mod = (cpuid >> 4) & 0xF
                if fam == 0xF:
                    fam += (cpuid >> 20) & 0xFF
                if fam in (6, 0xF):
                    mod += ((cpuid >> 16) & 0xF) << 4
                f["cpufamily"], f["cpumodel"] = fam, mod
        m = _I10NM_ROW.search(s)
        if m:
            f["dram_bank"], f["bankgroup"], f["row"], f["column"] = (int(x, 16) for x in m.groups())
        m = _I10NM_RANK.search(s)
        if m and not s.startswith("sub"):
            f["rank"] = int(m.group(1), 16)
        m = _LOCATION.search(s)
        if m:
            f["socketid"] = int(m.group(1))
            if m.group(2) != "?":
                f["channel"] = int(m.group(2))
            if m.group(3) != "?":
                f["dimm"] = int(m.group(3))

    def finish(self, end: int | None = None) -> list[McRecord]:
        """End of input: the record being read is complete."""
        if self.cur is not None:
            self._finish(end if end is not None else self.position)
        return self._take()

    def _take(self) -> list[McRecord]:
        out, self.done = self.done, []
        return out

    def _build(self, p: _Partial) -> McRecord:
        f = dict(p.fields)
        rec = McRecord(**{k: v for k, v in f.items() if k in McRecord.__dataclass_fields__})
        if "parse_error" in f:
            rec.extra["parse_error"] = f["parse_error"]
        if rec.status and rec.addr is not None and not rec.status & A.MCI_STATUS_ADDRV \
                and "addr" in f and any(l.lstrip().startswith("(XEN)") for l in p.lines):
            rec.status |= A.MCI_STATUS_ADDRV  # Xen prints the address only when it is valid
        rec.source = f"{self.source}:{p.first_line}" if self.source else f"line {p.first_line}"
        rec.raw = "\n".join(p.lines)
        decode_i10nm(rec)
        return rec


def split_lines(data: bytes) -> list[bytes]:
    """``data`` cut after every ``\n`` and nowhere else (mcelog and syslog end lines with
    ``\n`` only: ``\r``, ``\v``, ``\f`` or U+2028 inside a line are part of it, unlike
    :meth:`str.splitlines`); the last piece has no newline when the data does not end in one."""
    parts = data.split(b"\n")
    out = [q + b"\n" for q in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _decode(line: bytes) -> str:
    """A log line as text: invalid UTF-8 becomes U+FFFD (its byte span is kept separately)."""
    return line.decode("utf-8", "replace")


def parse_mcelog(text: str | bytes | Iterable[str], source: str = "") -> list[McRecord]:
    """Every record in mcelog-style text (lines end at ``\n`` only)."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    raw = split_lines(text) if isinstance(text, bytes) else [ln.encode("utf-8", "surrogatepass") for ln in text]
    p = McelogParser(source)
    out: list[McRecord] = []
    off = 0
    for line in raw:
        out += p.feed(_decode(line), off, off + len(line))
        off += len(line)
    out += p.finish(off)
    return out


# -- writing: what dom0's mcelog daemon logs ------------------------------------------------

_I10NM_MSCOD_NAMES = {A.I10NM_MSCOD_CORRECTED_READ: "Corrected read error",
                      A.I10NM_MSCOD_UNCORRECTED_READ: "Uncorrected read error",
                      A.I10NM_MSCOD_CORRECTED_SCRUB: "Corrected patrol scrub error",
                      A.I10NM_MSCOD_UNCORRECTED_SCRUB: "Uncorrected patrol scrub error"}


def format_mcelog(rec: McRecord, index: int = 0) -> str:
    """A record as mcelog's daemon writes it (``disclaimer`` + ``MCE n`` + ``dump_mce``,
    with the i10nm memory-controller decode)."""
    out = [DISCLAIMER, f"MCE {index}",
           f"CPU {rec.cpu} BANK {rec.bank} " + (f"TSC {rec.tsc:x} " if rec.tsc else "")]
    parts = []
    if rec.status & A.MCI_STATUS_MISCV and rec.misc is not None:
        parts.append(f"MISC {rec.misc:x} ")
    if rec.status & A.MCI_STATUS_ADDRV and rec.addr is not None:
        parts.append(f"ADDR {rec.addr:x} ")
    if parts:
        out.append("".join(parts))
    if rec.time is not None:
        t = int(rec.time)
        out.append(f"TIME {t} {_time.asctime(_time.gmtime(t))}")
    if rec.bank in I10NM_IMC_BANKS and A.is_memory_error(rec.status):
        mscod = (rec.status >> 16) & 0xFF
        out.append(f"MemCtrl: {_I10NM_MSCOD_NAMES.get(mscod, f'MSCOD {mscod:#x}')}")
        if rec.row is not None:
            out.append(f"bank: {rec.dram_bank or 0:#x} bankgroup: {rec.bankgroup or 0:#x} "
                       f"row: {rec.row:#x} column: {rec.column or 0:#x}")
        if rec.rank is not None:
            out.append(f"rank: {rec.rank:#x} subrank: 0x0")
        out.append("ecc mode: SDDC")
        if rec.channel is not None:
            dimm = "?" if rec.dimm is None else str(rec.dimm)
            out.append(f"Location: SOCKET:{rec.socketid or 0} CHANNEL:{rec.channel} DIMM:{dimm} []")
    out.append(f"STATUS {rec.status:x} MCGSTATUS {rec.mcgstatus:x}")
    line = ""
    if rec.mcgcap:
        line += f"MCGCAP {rec.mcgcap:x} "
    line += f"APICID {rec.apicid or 0:x} SOCKETID {rec.socketid or 0} "
    out.append(line)
    if rec.cpufamily is not None:
        out.append(f"CPUID Vendor {rec.cpuvendor or 'Intel'} Family {rec.cpufamily} "
                   f"Model {rec.cpumodel}")
    return "\n".join(out) + "\n"


# -- reading a log incrementally ----------------------------------------------------------

class McelogFile:
    """A machine-check log read incrementally.  ``store`` (optional) keeps the position
    (device, inode, offset) between runs; a log whose inode changed or that shrank was
    rotated and is read from its start.  A record at the end of the file is taken once the
    file has not grown for ``settle`` seconds (the writer finished it), or at ``final``."""

    def __init__(self, path: str | os.PathLike, store=None, settle: float = 1.0,
                 clock=_time.monotonic):
        self.path = Path(path)
        self.name = os.path.abspath(self.path)
        self.store = store
        self.settle = settle
        self.clock = clock
        pos = store.source_position(self.name) if store is not None else {}
        self.ino = pos.get("ino")
        self.offset = int(pos.get("offset", 0))
        self.line = int(pos.get("line", 1))
        self._last_size: int | None = None
        self._last_change = clock()

    def _save(self) -> None:
        if self.store is not None:
            self.store.set_source_position(self.name, {"ino": self.ino, "offset": self.offset,
                                                       "line": self.line})

    def read(self, final: bool = False) -> list[McRecord]:
        """The complete records added since the last call."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if self.ino is not None and (st.st_ino != self.ino or st.st_size < self.offset):
            self.offset, self.line = 0, 1  # rotated or truncated
        self.ino = st.st_ino
        now = self.clock()
        if st.st_size != self._last_size:
            self._last_size, self._last_change = st.st_size, now
        if st.st_size <= self.offset:
            return []
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        # offsets are bytes of the file: lines cut at b"\n" only, each decoded on its own
        p = McelogParser(self.name, self.offset, self.line)
        out: list[McRecord] = []
        off = self.offset
        consumed = 0
        for line in split_lines(data):
            if not line.endswith(b"\n") and not final:
                break  # a line still being written
            out += p.feed(_decode(line), off, off + len(line))
            off += len(line)
            consumed += 1
        if final or (now - self._last_change) >= self.settle or p.cur is None:
            out += p.finish(off)
            self.offset, self.line = off, self.line + consumed
        else:  # resume at the unfinished record
            self.offset, self.line = p.cur.start, p.cur.first_line
        self._save()
        return out


def read_stream(fh: IO[str], source: str = "stdin", follow: bool = False) -> Iterator[McRecord]:
    """Records from a stream (stdin): as they complete; the last one at end of input."""
    p = McelogParser(source)
    off = 0
    buf = getattr(fh, "buffer", None)
    if buf is not None:  # bytes: cut at b"\n" only, invalid UTF-8 replaced line by line
        for line in iter(buf.readline, b""):
            yield from p.feed(_decode(line), off, off + len(line))
            off += len(line)
    else:
        for line in fh:
            yield from p.feed(line, off)
            off += len(line.encode("utf-8", "surrogatepass"))
    yield from p.finish(off)


def stdin_records() -> list[McRecord]:
    return list(read_stream(sys.stdin))
