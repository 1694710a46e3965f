"""Small HVM hosts for the HVM / migration tests (kept tiny: hypothesis runs 200 examples
under CI)."""

from __future__ import annotations

import numpy as np

from xenpage.backends.sim import SimHypervisor
from xenpage.guests.hvm import HvmGuest, PvhGuest, Workload
from xenpage.hypervisor.host import Host, HostConfig

MiB = 1 << 20


def hvm_host(guest_mib: int = 8, mem_mib: int = 96, dom0_mib: int = 16, seed: int = 3,
             nr_pcpus: int = 2, pvh: bool = False, headroom: int = 0, **workload):
    """A host with dom0 and one HVM guest (d1) running an :class:`HvmGuest` (``pvh``: a PVH
    guest running a :class:`PvhGuest`); ``headroom``: max_pages beyond its memory (libxl
    gives 256)."""
    h = Host.boot(HostConfig(mem_bytes=mem_mib * MiB, nr_pcpus=nr_pcpus), dom0_pages=dom0_mib * 256)
    d = h.create_domain("pvh" if pvh else "hvm", guest_mib * 256, hvm=True, pvh=pvh,
                        max_pages=guest_mib * 256 + headroom)
    g = (PvhGuest if pvh else HvmGuest).boot(h, d.domid, seed=seed, workload=Workload(**workload))
    return h, SimHypervisor(h), g


def bare_host(mem_mib: int = 96, dom0_mib: int = 16):
    h = Host.boot(HostConfig(mem_bytes=mem_mib * MiB, nr_pcpus=2), dom0_pages=dom0_mib * 256)
    return h, SimHypervisor(h)


def contents(host, domid: int) -> dict[int, int]:
    """gfn -> content fingerprint of every populated gfn of ``domid``."""
    p = host.ept[domid]
    g = np.flatnonzero(p.mfn != np.uint64(2**64 - 1))
    return dict(zip(g.tolist(), host.ft.content[p.mfn[g].astype(np.int64)].tolist()))


def snapshot(host) -> dict:
    """Everything an all-or-nothing operation may not change (the clock aside)."""
    ft = host.ft
    return {
        "ci": ft.count_info.copy(), "ti": ft.type_info.copy(), "own": ft.owner1.copy(),
        "m2p": ft.m2p_plus1.copy(), "content": ft.content.copy(), "bo": ft.buddy_order.copy(),
        "pages": {k: v.copy() for k, v in ft.pages.items()},
        "ept": {d: (p.mfn.copy(), p.type.copy(), p.order.copy(), p.dirty.copy()) for d, p in host.ept.items()},
        "lists": host.heap.list_order(), "offlined": list(host.heap.offlined_list),
        "broken": list(host.heap.broken_list),
        "tot": {d: x.tot_pages for d, x in host.domains.items()},
        "pause": {d: x.pause_count for d, x in host.domains.items()},
    }


def same(a: dict, b: dict) -> list[str]:
    diff = []
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, np.ndarray):
            if not np.array_equal(x, y):
                diff.append(k)
        elif k == "pages":
            if x.keys() != y.keys() or any(not np.array_equal(x[i], y[i]) for i in x):
                diff.append(k)
        elif k == "ept":
            if x.keys() != y.keys() or any(not all(np.array_equal(u, v) for u, v in zip(x[i], y[i])) for i in x):
                diff.append(k)
        elif x != y:
            diff.append(k)
    return diff
