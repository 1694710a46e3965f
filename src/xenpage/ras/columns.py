"""A batch of ``/dev/mcelog`` records (:class:`~xenpage.ras.devmcelog.McBatch`) as the
service's columns, computed with numpy for the whole batch at once: what
:class:`~xenpage.abi.mca.McRecord` derives one record at a time (its defect, kind, frame,
identity) and the parts of its ``events`` row (:meth:`~xenpage.ras.store.Store.event_row`),
value for value the same.

A record the columns cannot vouch for -- one :meth:`McRecord.defect` would quarantine, or an
uncorrected error (which asks Xen what its machine-check handler did) -- is marked ``slow``:
the service hands it to its record-at-a-time path, in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..abi import mca as A
from .devmcelog import McBatch

_U64 = np.uint64


@dataclass
class Columns:
    """Per-record columns (index ``i`` is the batch's record ``i``): numpy arrays for what
    the service computes with, Python lists for what goes into the ``events`` rows."""

    #: records for the record-at-a-time path (defect or uncorrected), numpy bool
    slow: np.ndarray
    #: ADDRV set: a frame to count the error on ("ce"); else "other" (numpy bool)
    has_addr: np.ndarray
    #: the frame (numpy uint64; meaningful where ``has_addr``)
    mfn_a: np.ndarray
    #: the record's own time, NaN where the record carries none (numpy float64)
    time_a: np.ndarray
    #: ``1 + corrected-error count`` (mcelog's bucket increment; numpy int64)
    inc_a: np.ndarray
    #: the identity is not empty (numpy bool)
    has_ident: np.ndarray
    ident: list
    #: the ``events`` row without id and logged time: (time, source, kind, mfn, addr, status,
    #: count, location) -- time and mfn None where absent
    time: list
    source: list
    kind: list
    mfn: list
    addr: list
    status_hex: list
    inc: list
    location: list


def _hexes(values: np.ndarray, fmt: str) -> list[str]:
    """``format(v, fmt)`` of every value, formatting each distinct value once."""
    uniq, inv = np.unique(values, return_inverse=True)
    table = [format(v, fmt) for v in uniq.tolist()]
    return list(map(table.__getitem__, inv.tolist()))


def columns(b: McBatch) -> Columns:
    a = b.array
    n = len(a)
    st = a["status"]
    addr = a["addr"]
    tm = a["time"]
    addrv = (st & _U64(A.MCI_STATUS_ADDRV)) != 0
    miscv = (st & _U64(A.MCI_STATUS_MISCV)) != 0
    uc = (st & _U64(A.MCI_STATUS_UC)) != 0
    # McRecord.defect(): the fields struct mce holds wider than the record allows (socketid is
    # 32 bits in struct mce, 8 in McRecord's bound), an address past MAXPHYADDR, a time
    # that is not one; uncorrected errors go to the record-at-a-time path too
    defect = ((addr >> _U64(A.MAX_PHYS_ADDR_BITS)) != 0) | (tm >= _U64(1 << 63)) | (a["socketid"] >= 256)
    has_addr = addrv.tolist()
    mfn_a = addr >> _U64(12)
    mfn = [m if h else None for m, h in zip(mfn_a.tolist(), has_addr)]
    time_a = np.where(tm != 0, tm.astype(np.float64), np.nan)
    times = [None if t != t else t for t in time_a.tolist()]
    secs = tm.tolist()  # int(float(t)) of an integer below 2^63 that a float holds: t itself
    cec = ((st & _U64(A.MCI_STATUS_CEC_MASK)) >> _U64(A.MCI_STATUS_CEC_SHIFT)).astype(np.int64) + 1
    tsc = a["tsc"].tolist()
    status_x = _hexes(st, "x")
    addr_x = _hexes(addr, "x")
    misc_x = _hexes(a["misc"], "x")
    mcg_x = _hexes(a["mcgstatus"], "x")
    cpu = a["extcpu"].tolist()
    bank = a["bank"].tolist()
    ident = [(f"{int(float(t)):011d}:{c:016x}:{p}:{k}:{s}:{ax if av else ''}:{mx if mv else ''}:{g}"
              if t or c else "")
             for t, c, p, k, s, ax, av, mx, mv, g in zip(
                 secs, tsc, cpu, bank, status_x, addr_x, has_addr, misc_x, miscv.tolist(), mcg_x)]
    first = b.first
    src = b.source
    location = [f'{{"socketid": {s}}}' for s in a["socketid"].tolist()]
    return Columns(slow=defect | (uc & addrv), has_addr=addrv, mfn_a=mfn_a, time_a=time_a,
                   inc_a=cec, has_ident=(tm != 0) | (a["tsc"] != 0), ident=ident, time=times,
                   source=[f"{src}#{first + i}" for i in range(n)],
                   kind=["ce" if h else "other" for h in has_addr], mfn=mfn, addr=addr.tolist(),
                   status_hex=["0x" + s for s in status_x], inc=cec.tolist(), location=location)
