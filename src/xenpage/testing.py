"""Helpers for the reliability tests and the soak run (simulator only): small hosts, a guest's
*logical image* (what the guest can observe, independent of which machine frames hold it),
and "world actions" that other parties perform between two hypercalls of the toolstack.

Two images are compared to decide what an interrupted or failed operation did:

* ``physical`` -- P2M, and per frame content, type and count: bit-identical means "rolled
  back" (or never started);
* ``logical`` -- per *pseudo-physical* page: content (page-table entries and P2M words that
  name the guest's own frames translated to PFNs through the M2P), type and count: equal
  means the guest sees exactly the memory it had -- an exchange that completed keeps it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .abi import grant as G
from .abi import mm
from .abi import pte as P
from .abi import sysctl as S
from .backends.sim import DefaultHostSpec, SimHypervisor, build_host
from .hypervisor import invariants, sysctl

_U = np.uint64
_STATE_MASK = _U(~mm.PGC_state & 0xFFFFFFFFFFFFFFFF)

SMALL = DefaultHostSpec(mem_mib=128, dom0_mib=32, pv_guests=(("pv1", 8), ("pv2", 8)),
                        hvm_guests=(("hvm1", 4),), nr_pcpus=2, seed=7)


def small_host(spec: DefaultHostSpec | None = None):
    """A 128 MiB host: dom0 (32 MiB), two Linux-like PV guests (8 MiB) and an HVM guest."""
    host = build_host(spec or SMALL)
    return host, SimHypervisor(host)


@dataclass(frozen=True)
class Image:
    p2m: bytes = field(repr=False)
    physical: str
    logical: str
    #: the logical content alone (no counts or types: other parties may map the pages)
    content: str = ""

    def same_memory(self, other: "Image") -> bool:
        return self.logical == other.logical

    def same_content(self, other: "Image") -> bool:
        return self.content == other.content


def image(host, domid: int) -> Image:
    """The guest's memory as it can see it (see the module docstring)."""
    from .guests import linux_pv as L
    g = host.guests.get(domid)
    p2m = host.pv_p2m(domid)
    p2m = np.asarray(p2m).astype(np.int64)
    ft = host.ft
    n = p2m.size
    ok = (p2m >= 0) & (p2m < host.nframes)
    mf = np.where(ok, p2m, 0)
    ph = hashlib.blake2b(digest_size=16)
    lo = hashlib.blake2b(digest_size=16)
    co = _Tee(lo)
    ph.update(p2m.tobytes())
    ci = np.where(ok, ft.count_info[mf] & _STATE_MASK, _U(0))
    ti = np.where(ok, ft.type_info[mf], _U(0))
    for h in (ph, lo):
        h.update(ci.tobytes())
        h.update(ti.tobytes())
    lo = co
    role = g.role if g is not None else np.zeros(n, dtype=np.int8)
    own = host.ft.owner1.astype(np.int64) - 1
    m2p = ft.m2p_plus1.astype(np.int64) - 1
    for pf in range(n):
        if not ok[pf]:
            continue
        m = int(p2m[pf])
        if m in ft.pages:
            words = ft.pages[m]
        else:
            c = int(ft.content[m])
            ph.update(c.to_bytes(8, "little"))
            lo.update(c.to_bytes(8, "little"))
            continue
        ph.update(words.tobytes())
        r = int(role[pf]) if pf < role.size else -1
        if r in (L.L1T, L.L2T, L.L3T, L.L4T):
            fr = ((words >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)
            fr = np.clip(fr, 0, host.nframes - 1)
            mine = ((words & _U(P._PAGE_PRESENT)) != 0) & (own[fr] == domid)
            flags = words & _U(~P.PTE_FRAME_MASK & 0xFFFFFFFFFFFFFFFF)
            tr = np.where(mine, flags | (m2p[fr].astype(np.uint64) << _U(12)), words)
            lo.update(tr.tobytes())
            lo.update(mine.tobytes())
        elif r in (L.P2M, L.P2M_FL, L.P2M_FLL):
            fr = np.clip(words.astype(np.int64), 0, host.nframes - 1)
            mine = (words < _U(host.nframes)) & (own[fr] == domid)
            tr = np.where(mine, m2p[fr].astype(np.uint64), words)
            lo.update(tr.tobytes())
            lo.update(mine.tobytes())
        else:
            lo.update(words.tobytes())
    return Image(p2m.tobytes(), ph.hexdigest(), lo.a.hexdigest(), lo.b.hexdigest())


class _Tee:
    """Feeds the logical hash (counts and types already in) and the content-only hash."""

    def __init__(self, a):
        self.a, self.b = a, hashlib.blake2b(digest_size=16)

    def update(self, data) -> None:
        self.a.update(data)
        self.b.update(data)


def images(host) -> dict[int, Image]:
    return {d: image(host, d) for d in sorted(host.guests) if d in host.domains}


def problems(host) -> list[str]:
    """Invariant violations plus every guest's own memory check."""
    out = list(invariants.check(host))
    for d, g in sorted(host.guests.items()):
        if d in host.domains:
            out += [f"d{d}: {p}" for p in g.verify()]
    return out


# -- world actions (other parties acting between two hypercalls of the toolstack) -----------

def dom0_maps(domid: int, mfn: int, writable: bool = False):
    """A dom0 process maps the frame (``xenforeignmemory_map``) and keeps it mapped."""
    def act(hv):
        hv.host.hypercalls(0).foreign_map(domid, [mfn], writable)
    act.__name__ = f"dom0_maps({mfn:#x})"
    return act


def guest_grants_and_dom0_maps(domid: int, mfn: int, ref: int = 200):
    """The guest grants the frame to dom0 and a backend maps the grant."""
    from .hypervisor import grant_table

    def act(hv):
        h = hv.host
        if grant_table.write_entry(h, domid, ref, G.GTF_permit_access, 0, mfn):
            h.hypercalls(0).grant_map(domid, ref, G.GNTMAP_host_map)
    act.__name__ = f"grant_and_map({mfn:#x})"
    return act


def other_toolstack_onlines(mfn: int):
    def act(hv):
        sysctl.page_offline_op(hv.host, 0, S.sysctl_page_online, mfn, mfn, pcpu=1)
    act.__name__ = f"online({mfn:#x})"
    return act


def guest_destroyed(domid: int):
    def act(hv):
        if domid in hv.host.domains:
            hv.host.destroy_domain(domid)
    act.__name__ = f"destroy(d{domid})"
    return act
