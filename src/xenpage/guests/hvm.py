"""A simulated HVM guest: a workload that writes its memory at a configurable rate over a
configurable working set, and checks all of it at any time.

An HVM guest needs no PV drivers and no hypercalls to use its memory: its writes go through
the EPT (:func:`xenpage.hypervisor.hvm.guest_write`), which is where log-dirty sees them.
Each page's content is a 64-bit fingerprint; the guest remembers the last value it wrote to
every gfn (``expect``) and :meth:`HvmGuest.verify` reads them all back.  A gfn reported gone
by a vMCE is taken out of use (Linux's ``memory_failure``) and must stay unusable: the guest
checks that it can no longer reach it.

Workload shapes (writes per second over the guest's vCPUs):

* ``uniform``   -- every write picks a page of the writable working set at random;
* ``hotcold``   -- a fraction ``hot_frac`` of the writes go to a hot set of ``hot_pages``
  pages, the rest to the whole working set (a server: a hot core, a long tail);
* ``sequential`` -- the writes sweep the working set in order, wrapping (a streaming job,
  Clark et al.'s "MMuncher").

The working set is ``wss`` pages (a fraction of memory if < 1) drawn from the guest's gfns by
a seeded permutation.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..abi import hvm as H
from ..hypervisor import hvm as HV
from ..hypervisor import p2m as P

_K = np.uint64(0x9E3779B97F4A7C15)


@dataclass
class Workload:
    rate: float = 0.0
    shape: str = "uniform"
    wss: float = 1.0
    hot_pages: int = 0
    hot_frac: float = 0.9

    def to_state(self) -> dict:
        return asdict(self)


def _fingerprints(seed: int, start: int, n: int) -> np.ndarray:
    """Distinct non-zero 64-bit values for writes ``start .. start+n-1``."""
    i = np.arange(start, start + n, dtype=np.uint64) + np.uint64((seed & 0xFFFF) << 40)
    v = (i + np.uint64(1)) * _K
    v ^= v >> np.uint64(29)
    v[v == 0] = np.uint64(1)
    return v


class HvmGuest:
    kind = "hvm"

    def __init__(self, host, domid: int, seed: int = 1, workload: Workload | None = None):
        self.host = host
        self.domid = domid
        self.seed = seed
        self.workload = workload or Workload()
        self.nr_pages = 0
        self.expect = np.zeros(0, dtype=np.uint64)
        self.poisoned: list[int] = []
        self.writes = 0
        self.carry = 0.0
        self.cursor = 0
        self.run_time = 0.0
        self.faults: list[str] = []
        self.log: list[str] = []
        self._ws: np.ndarray | None = None

    # -- boot ---------------------------------------------------------------------------------
    @classmethod
    def boot(cls, host, domid: int, seed: int = 1, workload: Workload | None = None) -> "HvmGuest":
        """Attach to HVM domain ``domid`` and write every page of its RAM once."""
        g = cls(host, domid, seed, workload)
        p = P.get(host, domid)
        ram = np.flatnonzero(p.type != H.p2m_invalid)
        g.nr_pages = int(ram[-1]) + 1 if ram.size else 0
        g.expect = np.zeros(g.nr_pages, dtype=np.uint64)
        v = _fingerprints(seed ^ 0x5A5A, 0, ram.size)
        g.expect[ram] = v
        bad = HV.guest_write(host, domid, ram, v)
        if bad.size:
            raise RuntimeError(f"d{domid}: {bad.size} pages not writable at boot")
        host.guests[domid] = g
        g.log.append(f"booted: {ram.size} pages, workload {g.workload.to_state()}")
        return g

    # -- the working set --------------------------------------------------------------------------
    def working_set(self) -> np.ndarray:
        if self._ws is None:
            n = self.nr_pages
            w = self.workload.wss
            k = int(round(w * n)) if w <= 1 else int(w)
            k = max(1, min(n, k)) if n else 0
            perm = np.random.default_rng(self.seed).permutation(n)
            self._ws = np.sort(perm[:k]) if self.workload.shape != "sequential" else perm[:k]
        return self._ws

    def _pick(self, k: int, rng: np.random.Generator) -> np.ndarray:
        ws = self.working_set()
        if ws.size == 0 or k == 0:
            return np.zeros(0, dtype=np.int64)
        wl = self.workload
        if wl.shape == "sequential":
            idx = (self.cursor + np.arange(k)) % ws.size
            self.cursor = int((self.cursor + k) % ws.size)
            return ws[idx]
        if wl.shape == "hotcold" and wl.hot_pages:
            hot = min(wl.hot_pages, ws.size)
            nh = int(rng.binomial(k, wl.hot_frac))
            a = ws[rng.integers(0, hot, nh)]
            b = ws[rng.integers(0, ws.size, k - nh)]
            out = np.concatenate([a, b])
            rng.shuffle(out)
            return out
        return ws[rng.integers(0, ws.size, k)]

    # -- running ------------------------------------------------------------------------------------
    def running(self) -> bool:
        d = self.host.domains.get(self.domid)
        return d is not None and not (d.pause_count or d.is_shutting_down or d.dying)

    def run(self, seconds: float) -> None:
        """Run for ``seconds`` of simulated time: take in vMCEs, then write."""
        d = self.host.domains.get(self.domid)
        if d is None:
            return
        for gfn in d.guest.pop("vmce_gfns", []):
            self.on_vmce(gfn)
        if not self.running() or seconds <= 0:
            return
        # a running Linux guest makes hypercalls all the time (timers, event channels): the
        # first one delivers a pending map-cache invalidation to the device model
        HV.hypercall_return(self.host, self.domid)
        self.run_time += seconds
        x = self.workload.rate * seconds + self.carry
        k = int(x)
        self.carry = x - k
        if k == 0:
            return
        self.write(k)

    def write(self, k: int) -> None:
        """``k`` writes of the workload, now."""
        rng = np.random.default_rng([self.seed, self.writes])
        g = self._pick(k, rng)
        if self.poisoned:
            g = g[~np.isin(g, np.array(self.poisoned, dtype=np.int64))]
        v = _fingerprints(self.seed, self.writes, g.size)
        self.writes += int(k)
        bad = HV.guest_write(self.host, self.domid, g, v)
        if bad.size:
            self.faults.append(f"{bad.size} writes faulted, e.g. gfn {int(bad[0]):#x}")
            ok = ~np.isin(g, bad)
            g, v = g[ok], v[ok]
        # the last write to each gfn wins
        rev = g[::-1]
        u, idx = np.unique(rev, return_index=True)
        self.expect[u] = v[::-1][idx]

    def on_vmce(self, gfn: int) -> None:
        """A vMCE for ``gfn``: the kernel poisons the page and never touches it again."""
        if gfn not in self.poisoned and 0 <= gfn < self.nr_pages:
            self.poisoned.append(int(gfn))
            self.expect[gfn] = 0
            self.log.append(f"vMCE: gfn {gfn:#x} poisoned, taken out of use")

    # -- checks ----------------------------------------------------------------------------------------
    def verify(self) -> list[str]:
        """Every page the guest uses holds what it last wrote; every poisoned gfn is
        unusable."""
        bad: list[str] = []
        n = self.nr_pages
        if n == 0:
            return bad
        gf = np.arange(n, dtype=np.int64)
        use = self.expect != 0
        if self.poisoned:
            use[np.array(self.poisoned, dtype=np.int64)] = False
        got, ok = HV.guest_read(self.host, self.domid, gf[use])
        gu = gf[use]
        for g in gu[~ok][:10].tolist():
            bad.append(f"gfn {g:#x} has no usable frame")
        wrong = gu[ok & (got != self.expect[use])]
        for g in wrong[:10].tolist():
            bad.append(f"gfn {g:#x} content changed")
        if self.poisoned:
            pg = np.array(self.poisoned, dtype=np.int64)
            _, reach = HV.guest_read(self.host, self.domid, pg)
            for g in pg[reach][:10].tolist():
                bad.append(f"poisoned gfn {g:#x} is usable again")
        return bad + list(self.faults)

    # -- facts for tools and tests -------------------------------------------------------------------
    @property
    def role(self) -> np.ndarray:
        """Every page is data (for tools that ask a PV guest for its page roles)."""
        return np.zeros(self.nr_pages, dtype=np.int8)

    def mfn(self, gfn: int) -> int:
        return int(self.host.p2m[self.domid][gfn])

    # -- persistence -----------------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {"expect": self.expect}

    def to_state(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "workload": self.workload.to_state(),
                "nr_pages": self.nr_pages, "poisoned": list(self.poisoned), "writes": self.writes,
                "carry": self.carry, "cursor": self.cursor, "run_time": self.run_time,
                "faults": self.faults[-100:], "log": self.log[-200:]}

    @classmethod
    def from_state(cls, host, domid: int, st: dict, arrs: dict) -> "HvmGuest":
        g = cls(host, domid, st["seed"], Workload(**st["workload"]))
        g.expect = np.array(arrs["expect"], dtype=np.uint64)
        for k in ("nr_pages", "poisoned", "writes", "carry", "cursor", "run_time", "faults", "log"):
            setattr(g, k, st[k])
        return g


class PvhGuest(HvmGuest):
    """A PVH guest (``type = "pvh"``): Linux booted straight into a HAP container -- no
    firmware, no device model (so no map cache holding its frames), PV drivers from the start.
    Its memory behaves as an HVM guest's (the same p2m, log-dirty and vMCE paths), so it runs
    the same workload and checks its memory the same way."""

    kind = "pvh"
