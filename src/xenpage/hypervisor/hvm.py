"""HVM guests on the simulated host: what the CPU and Xen do for them.

* guest memory accesses go through the p2m (the EPT walk): a write to a log-dirty entry is
  an EPT violation that Xen turns into a dirty bit (:mod:`.paging`); a write to a gfn with no
  usable frame (a hole, a ``p2m_ram_broken`` gfn) is refused -- on a real machine it would
  be an MMIO access to nothing or a machine check;
* ``XENMEM_populate_physmap`` for a translated guest (what a restore does): fresh frames,
  the p2m entries at 4 KiB and the M2P;
* the vMCE that tells a guest one of its gfns is gone (``unmmap_broken_page`` +
  ``inject_vmce``);
* ``XEN_DOMCTL_gethvmcontext`` / ``sethvmcontext``: the vCPU and platform state that travels
  in a migration stream (here it also carries the simulated guest kernel's own state, which
  on a real machine lives in the guest's memory and registers).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import hvm as H
from ..abi import mm
from . import p2m as P
from . import paging
from .page_alloc import OutOfMemory

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

_U = np.uint64


# -- guest accesses ---------------------------------------------------------------------------

def full_pages(ft, mfns: np.ndarray) -> np.ndarray:
    """Those of ``mfns`` whose content is a real 512-word array (``ft.pages``)."""
    if not ft.pages or mfns.size == 0:
        return np.zeros(0, dtype=np.int64)
    keys = np.fromiter(ft.pages.keys(), dtype=np.int64, count=len(ft.pages))
    return np.unique(mfns[np.isin(mfns, keys)])


def _last_per_gfn(gfns: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Writes in order: the last value written to each gfn."""
    rev = gfns[::-1]
    u, idx = np.unique(rev, return_index=True)
    return u, values[::-1][idx]


def guest_write(host: "Host", domid: int, gfns, values) -> np.ndarray:
    """The guest (all its vCPUs) writes ``values`` (64-bit content fingerprints) to ``gfns``,
    in order.  Returns the gfns that could not be written (no writable frame behind them).
    Log-dirty entries fault and are marked dirty first."""
    p = P.get(host, domid)
    d = host.domains.get(domid)
    gfns = np.asarray(gfns, dtype=np.int64)
    values = np.asarray(values, dtype=np.uint64)
    if p is None or d is None or d.dying or gfns.size == 0:
        return gfns
    g, v = _last_per_gfn(gfns, values)
    inb = (g >= 0) & (g < p.size)
    t = np.full(g.size, H.p2m_invalid, dtype=np.uint8)
    t[inb] = p.type[g[inb]]
    ok = inb & ((t == H.p2m_ram_rw) | (t == H.p2m_ram_logdirty))
    ld = g[ok & (t == H.p2m_ram_logdirty)]
    if ld.size:
        rc = paging.write_fault(p, ld)
        if rc:
            host.crash(domid, f"hvm_hap_nested_page_fault (p2m_change_type_one {E.name(rc)})")
            return gfns
    m = p.mfn[g[ok]].astype(np.int64)
    ft = host.ft
    for x in full_pages(ft, m).tolist():
        del ft.pages[x]
    ft.content[m] = v[ok]
    return g[~ok]


def guest_read(host: "Host", domid: int, gfns) -> tuple[np.ndarray, np.ndarray]:
    """Content fingerprints of ``gfns`` as the guest reads them, and a mask of the gfns that
    have a readable frame (ram_rw / ram_logdirty / ram_ro)."""
    p = P.get(host, domid)
    gfns = np.asarray(gfns, dtype=np.int64)
    out = np.zeros(gfns.size, dtype=np.uint64)
    if p is None:
        return out, np.zeros(gfns.size, dtype=bool)
    inb = (gfns >= 0) & (gfns < p.size)
    t = np.full(gfns.size, H.p2m_invalid, dtype=np.uint8)
    t[inb] = p.type[gfns[inb]]
    ok = inb & np.isin(t, (H.p2m_ram_rw, H.p2m_ram_logdirty, H.p2m_ram_ro))
    m = p.mfn[gfns[ok]].astype(np.int64)
    out[ok] = host.ft.content[m]
    for x in full_pages(host.ft, m).tolist():
        out[np.flatnonzero(ok)[m == x]] = host.ft.fingerprint(x)
    return out, ok


