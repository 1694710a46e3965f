"""HVM guests on the simulated host: what the CPU and Xen do for them.

* guest memory accesses go through the p2m (the EPT walk): a write to a log-dirty entry is
  an EPT violation that Xen turns into a dirty bit (:mod:`.paging`); a write to a gfn with no
  usable frame (a hole, a ``p2m_ram_broken`` gfn) is refused -- on a real machine it would
  be an MMIO access to nothing or a machine check;
* ``XENMEM_populate_physmap`` for a translated guest (what a restore does): fresh frames,
  the p2m entries at 4 KiB and the M2P -- and no MFN written back to the caller;
* ``XENMEM_decrease_reservation`` for a translated guest (``guest_remove_page`` on a HAP
  p2m): the gfn's entry goes (a superpage around it is split first), the frame loses its
  allocation reference and is freed -- an offline-pending frame then offlined -- once no one
  else holds a reference; Xen asks the device model to drop its map cache;
* the device model's map cache (QEMU's ``xen_map_cache``): dom0 foreign mappings of an HVM
  guest's gfns, dropped when Xen sends ``IOREQ_TYPE_INVALIDATE``;
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
from ..abi.xen import INVALID_MFN
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

def alloc_order0(host: "Host", n: int, zone_hi: int | None = None) -> np.ndarray:
    """``n`` successive ``alloc_heap_pages(order 0)``: from the highest zone, the smallest
    chunk, the top frame first.  Whole chunks are taken at once (the same frames, in the same
    order, as 2^k single allocations from that chunk); a chunk only partly needed is taken
    whole and its unused low part given back (to the heads of the lists, where Xen's
    split leaves those halves)."""
    heap = host.heap
    out: list[np.ndarray] = []
    left = n
    while left > 0:
        keys = [(z, o) for (z, o), lst in heap.lists.items() if lst and (zone_hi is None or z <= zone_hi)]
        if not keys:
            raise OutOfMemory(0)
        ztop = max(z for z, _ in keys)
        k = min(o for z, o in keys if z == ztop)
        head = heap.alloc(k, zone_hi=zone_hi)
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


def populate_physmap(host: "Host", caller: int, domid: int, gfns, address_bits: int = 0
                     ) -> tuple[int, np.ndarray]:
    """``XENMEM_populate_physmap`` (order-0 extents, GPFNs given) for a translated domain:
    ``(rc, mfns)``; rc is the number of extents done or -errno (the backend gives the caller
    no MFNs: Xen copies none back for a translated guest).  Each extent is
    ``alloc_domheap_pages`` (over ``max_pages``: the call stops there) then
    ``guest_physmap_add_page`` -> ``p2m_add_page``: a gfn that already maps a RAM frame is
    *replaced* -- the old frame's M2P entry invalidated, the frame itself left allocated to
    the domain with no gfn (Xen 4.17 does not free it; it goes with the domain)."""
    c = host.domains.get(caller)
    d = host.domains.get(domid)
    if d is None or d.is_system:
        # do_memory_op: no such domain ends the call before any extent -- it returns the
        # extents done so far (0), not an errno (measured on the lab's Xen 4.17.7)
        return 0, np.zeros(0, dtype=np.int64)
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
    k = min(gfns.size, max(0, d.max_pages - d.tot_pages))
    if k == 0:
        return 0, np.zeros(0, dtype=np.int64)
    gfns = gfns[:k]
    rc = p.split(gfns)  # new 4 KiB entries inside empty superpage entries need tables
    if rc:
        return rc, np.zeros(0, dtype=np.int64)
    # XENMEMF_address_bits, honoured when below the bits max_page needs (construct_memop_from_reservation)
    zone_hi = None
    if address_bits and address_bits < (host.max_page - 1).bit_length() + 12:
        zone_hi = max(address_bits - 12, 1)
    try:
        mfns = alloc_order0(host, k, zone_hi)
    except OutOfMemory:
        return 0, np.zeros(0, dtype=np.int64)
    ft = host.ft
    _assign(host, d, mfns)
    old = p.mfn[gfns][np.isin(p.type[gfns], (H.p2m_ram_rw, H.p2m_ram_logdirty, H.p2m_ram_ro))]
    ft.m2p_plus1[old.astype(np.int64)] = _U(0)  # p2m_add_page: M2P of the replaced frames
    ft.m2p_plus1[mfns] = gfns.astype(np.uint64) + _U(1)
    p.mfn[gfns] = mfns.astype(np.uint64)
    p.type[gfns] = H.p2m_ram_logdirty if p.logdirty else H.p2m_ram_rw
    return k, mfns


def guest_remove_page(host: "Host", d, gfn: int) -> int:
    """``guest_remove_page`` (``xen/common/memory.c``) on a HAP p2m, in Xen 4.17's order:
    ``get_gfn_query`` -- a hole (``p2m_invalid``/``mmio_dm``) -ENOENT, reported as -EINVAL
    by the caller's filter; ``mmio_direct`` -EPERM; an invalid frame -EINVAL; ``get_page``
    (the frame must be d's and referenced) else -ENXIO; ``guest_physmap_remove_page`` ->
    ``p2m_remove_entry``: the M2P entry invalidated, the device model asked to invalidate
    its map cache (``ioreq_request_mapcache_invalidate``: for a domain other than the
    caller's, every vCPU flagged; the ioreq goes out on its next hypercall), then
    ``p2m_set_entry(INVALID_MFN, p2m_invalid)`` at order 0 -- inside a 2 MiB / 1 GiB leaf
    that is ``ept_set_entry`` -> ``ept_split_super_page`` on Intel (``p2m_pt_set_entry`` ->
    ``p2m_next_level`` on AMD NPT): the leaf becomes a table of 512 smaller entries from the
    HAP pool, -ENOMEM if the pool is empty, and then the M2P is put back; finally
    ``put_page_alloc_ref`` (PGC_allocated dropped) and ``put_page``: the frame is freed when
    that was the last reference (``free_domheap_pages`` -> ``free_heap_pages`` offlines an
    offline-pending frame), else it stays allocated -- and counted in ``tot_pages`` -- until
    the last holder lets go."""
    p = P.get(host, d.domid)
    if p is None or not 0 <= gfn < p.size:
        return -E.EINVAL
    t = int(p.type[gfn])
    if t in (H.p2m_invalid, H.p2m_mmio_dm):
        return -E.EINVAL  # -ENOENT, filtered to -EINVAL
    if t == H.p2m_mmio_direct:
        return -E.EPERM
    mfn = int(p.mfn[gfn])
    ft = host.ft
    if not 0 <= mfn < host.nframes:
        return -E.EINVAL
    ci = int(ft.count_info[mfn])
    if ft.owner(mfn) != d.domid or not ci & mm.PGC_count_mask:
        return -E.ENXIO  # get_page failed: "Bad page free"
    ft.count_info[mfn] = _U(ci + 1)  # get_page
    g = np.array([gfn])
    b1, b2 = p.split_needed(g)
    if p.pool_used() + b1.size + b2.size > p.pool_pages:
        host.put_page(mfn)  # p2m_set_entry failed: M2P put back, the reference given back
        return -E.ENOMEM
    ft.m2p_plus1[mfn] = _U(0)
    d.mapcache_invalidate = True
    rc = p.split(g)
    assert rc == 0
    p.mfn[gfn] = _U(INVALID_MFN)
    p.type[gfn] = H.p2m_invalid
    p.stats["flushes"] += 1
    c = int(ft.count_info[mfn])
    if c & mm.PGC_allocated:  # put_page_alloc_ref
        ft.count_info[mfn] = _U(c & ~mm.PGC_allocated)
        host.put_page(mfn)
    host.put_page(mfn)
    return 0


def decrease_reservation(host: "Host", caller: int, domid: int, gfns) -> int:
    """``XENMEM_decrease_reservation`` of order-0 extents for a translated guest, as
    ``do_memory_op`` and ``decrease_reservation`` (``xen/common/memory.c``) run it: the target
    domain (``rcu_lock_domain_by_any_id``; none: the call returns the extents done so far, 0 --
    not -ESRCH: the lab's Xen 4.17.7 answered 0), ``xsm_memory_adjust_reservation``
    (a domain other than the caller's: the caller must be privileged, -EPERM); then per
    extent ``p2m_pod_decrease_reservation`` (no PoD entries here) and ``guest_remove_page``.
    The first extent that cannot be removed ends the call: the result is the number of
    extents done (Xen returns ``nr_done``; the errno of that extent is not reported)."""
    c = host.domains.get(caller)
    d = host.domains.get(domid)
    if d is None or d.is_system:
        return 0
    if caller != domid and not (c and c.privileged):
        return -E.EPERM
    gl = [int(g) for g in np.asarray(gfns, dtype=np.int64).ravel().tolist()]
    if not d.hvm:  # a PV guest names machine frames (memory.decrease_reservation)
        from .memory import Reservation
        from .memory import decrease_reservation as pv_decrease
        return pv_decrease(host, caller, Reservation(gl, 0, domid))
    done = 0
    for g in gl:
        if guest_remove_page(host, d, g) != 0:
            break
        done += 1
    return done


# -- the device model's map cache ---------------------------------------------------------------

#: ``ForeignMapping.what`` of QEMU's map-cache buckets
MAPCACHE = "qemu-mapcache"
#: QEMU's map-cache bucket on 64-bit hosts (``MCACHE_BUCKET_SHIFT`` 20): 256 gfns
MAPCACHE_BUCKET = 256


def dm_map(host: "Host", domid: int, gfn: int) -> int:
    """The device model maps the map-cache bucket holding ``gfn`` (``xen_remap_bucket``:
    ``xenforeignmemory_map`` of 256 gfns, holes skipped) -- what it does when it emulates a
    DMA into the guest.  PVH guests have no device model: -ENODEV.  Returns 0 or -errno."""
    from . import foreign
    d = host.domains.get(domid)
    p = P.get(host, domid)
    if d is None or p is None:
        return -E.ESRCH
    if getattr(d, "pvh", False):
        return -E.ENODEV
    s = gfn // MAPCACHE_BUCKET * MAPCACHE_BUCKET
    g = np.arange(s, min(s + MAPCACHE_BUCKET, p.size), dtype=np.int64)
    g = g[np.isin(p.type[g], (H.p2m_ram_rw, H.p2m_ram_logdirty, H.p2m_ram_ro))]
    rc, h = foreign.map_frames(host, 0, domid, g, True)
    if rc:
        return rc
    host.foreign.maps[h].what = MAPCACHE
    return 0


def hypercall_return(host: "Host", domid: int) -> int:
    """The guest made a hypercall (``hvm_hypercall``): if its vCPU carries the
    ``mapcache_invalidate`` flag, ``ioreq_signal_mapcache_invalidate`` sends
    ``IOREQ_TYPE_INVALIDATE`` to its ioreq servers and QEMU drops every map-cache bucket
    (``xen_invalidate_map_cache``).  Returns the number of buckets dropped."""
    from . import foreign
    d = host.domains.get(domid)
    if d is None or not getattr(d, "mapcache_invalidate", False):
        return 0
    d.mapcache_invalidate = False
    n = 0
    for h, m in list(host.foreign.maps.items()):
        if m.domid == domid and m.what == MAPCACHE:
            foreign.unmap(host, h)
            n += 1
    return n


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
    """``XENMEM_maximum_gpfn`` (``domain_get_maximum_gpfn``): for a translated guest the
    highest gfn with an entry (-1 for none); for a PV guest the ``max_pfn`` its kernel wrote
    into the shared info page, less one -- 0 while it has written none."""
    p = P.get(host, domid)
    if p is None:
        return max(int(host.domains[domid].p2m_max_pfn or 0), 1) - 1
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
