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
    """Per-record Python lists (index ``i`` is the batch's record ``i``)."""

    #: records for the record-at-a-time path (defect or uncorrected)
    slow: list
    #: ADDRV set: a frame to count the error on ("ce"); else "other"
    has_addr: list
    mfn: list
    #: the record's own time (None: the driver's records carry none) and its integer seconds
    time: list
    #: ``1 + corrected-error count`` (mcelog's bucket increment)
    inc: list
    ident: list
    #: the ``events`` row without id and logged time: (time, source, kind, mfn, addr, status,
    #: count, location, raw)
    source: list
    kind: list
    addr: list
    status_hex: list
    location: list


def _hexes(values: np.ndarray, fmt: str) -> list[str]:
    """``format(v, fmt)`` of every value, formatting each distinct value once."""
    uniq, inv = np.unique(values, return_inverse=True)
    table = [format(v, fmt) for v in uniq.tolist()]
    return [table[k] for k in inv.tolist()]


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
    slow = (defect | (uc & addrv)).tolist()
    has_addr = addrv.tolist()
    mfn_a = addr >> _U64(12)
    mfn = [m if h else None for m, h in zip(mfn_a.tolist(), has_addr)]
    times = [float(t) if t else None for t in tm.tolist()]
    secs = [int(t) if t is not None else 0 for t in times]
    cec = ((st & _U64(A.MCI_STATUS_CEC_MASK)) >> _U64(A.MCI_STATUS_CEC_SHIFT)).astype(np.int64) + 1
    tsc = a["tsc"].tolist()
    status_x = _hexes(st, "x")
    addr_x = _hexes(addr, "x")
    misc_x = _hexes(a["misc"], "x")
    mcg_x = _hexes(a["mcgstatus"], "x")
    cpu = a["extcpu"].tolist()
    bank = a["bank"].tolist()
    ident = [(f"{t:011d}:{c:016x}:{p}:{k}:{s}:{ax if av else ''}:{mx if mv else ''}:{g}"
              if t or c else "")
             for t, c, p, k, s, ax, av, mx, mv, g in zip(
                 secs, tsc, cpu, bank, status_x, addr_x, has_addr, misc_x, miscv.tolist(), mcg_x)]
    first = b.first
    src = b.source
    location = [f'{{"socketid": {s}}}' for s in a["socketid"].tolist()]
    return Columns(slow=slow, has_addr=has_addr, mfn=mfn, time=times, inc=cec.tolist(), ident=ident,
                   source=[f"{src}#{first + i}" for i in range(n)],
                   kind=["ce" if h else "other" for h in has_addr], addr=addr.tolist(),
                   status_hex=["0x" + s for s in status_x], location=location)
