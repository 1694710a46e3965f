"""A translated (HVM/PVH) guest's physmap from dom0 on real Xen 4.17: its pages by gfn, the
frames behind them, and giving a gfn back to Xen or getting a fresh frame for it.

* ``read_pages``/``write_pages``: ``xenforeignmemory_map`` takes gfns for a translated guest
  (Xen's ``mod_l1_entry`` looks the gfn up in the guest's p2m for dom0's mapping), so a page is
  copied out or in through a mapping that is dropped at once.  For a PV guest the frames are
  MFNs, as for :meth:`map_foreign`.
* ``decrease_reservation``/``populate_physmap``: ``XENMEM_decrease_reservation`` and
  ``XENMEM_populate_physmap`` issued by dom0 for the guest (``xc_domain_*``, order-0 extents).
  ``guest_remove_page`` drops the gfn from the p2m and the guest's allocation reference; the
  frame is freed when its last reference goes -- at once unless something else (a device
  model's map cache, a grant, a foreign mapping) holds it.  A frame that was offline-pending
  is then offlined by ``free_heap_pages``.
* ``hvm_p2m``: Xen 4.17 gives a dom0 process no gfn -> mfn lookup of a translated guest
  (``XEN_DOMCTL_getmemlist`` was removed; ``getpageframeinfo3`` answers types, not frames;
  the M2P answers mfn -> gfn only).  But dom0 is a PV domain: when it foreign-maps a gfn, Xen
  writes the *machine* frame into dom0's own L1 entry.  So this backend maps the gfns, reads
  its own page-table entries for that mapping and unmaps: the frames, at that moment.  Its
  page-table base comes from ``xc_vcpu_getcontext`` of another dom0 vCPU on which a thread of
  this process spins (Xen refuses the calling vCPU itself, -EINVAL); the tables are mapped
  read-only as ``DOMID_SELF`` (as domid 0 Xen's ``get_pg_owner`` refuses, -ESRCH); the M2P
  must name every gfn back, else the walk is retried (another process ran there).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from ctypes import POINTER, c_uint64

from .lazynp import np

from ...abi import domctl as D
from ...abi import errno as E
from ...abi import hvm as H
from ...abi import xen as X
from . import libs as L
from . import structs as T

_PRESENT, _PSE = 0x1, 0x80
_FRAME_MASK = (1 << 40) - 1


class XenPageData:
    """Pages copied out of a guest: an ``(n, 512)`` uint64 array (the ``PageData`` protocol of
    :mod:`xenpage.toolstack.hypervisor`)."""

    def __init__(self, array: np.ndarray):
        a = np.asarray(array, dtype=np.uint64)
        if a.ndim != 2 or a.shape[1] != 512:
            raise ValueError("page data is (n, 512) uint64")
        self.array = a

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def words(self, i: int) -> np.ndarray:
        return self.array[i].copy()

    def set_words(self, i: int, words: np.ndarray) -> None:
        self.array[i] = np.asarray(words, dtype=np.uint64)

    def select(self, idx) -> "XenPageData":
        return XenPageData(self.array[np.asarray(idx, dtype=np.int64)].copy())

    def __eq__(self, other) -> bool:
        return isinstance(other, XenPageData) and np.array_equal(self.array, other.array)


def _u64p(a: np.ndarray):
    return a.ctypes.data_as(POINTER(c_uint64))


class PhysmapMixin:
    """Methods of :class:`~xenpage.backends.xen.hypervisor.XenHypervisor` for translated
    guests' memory (kept apart: a module per Xen concept)."""

    #: the step of the last failed :meth:`hvm_p2m`, with its errno
    hvm_p2m_failed: str | None = None

    # -- copies through foreign mappings ----------------------------------------------------
    def read_pages(self, domid: int, frames) -> tuple[int, XenPageData | None]:
        """Map ``frames`` (gfns of an HVM/PVH guest, mfns of a PV guest) read-only, copy them
        out and unmap.  A negative errno if any cannot be mapped (nothing copied)."""
        f = np.asarray(frames, dtype=np.int64).ravel()
        if f.size == 0:
            return 0, XenPageData(np.zeros((0, 512), dtype=np.uint64))
        m = self.map_foreign(domid, f, False)
        if isinstance(m, int):
            return m, None
        try:
            return 0, XenPageData(np.array(m.array, copy=True))
        finally:
            m.unmap()

    def write_pages(self, domid: int, frames, data) -> int:
        """Map ``frames`` writable, copy ``data`` (``PageData``) in, unmap; -errno if any
        frame cannot be mapped (nothing written)."""
        f = np.asarray(frames, dtype=np.int64).ravel()
        if len(data) != f.size:
            return -E.EINVAL
        if f.size == 0:
            return 0
        m = self.map_foreign(domid, f, True)
        if isinstance(m, int):
            return m
        try:
            arr = getattr(data, "array", None)
            if arr is None:
                arr = np.stack([data.words(i) for i in range(len(data))])
            m.array[:] = arr
        finally:
            m.unmap()
        return 0

    # -- the guest's reservation ----------------------------------------------------------------
    def decrease_reservation(self, domid: int, gfns) -> int:
        """``XENMEM_decrease_reservation`` of order-0 extents at ``gfns`` (``memory.c``
        ``decrease_reservation`` -> ``guest_remove_page``): the number done (Xen stops at the
        first gfn it cannot remove), or -errno."""
        g = np.ascontiguousarray(np.asarray(gfns, dtype=np.uint64).ravel())
        if g.size == 0:
            return 0
        L.clear_errno()
        r = self.L.xc_domain_decrease_reservation(self.xch, domid, g.size, 0, _u64p(g))
        return r if r >= 0 else L.neg_errno()

    def populate_physmap(self, domid: int, gfns, address_bits: int = 0) -> tuple[int, np.ndarray]:
        """``XENMEM_populate_physmap`` of order-0 extents at ``gfns`` (``memory.c``
        ``populate_physmap``): ``(number done or -errno, the extent array as Xen left it)``.
        For a translated (HVM/PVH) guest Xen does **not** write the new MFNs back: the array
        still holds the gfns (use :meth:`hvm_p2m` to learn the frames); for a PV guest it
        holds the new MFNs."""
        g = np.ascontiguousarray(np.asarray(gfns, dtype=np.uint64).ravel())
        if g.size == 0:
            return 0, g.astype(np.int64)
        L.clear_errno()
        r = self.L.xc_domain_populate_physmap(self.xch, domid, g.size, 0, address_bits & 0xFF, _u64p(g))
        return (r if r >= 0 else L.neg_errno()), g.astype(np.int64)

    # -- gfn -> mfn through dom0's own page tables ------------------------------------------------
    def _vcpu_cr3(self, vcpu: int) -> tuple[int, int]:
        """(rc, mfn of the page-table base) of dom0's ``vcpu`` (``XEN_DOMCTL_getvcpucontext``:
        ``ctrlreg[3]`` from ``v->arch.guest_table``).  Xen 4.17 refuses the calling vCPU
        itself with -EINVAL (lab, 2026-12-05)."""
        buf = ctypes.create_string_buffer(T.VCPU_CONTEXT_ANY_SIZE)
        L.clear_errno()
        if self.L.xc_vcpu_getcontext(self.xch, 0, vcpu, buf):
            return L.neg_errno(), 0
        ctx = T.VcpuGuestContextX8664.from_buffer(buf)
        return 0, int(ctx.ctrlreg[3]) >> 12

    def _own_cr3(self) -> tuple[int, int]:
        """(rc, mfn) of this process's page tables: a sibling thread spins in this process on
        dom0 vCPU ``a`` while this thread, on vCPU ``b``, asks Xen for vCPU ``a``'s context
        (Xen pauses it there, in this process's address space).  -EOPNOTSUPP with one vCPU."""
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return -E.EOPNOTSUPP, 0
        spin_cpu, ask_cpu = cpus[0], cpus[1]
        ready, stop = threading.Event(), threading.Event()

        def spin() -> None:
            os.sched_setaffinity(0, {spin_cpu})     # this thread only
            ready.set()
            while not stop.is_set():
                pass

        th = threading.Thread(target=spin, daemon=True)
        th.start()
        try:
            ready.wait(10)
            os.sched_setaffinity(0, {ask_cpu})
            time.sleep(0.01)
            return self._vcpu_cr3(spin_cpu)
        finally:
            stop.set()
            th.join(10)

    def _walk_own(self, cr3: int, va: np.ndarray) -> tuple[int, np.ndarray]:
        """The L1 entries mapping the virtual addresses ``va`` in dom0's page tables."""
        table = np.full(va.size, cr3, dtype=np.uint64)
        ent = np.zeros(va.size, dtype=np.uint64)
        for shift in (39, 30, 21, 12):
            rc, ent = self._read_entries(X.DOMID_SELF, table, ((va >> np.uint64(shift)) & np.uint64(511)).astype(np.int64))
            if rc:
                return rc, ent
            if not ((ent & np.uint64(_PRESENT)) != 0).all():
                return -E.EFAULT, ent
            if shift in (30, 21) and ((ent & np.uint64(_PSE)) != 0).any():
                return -E.EOPNOTSUPP, ent
            table = (ent >> np.uint64(12)) & np.uint64(_FRAME_MASK)
        return 0, ent

    def hvm_p2m(self, domid: int, gfns) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """``(rc, mfns, p2m types, orders)`` of a translated guest's ``gfns``, found on stock
        Xen 4.17 without any extension: the gfns are foreign-mapped read-only into this
        process and the frames read back from dom0's own L1 entries (see the module's
        docstring).  Types: ``getpageframeinfo3`` of the gfns tells RAM (reported as
        ``p2m_ram_rw``; a log-dirty entry is RAM too), broken (``p2m_ram_broken``) or nothing
        (``p2m_invalid``, mfn -1); Xen 4.17 shows dom0 no finer p2m type.  Orders: -1, the
        guest's NPT/EPT leaf size is not visible to dom0.  -EINVAL for a PV guest, -ESRCH for
        no domain; a gfn that cannot be mapped fails the whole batch with Xen's errno, and
        ``hvm_p2m_failed`` names the step that failed."""
        g = np.asarray(gfns, dtype=np.int64).ravel()
        z = np.zeros(0, dtype=np.int64)
        info = self.domain_info(domid)
        if info is None:
            return -E.ESRCH, z, z, z
        if not info.hvm:
            return -E.EINVAL, z, z, z
        n = g.size
        mfns = np.full(n, -1, dtype=np.int64)
        types = np.full(n, H.p2m_invalid, dtype=np.int64)
        orders = np.full(n, -1, dtype=np.int64)
        if n == 0:
            return 0, mfns, types, orders
        self.hvm_p2m_failed = None
        rc, pt = self.page_types(domid, g)
        if rc:
            self.hvm_p2m_failed = f"getpageframeinfo3: {E.name(rc)}"
            return rc, z, z, z
        kind = pt.astype(np.uint64) & np.uint64(D.XEN_DOMCTL_PFINFO_LTAB_MASK)
        broken = kind == np.uint64(D.XEN_DOMCTL_PFINFO_BROKEN)
        ram = ~broken & (kind != np.uint64(D.XEN_DOMCTL_PFINFO_XTAB))
        types[ram] = H.p2m_ram_rw
        types[broken] = H.p2m_ram_broken
        idx = np.flatnonzero(ram)
        if idx.size == 0:
            return 0, mfns, types, orders
        saved = os.sched_getaffinity(0)
        m = self.map_foreign(domid, g[idx], False)
        if isinstance(m, int):
            self.hvm_p2m_failed = f"foreign map of the gfns: {E.name(m)}"
            return m, z, z, z
        tries = []
        try:
            va = np.uint64(m.addr) + np.arange(idx.size, dtype=np.uint64) * np.uint64(4096)
            for _ in range(8):
                try:
                    rc, cr3 = self._own_cr3()
                finally:
                    os.sched_setaffinity(0, saved)
                if rc:
                    tries.append(f"getvcpucontext: {E.name(rc)}")
                    if rc in (-E.EOPNOTSUPP, -E.EPERM, -E.EACCES):
                        break
                    continue
                rc, l1 = self._walk_own(cr3, va)
                if rc:
                    tries.append(f"walk from {cr3:#x}: {E.name(rc)}")
                    continue
                found = ((l1 >> np.uint64(12)) & np.uint64(_FRAME_MASK)).astype(np.int64)
                # another process may have run on that vCPU: the M2P must name every gfn back
                if (self.m2p(found).astype(np.int64) == g[idx]).all():
                    break
                tries.append(f"walk from {cr3:#x}: frames whose M2P does not name the gfns")
                rc = -E.EAGAIN
        finally:
            m.unmap()
        if rc:
            self.hvm_p2m_failed = "reading dom0's own page tables: " + "; ".join(tries)
            return rc, z, z, z
        mfns[idx] = found
        return 0, mfns, types, orders