# -- populate (XENMEM_populate_physmap for a translated guest) ----------------------------------

def alloc_order0(host: "Host", n: int) -> np.ndarray:
    """``n`` successive ``alloc_heap_pages(order 0)``: from the highest zone, the smallest
    chunk, the top frame first.  Whole chunks are taken at once (the same frames, in the same
    order, as 2^k single allocations from that chunk); a chunk only partly needed is taken
    whole and its unused low part given back (to the tails of the lists)."""
    heap = host.heap
    out: list[np.ndarray] = []
    left = n
    while left > 0:
        keys = [(z, o) for (z, o), lst in heap.lists.items() if lst]
        if not keys:
            raise OutOfMemory(0)
        ztop = max(z for z, _ in keys)
        k = min(o for z, o in keys if z == ztop)
        head = heap.alloc(k)
        size = 1 << k
        take = min(size, left)
        out.append(np.arange(head + size - 1, head + size - 1 - take, -1, dtype=np.int64))
        if take < size:
            # give back [head, head + size - take) as aligned chunks
            s, e = head, head + size - take
            while s < e:
                o = min((s & -s).bit_length() - 1 if s else 63, (e - s).bit_length() - 1)
                heap.free(s, o)
                s += 1 << o
        left -= take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def populate_physmap(host: "Host", caller: int, domid: int, gfns) -> tuple[int, np.ndarray]:
    """``XENMEM_populate_physmap`` (order-0 extents, GPFNs given) for an HVM domain:
    ``(rc, mfns)``; rc is the number of extents done or -errno.  A gfn already populated is
    refused (the restore never asks twice)."""
    c = host.domains.get(caller)
    d = host.domains.get(domid)
    if d is None or d.is_system:
        return -E.ESRCH, np.zeros(0, dtype=np.int64)
    if caller != domid and not (c and c.privileged):
        return -E.EPERM, np.zeros(0, dtype=np.int64)
    p = P.get(host, domid)
    gfns = np.asarray(gfns, dtype=np.int64)
    if p is None and not d.hvm:
        return _populate_pv(host, d, gfns)
    if p is None:
        return -E.EINVAL, np.zeros(0, dtype=np.int64)
    if gfns.size == 0:
        return 0, np.zeros(0, dtype=np.int64)
    if (gfns < 0).any() or np.unique(gfns).size != gfns.size:
        return -E.EINVAL, np.zeros(0, dtype=np.int64)
    top = int(gfns.max()) + 1
    if top > p.size:
        p.grow(max(top, 2 * p.size))
        P.rebind(host, domid)
    if (p.type[gfns] != H.p2m_invalid).any():
        return -E.EEXIST, np.zeros(0, dtype=np.int64)
    k = min(gfns.size, max(0, d.max_pages - d.tot_pages))
    if k == 0:
        return 0, np.zeros(0, dtype=np.int64)
    gfns = gfns[:k]
    rc = p.split(gfns)  # new 4 KiB entries inside empty superpage entries need tables
    if rc:
        return rc, np.zeros(0, dtype=np.int64)
    try:
        mfns = alloc_order0(host, k)
    except OutOfMemory:
        return 0, np.zeros(0, dtype=np.int64)
    ft = host.ft
    _assign(host, d, mfns)
    ft.m2p_plus1[mfns] = gfns.astype(np.uint64) + _U(1)
    p.mfn[gfns] = mfns.astype(np.uint64)
    p.type[gfns] = H.p2m_ram_logdirty if p.logdirty else H.p2m_ram_rw
    return k, mfns


def _assign(host: "Host", d, mfns: np.ndarray) -> None:
    ft = host.ft
    keep = ft.count_info[mfns] & _U(mm.PGC_preserved)
    ft.count_info[mfns] = keep | _U(mm.PGC_allocated | 1)
    ft.owner1[mfns] = d.domid + 1
    d.tot_pages += int(mfns.size)


def _populate_pv(host: "Host", d, gfns: np.ndarray) -> tuple[int, np.ndarray]:
    """The PV flavour: frames allocated one extent after the other, ``M2P[new] = gpfn``
    (a PV guest keeps its own P2M).  Same frames as ``memory.populate_physmap``, vectorised."""
    k = min(gfns.size, max(0, d.max_pages - d.tot_pages))
    if k == 0:
        return 0, np.zeros(0, dtype=np.int64)
    try:
        mfns = alloc_order0(host, k)
    except OutOfMemory:
        return 0, np.zeros(0, dtype=np.int64)
    _assign(host, d, mfns)
    host.ft.m2p_plus1[mfns] = gfns[:k].astype(np.uint64) + _U(1)
    return k, mfns


