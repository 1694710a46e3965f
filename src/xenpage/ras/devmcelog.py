"""dom0's ``/dev/mcelog`` read natively: the records Xen's machine-check telemetry becomes
in dom0 (Linux's ``xen-mcelog`` driver fetches them with ``XEN_MC_fetch`` and logs one
``struct mce`` per bank), read the way mcelog's daemon reads the device (``mcelog.c``:
``MCE_GET_RECORD_LEN``, ``MCE_GET_LOG_LEN``, one ``read()`` of the whole log,
``MCE_GETCLEAR_FLAGS`` for lost records) -- with no mcelog daemon in between (Debian 12 has no
mcelog package).

Reading empties the driver's log (``xen_mce_chrdev_read``): each record is seen once, so a
device record needs no identity to be told from a replay; what it carries (the bank's
registers, the TSC when Xen recorded one) still gives it one when a time is known.  The
driver never sets ``time``; the service dates such records when it handles them.

The layout is :mod:`xenpage.abi.mce` (checked against the kernel's uapi header).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Callable

import numpy as np

from ..abi import mce as M
from ..abi.mca import McRecord


class DeviceError(Exception):
    """The device cannot be used (absent, not the mcelog device, no permission)."""


def _cpu_signature(cpuid: int) -> tuple[int, int]:
    """Family and model from CPUID 1 EAX, as mcelog's ``cpuid_to_family``/``model`` do."""
    fam = (cpuid >> 8) & 0xF
    mod = (cpuid >> 4) & 0xF
    if fam == 0xF:
        fam += (cpuid >> 20) & 0xFF
    if fam in (6, 0xF):
        mod += ((cpuid >> 16) & 0xF) << 4
    return fam, mod


def decode_records(data: bytes, record_len: int, source: str = "/dev/mcelog",
                   first: int = 0) -> list[McRecord]:
    """The records in ``data`` (what one ``read()`` returned: whole records of
    ``record_len`` bytes; a trailing partial record is ignored as mcelog ignores it), as
    the service's records.  Decoded with one numpy view of the buffer; a zero TSC, ADDR or
    MISC the status does not declare valid are absent (``None``)."""
    n = len(data) // record_len
    if n == 0:
        return []
    a = np.frombuffer(data, dtype=M.numpy_dtype(record_len), count=n)
    cols = {k: a[k].tolist() for k in ("status", "misc", "addr", "mcgstatus", "tsc", "time",
                                       "bank", "extcpu", "socketid", "apicid", "mcgcap",
                                       "cpuvendor", "cpuid")}
    out = []
    template = McRecord().__dict__
    new = object.__new__
    for i, (st, misc, addr, mcg, tsc, t, bank, cpu, sock, apic, cap, vend, cpuid) in enumerate(
            zip(*cols.values())):
        fam = mod = vendor = None
        if cpuid:
            fam, mod = _cpu_signature(cpuid)
            vendor = M.X86_VENDOR_NAMES.get(vend)
        r = new(McRecord)  # McRecord(...), without its __init__'s cost
        r.__dict__ = {**template, "status": st, "addr": addr, "misc": misc, "mcgstatus": mcg,
                      "cpu": cpu, "bank": bank, "time": float(t) if t else None,
                      "tsc": tsc or None, "socketid": sock, "apicid": apic,
                      "mcgcap": cap or None, "cpuvendor": vendor, "cpufamily": fam,
                      "cpumodel": mod, "source": f"{source}#{first + i}", "extra": {}}
        out.append(r)
    return out


def _ioctl_int(fd: int, request: int) -> int:
    import fcntl
    buf = bytearray(4)
    fcntl.ioctl(fd, request, buf, True)
    return struct.unpack("<i", buf)[0]


class DevMcelog:
    """The ``/dev/mcelog`` device as a source of the service: ``read()`` returns the records
    the driver holds (and so empties its log).  ``ioctl`` is ``fcntl.ioctl``-like
    (``ioctl(fd, request) -> int``), ``reader`` is ``os.read``-like: replaceable for a model
    of the driver in tests."""

    def __init__(self, path: str = M.DEV_MCELOG, *,
                 ioctl: Callable[[int, int], int] = _ioctl_int,
                 reader: Callable[[int, int], bytes] = os.read,
                 opener: Callable[..., int] = os.open, closer: Callable[[int], None] = os.close):
        self.path = path
        self.name = path
        self._ioctl = ioctl
        self._read = reader
        self._close = closer
        self.eof = False
        #: records the driver dropped because its log was full, as far as we learnt of it
        self.overflows = 0
        self.records_read = 0
        try:
            self.fd = opener(path, os.O_RDONLY | os.O_NONBLOCK)
        except OSError as e:
            raise DeviceError(f"{path}: {e.strerror or e}"
                              + (" (dom0's xen-mcelog driver registers it: is this a Xen "
                                 "dom0?)" if e.errno == errno.ENOENT else "")) from None
        try:
            self.record_len = ioctl(self.fd, M.MCE_GET_RECORD_LEN)
            self.log_len = ioctl(self.fd, M.MCE_GET_LOG_LEN)
        except OSError as e:
            self.close()
            raise DeviceError(f"{path}: not a machine-check log device "
                              f"(MCE_GET_RECORD_LEN: {e.strerror or e})") from None
        if self.record_len < 66 or self.log_len <= 0:  # the bank byte is at offset 65
            self.close()
            raise DeviceError(f"{path}: record length {self.record_len}, log length "
                              f"{self.log_len}: not struct mce records")

    def close(self) -> None:
        fd, self.fd = getattr(self, "fd", None), None
        if fd is not None:
            self._close(fd)

    def __enter__(self) -> "DevMcelog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    #: reads of a full log in a row before the service gets to handle them
    MAX_READS = 64

    def read(self, final: bool = False) -> list[McRecord]:
        """Every record the driver holds now (the driver wants one read of the whole log;
        a full log is read again, as more may have come meanwhile)."""
        out: list[McRecord] = []
        for _ in range(self.MAX_READS):
            if self.fd is None:
                break
            try:
                data = self._read(self.fd, self.log_len * self.record_len)
            except BlockingIOError:
                data = b""
            flags = self._ioctl(self.fd, M.MCE_GETCLEAR_FLAGS)
            recs = decode_records(data, self.record_len, self.path, self.records_read)
            self.records_read += len(recs)
            if flags & (1 << M.MCE_OVERFLOW):
                self.overflows += 1
                for r in recs:
                    r.extra["overflow"] = True  # some records before these were lost
            out += recs
            if len(recs) < self.log_len:
                break
        return out
