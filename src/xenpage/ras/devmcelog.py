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


class McBatch:
    """The records of one ``read()`` of the device, kept as read: a numpy structured array of
    ``struct mce`` (:func:`xenpage.abi.mce.numpy_dtype`), the source's name and the index of
    its first record there.  The service handles a batch column-wise
    (:meth:`xenpage.ras.service.RetireService.process`); :meth:`records` and :meth:`record`
    give the same records one by one (:class:`McRecord`)."""

    __slots__ = ("array", "source", "first", "overflow")

    def __init__(self, array: np.ndarray, source: str = M.DEV_MCELOG, first: int = 0,
                 overflow: bool = False):
        self.array = array
        self.source = source
        self.first = first
        #: the driver dropped records before these (its log was full)
        self.overflow = overflow

    def __len__(self) -> int:
        return len(self.array)

    def record(self, i: int) -> McRecord:
        """Record ``i`` of the batch."""
        return self._build(i, i + 1)[0]

    def records(self) -> list[McRecord]:
        return self._build(0, len(self.array))

    _FIELDS = ("status", "misc", "addr", "mcgstatus", "tsc", "time", "bank", "extcpu",
               "socketid", "apicid", "mcgcap", "cpuvendor", "cpuid")

    def _build(self, lo: int, hi: int) -> list[McRecord]:
        a = self.array[lo:hi]
        if hi - lo == 1:  # one record: its fields as a tuple, no column per field
            names = a.dtype.names
            row = a[0].item()
            cols = [[row[names.index(k)]] for k in self._FIELDS]
        else:
            cols = [a[k].tolist() for k in self._FIELDS]
        out = []
        template = McRecord().__dict__
        new = object.__new__
        source, first = self.source, self.first + lo
        extra = {"overflow": True} if self.overflow else None
        for i, (st, misc, addr, mcg, tsc, t, bank, cpu, sock, apic, cap, vend, cpuid) in enumerate(
                zip(*cols)):
            fam = mod = vendor = None
            if cpuid:
                fam, mod = _cpu_signature(cpuid)
                vendor = M.X86_VENDOR_NAMES.get(vend)
            r = new(McRecord)  # McRecord(...), without its __init__'s cost
            r.__dict__ = {**template, "status": st, "addr": addr, "misc": misc, "mcgstatus": mcg,
                          "cpu": cpu, "bank": bank, "time": float(t) if t else None,
                          "tsc": tsc or None, "socketid": sock, "apicid": apic,
                          "mcgcap": cap or None, "cpuvendor": vendor, "cpufamily": fam,
                          "cpumodel": mod, "source": f"{source}#{first + i}",
                          "extra": dict(extra) if extra else {}}
            out.append(r)
        return out


def merged(batches: list[McBatch]) -> list[McBatch]:
    """Consecutive reads of one source (each batch numbered on from the one before, the same
    overflow flag) as one batch: the service's columns are computed once for them."""
    out: list[McBatch] = []
    run: list[McBatch] = []

    def close() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:  # the bytes joined (np.concatenate promotes structured dtypes: slow)
            dt = run[0].array.dtype
            data = b"".join(np.ascontiguousarray(b.array).data for b in run)
            out.append(McBatch(np.frombuffer(data, dtype=dt), run[0].source, run[0].first,
                               run[0].overflow))
        run.clear()

    for b in batches:
        if run and not (b.source == run[-1].source and b.first == run[-1].first + len(run[-1])
                        and b.overflow == run[-1].overflow
                        and b.array.dtype == run[-1].array.dtype):
            close()
        run.append(b)
    close()
    return out


def decode_batch(data: bytes, record_len: int, source: str = M.DEV_MCELOG,
                 first: int = 0, overflow: bool = False) -> McBatch:
    """The records in ``data`` (what one ``read()`` returned: whole records of
    ``record_len`` bytes; a trailing partial record is ignored as mcelog ignores it), as one
    numpy view of the buffer."""
    n = len(data) // record_len
    a = np.frombuffer(data, dtype=M.numpy_dtype(record_len), count=n)
    return McBatch(a, source, first, overflow)


def decode_records(data: bytes, record_len: int, source: str = "/dev/mcelog",
                   first: int = 0) -> list[McRecord]:
    """The records in ``data`` as the service's records (:func:`decode_batch`, one by one):
    a zero TSC, ADDR or MISC the status does not declare valid are absent (``None``)."""
    if len(data) < record_len:
        return []
    return decode_batch(data, record_len, source, first).records()


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

    def read_batches(self, final: bool = False) -> list[McBatch]:
        """Every record the driver holds now, as batches (one per ``read()``; the driver
        wants one read of the whole log; a full log is read again, as more may have come
        meanwhile)."""
        out: list[McBatch] = []
        for _ in range(self.MAX_READS):
            if self.fd is None:
                break
            try:
                data = self._read(self.fd, self.log_len * self.record_len)
            except BlockingIOError:
                data = b""
            flags = self._ioctl(self.fd, M.MCE_GETCLEAR_FLAGS)
            over = bool(flags & (1 << M.MCE_OVERFLOW))
            b = decode_batch(data, self.record_len, self.path, self.records_read, over)
            if over:
                self.overflows += 1  # some records before these were lost
            self.records_read += len(b)
            if len(b):
                out.append(b)
            if len(b) < self.log_len:
                break
        return out

    def read(self, final: bool = False) -> list[McRecord]:
        """:meth:`read_batches`, one record at a time."""
        return [r for b in self.read_batches(final) for r in b.records()]