def maximum_gpfn(host: "Host", domid: int) -> int:
    """``XENMEM_maximum_gpfn``: the highest gfn with an entry (-1 for none)."""
    p = P.get(host, domid)
    if p is None:
        arr = host.p2m.get(domid)
        return (arr.size - 1) if arr is not None else -1
    v = np.flatnonzero(p.type != H.p2m_invalid)
    return int(v[-1]) if v.size else -1


# -- vMCE -----------------------------------------------------------------------------------

def inject_vmce(host: "Host", domid: int, gfn: int) -> None:
    """The guest is told (vMCE) that ``gfn`` is gone; its kernel takes the page out of use
    (Linux ``memory_failure``).  The simulated guest reads ``d.guest["vmce_gfns"]``."""
    d = host.domains[domid]
    d.guest.setdefault("vmce_gfns", []).append(int(gfn))
    g = host.guests.get(domid)
    if g is not None and hasattr(g, "on_vmce"):
        g.on_vmce(int(gfn))


def machine_check_guest_frame(host: "Host", mfn: int) -> tuple[int, int, int | None]:
    """An uncorrected memory error on a frame of an HVM guest, as ``mc_memerr_dhandler``
    handles it for a HAP guest: ``offline_page(mfn, broken=1)`` (the frame becomes offline
    pending + broken), ``unmmap_broken_page`` (its gfn turns ``p2m_ram_broken``) and a vMCE
    to the guest.  Returns ``(rc, status, gfn)``."""
    from .sysctl import machine_check_offline
    owner = host.ft.owner(mfn)
    rc, st = machine_check_offline(host, mfn)
    if rc or owner is None or owner not in host.ept:
        return rc, st, None
    gfn = P.unmmap_broken_page(host, owner, mfn)
    if gfn < 0:
        host.crash(owner, "mc_memerr_dhandler (unmmap_broken_page failed)")
        return rc, st, None
    inject_vmce(host, owner, gfn)
    return rc, st, gfn


# -- HVM context ----------------------------------------------------------------------------

#: Simulated size of ``XEN_DOMCTL_gethvmcontext``'s blob: the platform (PIC, IOAPIC, PIT,
#: RTC, HPET, PM timer) and per vCPU the CPU, LAPIC and its registers, MTRRs and XSAVE.
HVM_CONTEXT_PLATFORM_BYTES = 2048
HVM_CONTEXT_PER_VCPU_BYTES = 6144


@dataclass
class HvmContext:
    """The opaque HVM context blob.  ``guest`` holds the simulated guest kernel's state (see
    the module docstring); the toolstack never looks inside."""

    vcpus: int
    nbytes: int
    guest: dict | None = None
    guest_arrays: dict = field(default_factory=dict)


def get_context(host: "Host", domid: int) -> tuple[int, HvmContext | None]:
    d = host.domains.get(domid)
    if d is None or d.is_system:
        return -E.ESRCH, None
    if not d.hvm:
        return -E.EINVAL, None
    g = host.guests.get(domid)
    st = arrs = None
    if g is not None:
        st = copy.deepcopy(g.to_state())
        arrs = {k: np.array(v, copy=True) for k, v in g.arrays().items()}
    return 0, HvmContext(d.vcpus, HVM_CONTEXT_PLATFORM_BYTES + HVM_CONTEXT_PER_VCPU_BYTES * d.vcpus,
                         st, arrs or {})


def set_context(host: "Host", domid: int, ctx: HvmContext) -> int:
    d = host.domains.get(domid)
    if d is None or d.is_system:
        return -E.ESRCH
    if not d.hvm or not isinstance(ctx, HvmContext) or ctx.vcpus != d.vcpus:
        return -E.EINVAL
    if ctx.guest is not None:
        from .guest_models import restore as restore_guest
        st = copy.deepcopy(ctx.guest)
        arrs = {k: np.array(v, copy=True) for k, v in ctx.guest_arrays.items()}
        host.guests[domid] = restore_guest(host, domid, st, arrs)
    return 0
