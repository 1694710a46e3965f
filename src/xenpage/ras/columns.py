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
from itertools import repeat

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
    #: no record of the batch carries a time (the xen-mcelog driver never sets one)
    untimed: bool = False


def _hexes(values: np.ndarray, fmt: str, wrap: str = "{}") -> list[str]:
    """``wrap.format(format(v, fmt))`` of every value, formatting each distinct value once."""
    uniq, inv = np.unique(values, return_inverse=True)
    table = list(map(format, uniq.tolist(), repeat(fmt)))
    if wrap != "{}":
        table = list(map(wrap.format, table))
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
    mfn = mfn_a.tolist()
    for i in np.flatnonzero(~addrv).tolist():
        mfn[i] = None
    untimed = not tm.any()
    if untimed:
        time_a = np.full(n, np.nan)
        times = [None] * n
    else:
        time_a = np.where(tm != 0, tm.astype(np.float64), np.nan)
        times = [None if t != t else t for t in time_a.tolist()]
    # int(float(t)) of every time: a float of a value below 2^63 fits in 64 unsigned bits
    secs = tm.astype(np.float64).astype(_U64).tolist() if not untimed else [0] * n
    cec = ((st & _U64(A.MCI_STATUS_CEC_MASK)) >> _U64(A.MCI_STATUS_CEC_SHIFT)).astype(np.int64) + 1
    tsc = a["tsc"]
    has_ident = (tm != 0) | (tsc != 0)
    addr_x = _hexes(addr, "x")
    for i in np.flatnonzero(~addrv).tolist():
        addr_x[i] = ""
    misc_x = _hexes(a["misc"], "x")
    for i in np.flatnonzero(~miscv).tolist():
        misc_x[i] = ""
    status_x = _hexes(st, "x")
    # McRecord.identity(), every record at once
    ident = list(map("%011d:%016x:%d:%d:%s:%s:%s:%s".__mod__, zip(
        secs, tsc.tolist(), a["extcpu"].tolist(), a["bank"].tolist(), status_x, addr_x,
        misc_x, _hexes(a["mcgstatus"], "x"))))
    for i in np.flatnonzero(~has_ident).tolist():
        ident[i] = ""
    first = b.first
    src = b.source
    location = _hexes(a["socketid"], "d", '{{"socketid": {}}}')
    return Columns(slow=defect | (uc & addrv), has_addr=addrv, mfn_a=mfn_a, time_a=time_a,
                   inc_a=cec, has_ident=has_ident, ident=ident, time=times,
                   source=list(map(f"{src}#".__add__, map(str, range(first, first + n)))),
                   kind=list(map(("other", "ce").__getitem__, has_addr)), mfn=mfn,
                   addr=addr.tolist(), status_hex=list(map("0x".__add__, status_x)), inc=cec.tolist(),
                   location=location, untimed=untimed)
