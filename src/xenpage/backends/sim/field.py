"""A year of memory errors shaped like field studies, for the simulated machine (the year
study, :mod:`xenpage.backends.sim.year`): few DIMMs develop faults (Schroeder et al.,
SIGMETRICS 2009: 8% of DIMMs a year, the top 20% of them carry >90% of the errors), a
heavy-tailed error count per faulty DIMM, fault modes in the proportions Sridharan & Liberty
report (SC 2012: single-bit, -row, -column, -bank, multi-bank, multi-rank), and errors that
repeat on the same cells, frames and rows (Hwang et al., ASPLOS 2012), in bursts.

Statistics of the simulated world only: nothing here is Xen's.  The machine's DRAM geometry
and what an error does to it stay in :mod:`xenpage.hypervisor.mce`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ...hypervisor.mce import DramGeometry, default_geometry

if TYPE_CHECKING:  # pragma: no cover
    from ...hypervisor.host import Host


# -- a year of errors ---------------------------------------------------------------------

#: fault modes (Sridharan & Liberty, SC 2012, DDR3 field faults) with the share of faults,
#: the number of distinct cells a fault of that mode produces errors in, and the chance
#: that an error of that fault is uncorrectable (multi-bit modes only)
FAULT_MODES = {
    #          share  cells (lo, hi)  uncorrectable per error
    "bit":    (0.50, (1, 1),          0.0),
    "word":   (0.02, (1, 1),          0.002),
    "row":    (0.13, (2, 16),         0.004),
    "column": (0.10, (16, 256),       0.004),
    "bank":   (0.15, (32, 512),       0.008),
    "multibank": (0.05, (64, 1024),   0.01),
    "rank":   (0.05, (64, 2048),      0.01),
}


@dataclass
class FieldParams:
    days: float = 365.0
    #: DIMMs that develop faults during the period (the host is one that sees errors)
    faulty_dimms: int = 2
    #: errors per faulty DIMM: lognormal, median and sigma (heavy tail), capped
    median_errors: float = 60.0
    sigma: float = 2.0
    max_errors_per_dimm: int = 100_000
    #: faults per faulty DIMM: 1 + Poisson(mean - 1)
    faults_per_dimm: float = 1.6
    #: how strongly errors repeat on a fault's first cells (Zipf exponent)
    repeat_zipf: float = 1.1
    #: fraction of errors in bursts, and a burst's spread (hours)
    burst_fraction: float = 0.6
    burst_hours: float = 6.0
    #: scale of the per-mode uncorrectable probabilities
    ue_scale: float = 1.0
    modes: dict = field(default_factory=lambda: dict(FAULT_MODES))


@dataclass
class Fault:
    id: int
    dimm: int
    mode: str
    onset: float
    cells: np.ndarray  # mfns of the fault's cells (a cell = a frame here)
    errors: int
    ue_prob: float

    def to_json(self) -> dict:
        return {"id": self.id, "dimm": self.dimm, "mode": self.mode, "onset_s": self.onset,
                "cells": int(self.cells.size), "frames": int(np.unique(self.cells).size),
                "errors": self.errors, "ue_prob": self.ue_prob}


@dataclass
class ErrorTrace:
    """Every error of the period, in time order: seconds from the start, frame, byte offset,
    uncorrectable or not, and the fault that produced it."""

    t: np.ndarray
    mfn: np.ndarray
    offset: np.ndarray
    uc: np.ndarray
    fault: np.ndarray
    faults: list[Fault]
    geometry: DramGeometry
    seconds: float

    def __len__(self) -> int:
        return int(self.t.size)

    def summary(self) -> dict:
        d = self.geometry.decode_mfns(self.mfn)["dimm_id"] if len(self) else np.zeros(0, int)
        per_dimm = np.bincount(d, minlength=self.geometry.ndimms).tolist() if len(self) else []
        return {"errors": len(self), "uncorrected": int(self.uc.sum()),
                "frames": int(np.unique(self.mfn).size), "faults": [f.to_json() for f in self.faults],
                "errors_per_dimm": {self.geometry.dimm_name(i): n for i, n in enumerate(per_dimm)}}


class FieldModel:
    """Draws a period of memory errors for a host (see the module docstring)."""

    def __init__(self, host: "Host", geometry: DramGeometry | None = None,
                 params: FieldParams | None = None, seed: int = 1):
        self.host = host
        self.geometry = geometry or default_geometry(host)
        self.params = params or FieldParams()
        self.rng = np.random.default_rng(seed)
        self._ram = host.e820.ram_window(0, host.nframes)
        xs, xe = host.xen_image
        self._ram[xs:xe] = True  # Xen's image is DRAM too (errors there cannot be retired)

    def _cells(self, dimm: int, mode: str, n: int) -> np.ndarray:
        g, rng = self.geometry, self.rng
        socket, rest = divmod(dimm, g.channels * g.dimms)
        channel, d = divmod(rest, g.dimms)
        rank = d * g.ranks + int(rng.integers(g.ranks))
        bg, bank = int(rng.integers(g.bankgroups)), int(rng.integers(g.banks))
        row = int(rng.integers(g.rows))
        fr = int(rng.integers(g.row_frames))
        out = []
        for _ in range(n * 4 + 8):
            if mode in ("bit", "word"):
                c = (rank, bg, bank, row, fr)
            elif mode == "row":
                c = (rank, bg, bank, row, int(rng.integers(g.row_frames)))
            elif mode == "column":
                c = (rank, bg, bank, int(rng.integers(g.rows)), fr)
            elif mode == "bank":
                c = (rank, bg, bank, int(rng.integers(g.rows)), int(rng.integers(g.row_frames)))
            elif mode == "multibank":
                c = (rank, int(rng.integers(g.bankgroups)), int(rng.integers(g.banks)),
                     int(rng.integers(g.rows)), int(rng.integers(g.row_frames)))
            else:  # rank
                c = (d * g.ranks + int(rng.integers(g.ranks)), int(rng.integers(g.bankgroups)),
                     int(rng.integers(g.banks)), int(rng.integers(g.rows)),
                     int(rng.integers(g.row_frames)))
            m = g.encode(socket, channel, c[0], c[1], c[2], c[3], c[4])
            if m < self.host.nframes and self._ram[m]:
                out.append(m)
                if len(out) >= n:
                    break
        return np.array(out, dtype=np.int64)

    def generate(self) -> ErrorTrace:
        p, g, rng = self.params, self.geometry, self.rng
        T = p.days * 86400.0
        names = list(p.modes)
        shares = np.array([p.modes[k][0] for k in names], dtype=float)
        shares /= shares.sum()
        dimms = rng.choice(g.ndimms, size=min(p.faulty_dimms, g.ndimms), replace=False)
        faults: list[Fault] = []
        ts, ms, us, fs = [], [], [], []
        for dimm in dimms.tolist():
            n_dimm = int(min(p.max_errors_per_dimm,
                             max(1, round(rng.lognormal(np.log(p.median_errors), p.sigma)))))
            k = 1 + int(rng.poisson(max(0.0, p.faults_per_dimm - 1)))
            split = rng.multinomial(n_dimm, rng.dirichlet(np.full(k, 0.5)))
            for n in split.tolist():
                if n == 0:
                    continue
                mode = names[int(rng.choice(len(names), p=shares))]
                lo, hi = p.modes[mode][1]
                ncell = int(rng.integers(lo, hi + 1))
                cells = self._cells(dimm, mode, ncell)
                if cells.size == 0:
                    continue
                onset = float(rng.uniform(0, 0.9 * T))
                f = Fault(len(faults), dimm, mode, onset, cells, n,
                          min(1.0, p.modes[mode][2] * p.ue_scale))
                faults.append(f)
                w = 1.0 / np.arange(1, cells.size + 1) ** p.repeat_zipf
                which = rng.choice(cells.size, size=n, p=w / w.sum())
                nb = 1 + int(rng.poisson(3))
                centers = rng.uniform(onset, T, size=nb)
                burst = rng.random(n) < p.burst_fraction
                t = np.where(burst,
                             centers[rng.integers(nb, size=n)]
                             + np.abs(rng.normal(0, p.burst_hours * 3600, size=n)),
                             rng.uniform(onset, T, size=n))
                t = np.clip(t, onset, T - 1)
                ts.append(t)
                ms.append(cells[which])
                us.append(rng.random(n) < f.ue_prob)
                fs.append(np.full(n, f.id, dtype=np.int32))
        if ts:
            t = np.concatenate(ts)
            order = np.argsort(t, kind="stable")
            mfn = np.concatenate(ms)[order]
            trace = ErrorTrace(t[order], mfn, rng.integers(0, 64, size=mfn.size) * 64,
                               np.concatenate(us)[order], np.concatenate(fs)[order], faults, g, T)
        else:
            z = np.zeros(0)
            trace = ErrorTrace(z, z.astype(np.int64), z.astype(np.int64), z.astype(bool),
                               z.astype(np.int32), faults, g, T)
        return trace
