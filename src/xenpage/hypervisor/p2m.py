"""The p2m of an HVM guest: an EPT-like, hypervisor-managed gfn -> mfn map
(``xen/arch/x86/mm/p2m.c``, ``p2m-ept.c``).

Xen walks a 4-level EPT whose leaves sit at level 1 (4 KiB), level 2 (2 MiB, ``sp`` bit) or
level 3 (1 GiB).  The HVM domain builder maps a guest with 1 GiB pages where it can, 2 MiB
next and 4 KiB last; a superpage stays a superpage until something needs one of its 4 KiB
frames on its own -- a type change of one gfn (log-dirty, a broken page) or a new frame for
it -- and then ``ept_split_super_page`` replaces the leaf with a table of 512 smaller
entries.  Xen 4.17 never merges them back.

Here the entries are kept as flat per-gfn arrays, vectorised:

* ``mfn``   (uint64, ``INVALID_MFN`` where nothing is mapped) -- this is ``host.p2m[domid]``,
  the array every older part of the simulator reads as "the HVM guest's p2m";
* ``type``  (uint8, ``p2m_type_t``);
* ``order`` (int8): the order of the leaf entry that maps the gfn: 18 (a 1 GiB leaf), 9 (a
  2 MiB leaf) or 0 (an entry of a level-1 table).  Unpopulated gfns take the order of the
  empty entry that covers them.

The EPT tables themselves are a pure function of these arrays (:meth:`P2M.walk` shows the
entries at every level, Xen's ``ept_entry_t`` layout); which tables exist follows from
``order``: a level-1 table for each 2 MiB block mapped with 4 KiB entries, a level-2 table
for each 1 GiB block that is not a 1 GiB leaf, a level-3 table per 512 GiB and the root.
They come from the domain's HAP pool (``hap_set_allocation``, sized by libxl's
``libxl_get_required_shadow_memory``): a split that finds the pool exhausted fails with
-ENOMEM before anything changes.  The pool's frames are not modelled as machine frames.

Log-dirty state (``xen/arch/x86/mm/paging.c``) lives here too; see :mod:`.paging`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import hvm as H
from ..abi import mm
from ..abi.xen import INVALID_MFN

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

_U = np.uint64
_INV = _U(INVALID_MFN)
O4K, O2M, O1G = H.PAGE_ORDER_4K, H.PAGE_ORDER_2M, H.PAGE_ORDER_1G
_B2M, _B1G, _B512G = 1 << O2M, 1 << O1G, 1 << 27


def shadow_pool_pages(max_pages: int, vcpus: int = 1) -> int:
    """libxl's default HAP pool: ``4 * (256 * vcpus + 2 * maxmem_MiB)`` KiB, in pages."""
    kib = 4 * (256 * vcpus + 2 * ((max_pages * 4) // 1024))
    return max(kib // 4, 16)


def _flags(t: np.ndarray) -> np.ndarray:
    """``ept_p2m_type_to_flags``: R/W/X of a leaf by its p2m type."""
    f = np.zeros(t.shape, dtype=np.uint64)
    f[t == H.p2m_ram_rw] = H.EPTE_R | H.EPTE_W | H.EPTE_X
    ro = (t == H.p2m_ram_logdirty) | (t == H.p2m_ram_ro)
    f[ro] = H.EPTE_R | H.EPTE_X
    return f


@dataclass
class P2M:
    domid: int
    mfn: np.ndarray
    type: np.ndarray
    order: np.ndarray
    pool_pages: int
    #: log-dirty (``d->arch.paging.log_dirty``)
    logdirty: bool = False
    dirty: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    fault_count: int = 0
    dirty_count: int = 0
    #: counters for the cost model and tests: splits by level, EPT flushes
    stats: dict = field(default_factory=lambda: {"split_1g": 0, "split_2m": 0, "flushes": 0})

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def empty(cls, domid: int, size: int, pool_pages: int) -> "P2M":
        p = cls(domid, np.full(size, _INV, dtype=np.uint64),
                np.full(size, H.p2m_invalid, dtype=np.uint8), np.zeros(size, dtype=np.int8),
                pool_pages)
        p.dirty = np.zeros(size, dtype=bool)
        p._empty_orders(0, size)
        return p

    @property
    def size(self) -> int:
        return int(self.mfn.size)

    def _empty_orders(self, a: int, b: int) -> None:
        """Unpopulated gfns of [a, b) take the order of the empty entry covering them: a
        whole 1 GiB block with nothing in it is an empty level-3 entry, a whole 2 MiB block
        an empty level-2 entry; the rest sit in level-1 tables."""
        n = self.size
        for blk, o in ((_B1G, O1G), (_B2M, O2M)):
            s = (a // blk) * blk
            while s < b:
                e = s + blk
                if e <= n and (self.type[s:e] == H.p2m_invalid).all() \
                        and (self.order[s:e] <= o).all() and (self.order[s:e] == self.order[s]).all():
                    self.order[s:e] = o
                s = e

    def grow(self, size: int) -> None:
        """Cover gfns up to ``size`` (``p2m->max_mapped_pfn`` grows as gfns are populated)."""
        old = self.size
        if size <= old:
            return
        self.mfn = np.concatenate([self.mfn, np.full(size - old, _INV, dtype=np.uint64)])
        self.type = np.concatenate([self.type, np.full(size - old, H.p2m_invalid, dtype=np.uint8)])
        self.order = np.concatenate([self.order, np.zeros(size - old, dtype=np.int8)])
        self.dirty = np.concatenate([self.dirty, np.zeros(size - old, dtype=bool)])
        self._empty_orders(old, size)

    # -- the tables (derived) ----------------------------------------------------------------
    def tables(self) -> dict[int, int]:
        """Number of EPT tables per level (what the pool must hold)."""
        n = self.size
        if n == 0:
            return {4: 0, 3: 0, 2: 0, 1: 0}
        o = self.order
        n2 = (n + _B2M - 1) // _B2M
        pad2 = np.ones(n2 * _B2M, dtype=bool)
        pad2[:n] = o != O4K
        l1 = int((~pad2.reshape(n2, _B2M)).any(axis=1).sum())
        n1 = (n + _B1G - 1) // _B1G
        pad1 = np.ones(n1 * _B1G, dtype=bool)
        pad1[:n] = o == O1G
        l2 = int((~pad1.reshape(n1, _B1G)).any(axis=1).sum())
        return {4: 1, 3: (n + _B512G - 1) // _B512G, 2: l2, 1: l1}

    def pool_used(self) -> int:
        return sum(self.tables().values())

    def leaf_entry(self, gfn: int) -> int:
        """The leaf ``ept_entry_t`` mapping ``gfn`` (0 for an empty entry)."""
        t = int(self.type[gfn])
        if t == H.p2m_invalid:
            return 0
        o = int(self.order[gfn])
        head = gfn >> o << o
        m = int(self.mfn[head])
        e = (m << H.EPTE_MFN_SHIFT) & H.EPTE_MFN_MASK
        e |= int(_flags(np.array([t], dtype=np.uint8))[0]) | (H.MTRR_TYPE_WRBACK << H.EPTE_EMT_SHIFT)
        e |= (t << H.EPTE_P2MT_SHIFT)
        if o:
            e |= H.EPTE_SP
        return e

    def walk(self, gfn: int) -> list[tuple[int, str, int]]:
        """The entries a hardware walk of ``gfn`` meets: ``(level, kind, entry)`` with kind
        ``table`` / ``leaf`` / ``empty``, from level 4 down.  A table pointer names the pool
        page by a stable index (pool frames are not machine frames here)."""
        out: list[tuple[int, str, int]] = []
        o = int(self.order[gfn]) if 0 <= gfn < self.size else None
        leaf_level = {O1G: 3, O2M: 2, O4K: 1}.get(o, 4) if o is not None else 4
        for level in (4, 3, 2, 1):
            if level > leaf_level:
                # the level-(L-1) table covering gfn, named by (level, index) in the pool
                idx = ((level - 1) << 28) | ((gfn >> (9 * (level - 1))) & 0xFFFFFFF)
                out.append((level, "table", (idx << 12) | H.EPTE_R | H.EPTE_W | H.EPTE_X))
                continue
            e = self.leaf_entry(gfn) if o is not None else 0
            out.append((level, "leaf" if e else "empty", e))
            break
        return out

    # -- changes -------------------------------------------------------------------------------
    def split_needed(self, gfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The 1 GiB blocks and 2 MiB blocks that must be split so that every gfn of
        ``gfns`` has a 4 KiB entry of its own."""
        g = np.unique(np.asarray(gfns, dtype=np.int64))
        o = self.order[g]
        b1 = np.unique(g[o == O1G] >> O1G)
        b2 = np.unique(g[o >= O2M] >> O2M)
        return b1, b2

    def split(self, gfns: np.ndarray) -> int:
        """``ept_split_super_page`` down to 4 KiB for every superpage holding one of
        ``gfns``: all or nothing (-ENOMEM when the HAP pool cannot hold the new tables)."""
        b1, b2 = self.split_needed(gfns)
        if b1.size == 0 and b2.size == 0:
            return 0
        if self.pool_used() + b1.size + b2.size > self.pool_pages:
            return -E.ENOMEM
        for b in b1.tolist():
            self.order[b << O1G:(b + 1) << O1G] = O2M
        for b in b2.tolist():
            self.order[b << O2M:(b + 1) << O2M] = O4K
        self.stats["split_1g"] += int(b1.size)
        self.stats["split_2m"] += int(b2.size)
        return 0

    def set_entries(self, gfns: np.ndarray, mfns: np.ndarray, types) -> int:
        """``p2m_set_entry`` at order 0 for each gfn (splitting superpages first)."""
        gfns = np.asarray(gfns, dtype=np.int64)
        if gfns.size and int(gfns.max()) >= self.size:
            self.grow(int(gfns.max()) + 1)
        rc = self.split(gfns)
        if rc:
            return rc
        self.mfn[gfns] = np.asarray(mfns, dtype=np.uint64)
        self.type[gfns] = types
        return 0

    def map_range(self, gfn: int, mfn: int, n: int, order: int, t: int = H.p2m_ram_rw) -> None:
        """The builder's mapping of ``n`` frames from ``mfn`` at ``gfn`` with leaves of
        ``order`` (the range is aligned to it)."""
        self.grow(gfn + n)
        sl = slice(gfn, gfn + n)
        self.mfn[sl] = np.arange(mfn, mfn + n, dtype=np.uint64)
        self.type[sl] = t
        self.order[sl] = order
        if order == O4K:
            s = gfn // _B2M * _B2M
            e = min(self.size, -(-(gfn + n) // _B2M) * _B2M)
            self.order[s:e] = np.minimum(self.order[s:e], 0)
        if order < O1G:
            s = gfn // _B1G * _B1G
            e = min(self.size, -(-(gfn + n) // _B1G) * _B1G)
            blk = self.order[s:e]
            blk[blk == O1G] = O2M

    def change_type_global(self, old: int, new: int) -> int:
        """``p2m_change_entry_type_global``: every entry of type ``old`` becomes ``new``
        (Xen does it lazily through the ``recalc`` bit; the outcome is the same)."""
        sel = self.type == old
        self.type[sel] = new
        self.stats["flushes"] += 1
        return int(sel.sum())

    # -- persistence -----------------------------------------------------------------------------
    def to_state(self) -> dict:
        return {"domid": self.domid, "pool_pages": self.pool_pages, "logdirty": self.logdirty,
                "fault_count": self.fault_count, "dirty_count": self.dirty_count,
                "stats": dict(self.stats)}

    def arrays(self) -> dict[str, np.ndarray]:
        return {"type": self.type, "order": self.order, "dirty": self.dirty}

    @classmethod
    def from_state(cls, st: dict, mfn: np.ndarray, arrays: dict[str, np.ndarray]) -> "P2M":
        p = cls(st["domid"], mfn, np.asarray(arrays["type"], dtype=np.uint8),
                np.asarray(arrays["order"], dtype=np.int8), st["pool_pages"],
                logdirty=st["logdirty"], fault_count=st["fault_count"],
                dirty_count=st["dirty_count"], stats=dict(st["stats"]))
        p.dirty = np.asarray(arrays["dirty"], dtype=bool)
        return p


# -- the host's HVM p2ms -----------------------------------------------------------------------

def get(host: "Host", domid: int) -> P2M | None:
    return getattr(host, "ept", {}).get(domid)


def attach(host: "Host", domid: int, p: P2M) -> P2M:
    """Register ``p`` as ``domid``'s p2m; ``host.p2m[domid]`` is its ``mfn`` array."""
    host.ept[domid] = p
    host.p2m[domid] = p.mfn
    return p


def rebind(host: "Host", domid: int) -> None:
    """After ``p.mfn`` was replaced (grown), point ``host.p2m[domid]`` at it again."""
    host.p2m[domid] = host.ept[domid].mfn


def build(host: "Host", domid: int, chunks: list[tuple[int, int, int]], size: int,
          vcpus: int = 1, max_pages: int | None = None) -> P2M:
    """The HVM builder's p2m from its allocations ``(gfn, mfn, order)`` (``meminit_hvm``:
    1 GiB leaves where an allocation of order >= 18 landed, 2 MiB for order 9 .. 17, 4 KiB
    otherwise)."""
    p = P2M.empty(domid, size, shadow_pool_pages(max_pages or size, vcpus))
    for gfn, mfn, order in chunks:
        leaf = O1G if order >= O1G else (O2M if order >= O2M else O4K)
        p.map_range(gfn, mfn, 1 << order, leaf)
    return attach(host, domid, p)


def adopt(host: "Host", domid: int) -> P2M:
    """A p2m for an HVM domain known only by its flat gfn -> mfn array (a host saved before
    p2ms were modelled): RAM entries, 2 MiB leaves where a block is an aligned run."""
    arr = np.asarray(host.p2m[domid], dtype=np.uint64)
    d = host.domains[domid]
    p = P2M.empty(domid, arr.size, shadow_pool_pages(max(d.max_pages, arr.size), d.vcpus))
    valid = arr != _INV
    p.mfn[:] = arr
    p.type[valid] = H.p2m_ram_rw
    p.order[:] = O4K
    for b in range(arr.size // _B2M):
        s, e = b * _B2M, (b + 1) * _B2M
        m = arr[s:e].astype(np.int64)
        if valid[s:e].all() and m[0] % _B2M == 0 and (np.diff(m) == 1).all():
            p.order[s:e] = O2M
    p._empty_orders(0, arr.size)
    return attach(host, domid, p)


def teardown(host: "Host", domid: int) -> None:
    """``p2m_teardown``: the tables go back to the pool with the domain."""
    getattr(host, "ept", {}).pop(domid, None)


def unmmap_broken_page(host: "Host", domid: int, mfn: int) -> int:
    """``unmmap_broken_page`` (``xen/arch/x86/cpu/mcheck/vmce.c``) for a HAP guest: the gfn
    of a frame hit by an uncorrected error becomes ``p2m_ram_broken`` (``p2m_change_type_one``
    ram_rw -> broken), so the guest can no longer reach it.  Returns the gfn or -errno."""
    p = get(host, domid)
    if p is None:
        return -E.EOPNOTSUPP
    gfn = host.ft.m2p(mfn)
    if gfn >= p.size or int(p.mfn[gfn]) != mfn:
        return -E.EINVAL
    if int(p.type[gfn]) not in (H.p2m_ram_rw, H.p2m_ram_logdirty):
        return -E.EINVAL
    rc = p.split(np.array([gfn]))
    if rc:
        return rc
    p.type[gfn] = H.p2m_ram_broken
    p.stats["flushes"] += 1
    return gfn


# -- invariants ------------------------------------------------------------------------------

def check(host: "Host") -> list[str]:
    """Every HVM p2m is well formed: entries name frames the domain owns (in use), the M2P
    names the gfn back, superpage leaves are aligned runs of one type, the orders describe a
    possible EPT, the tables fit the HAP pool, and with log-dirty on every entry is either
    write-protected or already dirty."""
    out: list[str] = []
    ft = host.ft
    for domid, p in sorted(getattr(host, "ept", {}).items()):
        d = host.domains.get(domid)
        if d is None:
            out.append(f"p2m of missing domain {domid}")
            continue
        if host.p2m.get(domid) is not p.mfn:
            out.append(f"d{domid}: host.p2m is not the p2m's mfn array")
        n = p.size
        if not (p.type.size == p.order.size == p.dirty.size == n):
            out.append(f"d{domid}: p2m arrays of different sizes")
            continue
        valid = p.mfn != _INV
        t_inv = p.type == H.p2m_invalid
        if (valid == t_inv).any():
            g = int(np.flatnonzero(valid == t_inv)[0])
            out.append(f"d{domid}: gfn {g:#x} type {H.P2M_TYPE_NAMES.get(int(p.type[g]))} "
                       f"with mfn {int(p.mfn[g]):#x}")
        g = np.flatnonzero(valid)
        m = p.mfn[g].astype(np.int64)
        if m.size and (m >= host.nframes).any():
            out.append(f"d{domid}: p2m names frames beyond the frame table")
            continue
        own = ft.owner1[m].astype(np.int64) - 1
        for i in np.flatnonzero(own != domid)[:5].tolist():
            out.append(f"d{domid}: p2m[{int(g[i]):#x}] = {int(m[i]):#x} owned by d{int(own[i])}")
        st = ((ft.count_info[m] & _U(mm.PGC_state)) >> _U(mm.PGC_state_shift)).astype(np.int8)
        for i in np.flatnonzero((st != mm.STATE_INUSE) & (st != mm.STATE_OFFLINING))[:5].tolist():
            out.append(f"d{domid}: p2m[{int(g[i]):#x}] = {int(m[i]):#x} is {mm.STATE_NAMES[int(st[i])]}")
        back = ft.m2p_array(m)
        for i in np.flatnonzero(back != g.astype(np.uint64))[:5].tolist():
            out.append(f"d{domid}: M2P[{int(m[i]):#x}] = {int(back[i]):#x}, p2m says gfn {int(g[i]):#x}")
        if np.unique(m).size != m.size:
            out.append(f"d{domid}: a frame is mapped at two gfns")
        brk = (ft.count_info[m] & _U(mm.PGC_broken)) != 0
        # orders
        o = p.order
        bad = ~np.isin(o, (O4K, O2M, O1G))
        if bad.any():
            out.append(f"d{domid}: gfn {int(np.flatnonzero(bad)[0]):#x} has order {int(o[bad][0])}")
            continue
        for order, blk in ((O2M, _B2M), (O1G, _B1G)):
            heads = np.flatnonzero(o == order)
            if heads.size == 0:
                continue
            b = np.unique(heads // blk)
            for bi in b.tolist():
                s, e = bi * blk, (bi + 1) * blk
                if e > n or not (o[s:e] == order).all():
                    out.append(f"d{domid}: order-{order} entry at gfn {s:#x} does not cover its block")
                    break
                ts = p.type[s:e]
                if not (ts == ts[0]).all():
                    out.append(f"d{domid}: superpage at gfn {s:#x} mixes p2m types")
                    break
                if ts[0] != H.p2m_invalid:
                    ms = p.mfn[s:e].astype(np.int64)
                    if ms[0] % blk or not (np.diff(ms) == 1).all():
                        out.append(f"d{domid}: superpage at gfn {s:#x} is not an aligned run of frames")
                        break
        # a 2M block is either one leaf or a level-1 table
        n2 = n // _B2M
        if n2:
            blocks = o[:n2 * _B2M].reshape(n2, _B2M)
            mixed = (blocks == O4K).any(axis=1) & (blocks != O4K).any(axis=1)
            if mixed.any():
                out.append(f"d{domid}: 2 MiB block at gfn {int(np.flatnonzero(mixed)[0]) * _B2M:#x} "
                           "mixes 4 KiB and superpage entries")
        if p.pool_used() > p.pool_pages:
            out.append(f"d{domid}: EPT tables {p.pool_used()} exceed the HAP pool {p.pool_pages}")
        # broken frames: a gfn whose frame was hit by an MCE is p2m_ram_broken (or the frame
        # is merely offline-pending with PGC_broken from the sysctl path, which we allow)
        tb = p.type[g] == H.p2m_ram_broken
        for i in np.flatnonzero(tb & ~brk)[:5].tolist():
            out.append(f"d{domid}: gfn {int(g[i]):#x} is ram_broken but mfn {int(m[i]):#x} is not broken")
        if p.logdirty:
            rw = (p.type == H.p2m_ram_rw) & ~p.dirty
            if rw.any():
                out.append(f"d{domid}: log-dirty on, gfn {int(np.flatnonzero(rw)[0]):#x} writable but not dirty")
    return out
