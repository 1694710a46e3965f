"""PV memory management: general and type references, page-table validation, and the
``mmu_update`` / ``mmuext_op`` hypercalls (``xen/arch/x86/mm.c``, ``xen/arch/x86/pv/mm.h``).

Rules modelled (xen-semantics.md §2.3-2.6, §4):

* ``get_page``: +1 general reference unless the count is 0; the owner must match.
* ``get_page_type``: a type may change only while the type count is 0; acquiring a
  page-table type validates the frame (every present entry takes its references); a
  writable type is validated at once.  Releasing the last reference to a validated page
  table devalidates it, dropping the references its entries held.
* L1 entries take a general reference on the mapped frame (``get_page_from_l1e``), plus a
  writable type reference when RW; L2-L4 entries take a general and a type reference of
  the next level down (``get_page_and_type_from_mfn``).
* 64-bit PV L4 tables carry Xen-private slots (256-271), filled by Xen when validated and
  never counted; guest updates to them fail.
* In log-dirty mode every table frame Xen writes, validates, devalidates, pins or unpins is
  marked dirty by its pfn (:func:`_dirty`); a write to an L1 the guest maps read-only is
  emulated (:func:`ptwr_emulated_update`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import mm
from ..abi import pte as P
from ..abi import xen as X
from . import l1tf, paging
from .e820 import PDX_GROUP_FRAMES_SHIFT
from .quirks import HypercallLivelock

if TYPE_CHECKING:  # pragma: no cover
    from .domain import Domain
    from .host import Host

_U = np.uint64
_COUNT = mm.PGC_count_mask
_TCOUNT = mm.PGT_count_mask
_TYPE = mm.PGT_type_mask

#: Xen-private slots of a 64-bit PV L4 (``ROOT_PAGETABLE_FIRST/LAST_XEN_SLOT``).
L4_XEN_FIRST = 256
L4_XEN_LAST = 271
#: the linear page-table slot (``LINEAR_PT_VIRT_START``), pointing at the L4 itself
L4_LINEAR_SLOT = 258
_GUEST_L4 = np.ones(512, dtype=bool)
_GUEST_L4[L4_XEN_FIRST:L4_XEN_LAST + 1] = False

#: Flags a PV guest may not set (``L1_DISALLOW_MASK`` without I/O caps, ``L2..L4``).
L1_DISALLOW = ~P.PV_ALLOWED_L1 & 0xFFF0000000000FFF
L2_DISALLOW = (~P.PV_ALLOWED_BASE & 0xFFF0000000000FFF) | P._PAGE_PSE
L3_DISALLOW = L2_DISALLOW
L4_DISALLOW = L2_DISALLOW
DISALLOW = {1: L1_DISALLOW, 2: L2_DISALLOW, 3: L3_DISALLOW, 4: L4_DISALLOW}

#: ``FASTPATH_FLAG_WHITELIST``: changes limited to these bits need no new references.
FASTPATH_WHITELIST = P.L1_FASTPATH_BITS
_FRAME_AND_FLAGS = P.PTE_FRAME_MASK | (0xFFF0000000000FFF & ~FASTPATH_WHITELIST)


class PageTableError(Exception):
    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


# -- small accessors --------------------------------------------------------------------------

def _ci(host: "Host", mfn: int) -> int:
    return int(host.ft.count_info[mfn])


def _ti(host: "Host", mfn: int) -> int:
    return int(host.ft.type_info[mfn])


def type_level(type_info: int) -> int:
    return mm.level_of(type_info)


def is_validated_table(host: "Host", mfn: int) -> int:
    """Level (1..4) if the frame is a validated page table with a non-zero type count."""
    t = _ti(host, mfn)
    if t & mm.PGT_validated and t & _TCOUNT:
        return mm.level_of(t)
    return 0


# -- general references ----------------------------------------------------------------------

def get_page_owner_and_reference(host: "Host", mfn: int) -> tuple[bool, int | None]:
    """``page_get_owner_and_reference``: +1 unless the count is 0 (or would overflow)."""
    if not 0 <= mfn < host.nframes:
        return False, None
    c = _ci(host, mfn)
    cnt = c & _COUNT
    if cnt == 0 or cnt >= _COUNT - 1:
        return False, None
    host.ft.count_info[mfn] = _U(c + 1)
    return True, host.ft.owner(mfn)


def get_page(host: "Host", mfn: int, domid: int) -> bool:
    """``get_page(pg, d)``: a general reference, only if d owns the frame."""
    ok, owner = get_page_owner_and_reference(host, mfn)
    if not ok:
        return False
    if owner != domid:
        put_page(host, mfn)
        return False
    return True


def put_page(host: "Host", mfn: int) -> None:
    """``put_page``: -1; at zero a lingering writable type is dropped and the frame freed."""
    host.put_page(mfn)


# -- type references --------------------------------------------------------------------------

def get_page_type(host: "Host", mfn: int, want: int) -> int:
    """``get_page_type``: 0, or -EINVAL when the frame has another type in use or fails to
    validate (then nothing changed)."""
    t = _ti(host, mfn)
    cnt = t & _TCOUNT
    if cnt >= _TCOUNT:
        return -E.EINVAL
    if cnt:
        if (t & _TYPE) != want:
            return -E.EINVAL
        host.ft.type_info[mfn] = _U(t + 1)
        return 0
    # Count 0: the type may change; page tables (re)validate.
    if (t & _TYPE) != want or not t & mm.PGT_validated:
        if want in (mm.PGT_writable_page, mm.PGT_shared_page, mm.PGT_none):
            host.ft.type_info[mfn] = _U(want | mm.PGT_validated | 1)
            return 0
        level = mm.level_of(want)
        if not level:
            host.ft.type_info[mfn] = _U(want | 1)
            return 0
        host.ft.type_info[mfn] = _U(want | 1)  # in-progress: counted, not yet validated
        _dirty(host, host.ft.owner(mfn), mfn)  # validate_page: type count becomes non-zero
        rc = _alloc_table(host, mfn, level)
        if rc:
            host.ft.type_info[mfn] = _U(0)
            return rc
        host.ft.type_info[mfn] = _U(int(host.ft.type_info[mfn]) | mm.PGT_validated)
        return 0
    host.ft.type_info[mfn] = _U(t + 1)
    return 0


def put_page_type(host: "Host", mfn: int) -> None:
    """``put_page_type``: -1; the last reference to a validated table devalidates it."""
    t = _ti(host, mfn)
    cnt = t & _TCOUNT
    if cnt == 0:
        raise AssertionError(f"put_page_type underflow on mfn {mfn:#x}")
    if cnt == 1 and mm.level_of(t) and t & mm.PGT_validated:
        # free_page_type: drop what the entries hold, then the type count.
        host.ft.type_info[mfn] = _U((t - 1) & ~mm.PGT_validated & ~mm.PGT_pinned)
        _dirty(host, host.ft.owner(mfn), mfn)  # devalidate_page: type count becomes zero
        _free_table(host, mfn, mm.level_of(t))
        return
    host.ft.type_info[mfn] = _U(t - 1)


def get_page_and_type(host: "Host", mfn: int, domid: int, want: int) -> int:
    if not get_page(host, mfn, domid):
        return -E.EINVAL
    rc = get_page_type(host, mfn, want)
    if rc:
        put_page(host, mfn)
    return rc


def put_page_and_type(host: "Host", mfn: int) -> None:
    put_page_type(host, mfn)
    put_page(host, mfn)


def _dirty(host: "Host", domid: int | None, mfns) -> None:
    """``paging_mark_dirty(d, mfn)`` where Xen calls it for a PV domain's page tables (a
    no-op unless the domain is in log-dirty mode; the bit is the frame's pfn)."""
    if domid is not None and "pv_logdirty" in host.__dict__:
        paging.mark_dirty_pv(host, domid, mfns)


# -- PTE adjustment (xen/arch/x86/pv/mm.h) ----------------------------------------------------

def adjust_guest_l1e(e: np.ndarray | int) -> np.ndarray | int:
    """64-bit PV: a kernel mapping (no USER) gets ``_PAGE_GUEST_KERNEL|USER``; a mapping
    without ``_PAGE_GUEST_KERNEL`` then gets ``GLOBAL|USER``."""
    scalar = np.isscalar(e)
    a = np.atleast_1d(np.asarray(e, dtype=np.uint64)).copy()
    pres = (a & _U(P._PAGE_PRESENT)) != 0
    nouser = pres & ((a & _U(P._PAGE_USER)) == 0)
    a[nouser] |= _U(P._PAGE_GUEST_KERNEL | P._PAGE_USER)
    nogk = pres & ((a & _U(P._PAGE_GUEST_KERNEL)) == 0)
    a[nogk] |= _U(P._PAGE_GLOBAL | P._PAGE_USER)
    return int(a[0]) if scalar else a


def adjust_guest_upper(e: np.ndarray | int, level: int) -> np.ndarray | int:
    """L2/L3 entries get USER; L4 entries get USER (64-bit PV) and ACCESSED."""
    scalar = np.isscalar(e)
    a = np.atleast_1d(np.asarray(e, dtype=np.uint64)).copy()
    pres = (a & _U(P._PAGE_PRESENT)) != 0
    add = P._PAGE_USER | (P._PAGE_ACCESSED if level == 4 else 0)
    a[pres] |= _U(add)
    return int(a[0]) if scalar else a


# -- table validation -------------------------------------------------------------------------

_CACHE_ATTRS = P._PAGE_PWT | P._PAGE_PCD | P._PAGE_PAT


def l1_disallow(host: "Host", domid: int) -> int:
    """``l1_disallow_mask(d)``: a domain with I/O capabilities (the control domain here) may
    also set the cache-attribute bits."""
    d = host.domains.get(domid)
    if d is not None and d.privileged:
        return L1_DISALLOW & ~_CACHE_ATTRS
    return L1_DISALLOW


def mfn_valid(host: "Host", frames: np.ndarray) -> np.ndarray:
    """``mfn_valid`` per frame: below max_page and in a PDX group (2^16 frames) with RAM."""
    f = np.asarray(frames, dtype=np.int64)
    ok = (f >= 0) & (f < host.nframes)
    g = PDX_GROUP_FRAMES_SHIFT
    vg = np.zeros((host.nframes >> g) + 1, dtype=bool)
    for s, t in host.e820.ram_frame_ranges():
        vg[s >> g:((t - 1) >> g) + 1] = True
    out = np.zeros(f.shape, dtype=bool)
    out[ok] = vg[f[ok] >> g]
    return out


def refcounted(host: "Host", frames: np.ndarray) -> np.ndarray:
    """Frames a present L1 entry holds references on: valid frames not owned by DOMID_IO
    (``is_iomem_page`` frames are mapped without any reference)."""
    frames = np.asarray(frames, dtype=np.int64)
    out = mfn_valid(host, frames)
    if out.any():
        out[out] = host.ft.owner1[frames[out]] != X.DOMID_IO + 1
    return out


def _hvm_ids(host: "Host") -> list[int]:
    return [d.domid for d in host.domains.values() if d.hvm]


def l1_typed(host: "Host", frames: np.ndarray, rw: np.ndarray, l1e_owner: int) -> np.ndarray:
    """Which RW entries hold a writable type reference: all, except foreign mappings of a
    frame whose owner uses external paging (HVM), as ``get_page_from_l1e`` /
    ``put_page_from_l1e`` decide.  ``frames`` must be refcounted frames."""
    if not rw.any():
        return rw
    hv = _hvm_ids(host)
    if not hv:
        return rw
    own = host.ft.owner1[frames].astype(np.int64) - 1
    return rw & ~(np.isin(own, hv) & (own != l1e_owner))


def _l1_refs_check(host: "Host", frames: np.ndarray, rw: np.ndarray, l1e_owner: int,
                   pg_owner: int, caller: int | None = None) -> int:
    """``get_page_from_l1e`` for every (frame, rw) without changing anything: 0 or the
    negative errno the first failing entry would give."""
    if frames.size == 0:
        return 0
    ref = refcounted(host, frames)
    if not ref.all():
        # MMIO / DOMID_IO frames: iomem_access_permitted(pg_owner) (DOMID_IO -> the caller)
        who = (l1e_owner if caller is None else caller) if pg_owner == X.DOMID_IO else pg_owner
        d = host.domains.get(who)
        if not (d is not None and d.privileged):
            return -E.EPERM
        frames, rw = frames[ref], rw[ref]
        if frames.size == 0:
            return 0
    own = host.ft.owner1[frames].astype(np.int64) - 1
    cnt = host.ft.count_info[frames] & _U(_COUNT)
    # page_get_owner_and_reference fails (NULL owner) on a zero or saturated count
    real = np.where((cnt == 0) | (cnt >= _U(_COUNT - 1)), -1, own)
    bad = real != pg_owner
    if bad.any():
        # (real_pg_owner == NULL) || (pg_owner == l1e_owner) || xsm_priv_mapping(pg_owner, real)
        pgd = host.domains.get(pg_owner)
        if (real[bad] < 0).any() or pg_owner == l1e_owner or not (pgd is not None and pgd.privileged):
            return -E.EBUSY  # could_not_pin
    typed = l1_typed(host, frames, rw, l1e_owner)
    w = frames[typed]
    if w.size:
        ti = host.ft.type_info[w]
        if (((ti & _U(_TCOUNT)) != 0) & ((ti & _U(_TYPE)) != _U(mm.PGT_writable_page))).any():
            return -E.EBUSY  # "Could not get page type PGT_writable_page"
    return 0


def _l1_refs_take(host: "Host", frames: np.ndarray, rw: np.ndarray, l1e_owner: int) -> None:
    keep = refcounted(host, frames)
    frames, rw = frames[keep], rw[keep]
    if frames.size == 0:
        return
    host.ft.count_info.add_at(frames, 1)
    w = frames[l1_typed(host, frames, rw, l1e_owner)]
    if w.size:
        uw, n = np.unique(w, return_counts=True)
        ti = host.ft.type_info[uw]
        cnt0 = (ti & _U(_TCOUNT)) == 0
        ti = np.where(cnt0, _U(mm.PGT_writable_page | mm.PGT_validated), ti)
        host.ft.type_info[uw] = ti + n.astype(np.uint64)


def _l1_refs_drop(host: "Host", frames: np.ndarray, rw: np.ndarray, l1e_owner: int) -> None:
    """``put_page_from_l1e`` for many entries, in the order given: writable type refs first,
    then the general references; a frame whose count reaches zero is freed where its last
    entry comes (the order in which one-by-one puts would free them)."""
    keep = refcounted(host, frames)
    frames, rw = frames[keep], rw[keep]
    if frames.size == 0:
        return
    w = frames[l1_typed(host, frames, rw, l1e_owner)]
    if w.size:
        uw, n = np.unique(w, return_counts=True)
        ti = host.ft.type_info[uw]
        if ((ti & _U(_TCOUNT)) < n).any():
            raise AssertionError("writable type count underflow")
        host.ft.type_info[uw] = ti - n.astype(np.uint64)
    uf, first, n = np.unique(frames[::-1], return_index=True, return_counts=True)
    ci = host.ft.count_info[uf]
    if ((ci & _U(_COUNT)) < n).any():
        raise AssertionError("general count underflow")
    newc = ci - n.astype(np.uint64)
    host.ft.count_info[uf] = newc
    zero = (newc & _U(_COUNT)) == 0
    if zero.any():
        last = frames.size - 1 - first[zero]  # where each freed frame's last entry is
        for m in uf[zero][np.argsort(last, kind="stable")].tolist():
            _release_zero(host, m)


def _release_zero(host: "Host", mfn: int) -> None:
    """A frame whose general count reached zero: free it (``put_page`` -> ``free_domheap_page``)."""
    c = _ci(host, mfn)
    host.ft.count_info[mfn] = _U(c + 1)
    host.put_page(mfn)


def _present(entries: np.ndarray) -> np.ndarray:
    return (entries & _U(P._PAGE_PRESENT)) != 0


def _frames(entries: np.ndarray) -> np.ndarray:
    return ((entries >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)


def _alloc_table(host: "Host", mfn: int, level: int) -> int:
    """``alloc_lN_table``: validate a frame as an Ln table; on failure nothing is held and
    the error of the first bad entry is returned (``get_page_from_lNe``)."""
    d = host.ft.owner(mfn)
    tab = host.ft.table(mfn)
    if level == 1:
        pres = _present(tab)
        if (tab[pres] & _U(l1_disallow(host, d))).any():
            return -E.EINVAL  # "Bad L1 flags"
        fr = _frames(tab[pres])
        rw = (tab[pres] & _U(P._PAGE_RW)) != 0
        rc = _l1_refs_check(host, fr, rw, d, d)
        if rc:
            return rc
        _l1_refs_take(host, fr, rw, d)
        tab[:] = adjust_guest_l1e(tab)
        return 0
    guest = _GUEST_L4 if level == 4 else np.ones(512, dtype=bool)
    pres = _present(tab) & guest
    idx = np.flatnonzero(pres)
    fr_all = _frames(tab)
    if (tab[idx] & _U(DISALLOW[level])).any():
        return -E.EINVAL  # "Bad L%d flags"
    done: list[int] = []
    for i in idx.tolist():
        f = int(fr_all[i])
        if f == mfn:
            # a linear (self) entry holds nothing; only read-only ones are accepted
            if int(tab[i]) & P._PAGE_RW:
                rc = -E.EINVAL
            else:
                continue
        else:
            rc = get_page_and_type(host, f, d, mm.pgt_level(level - 1))
        if rc:
            for j in reversed(done):
                put_page_and_type(host, int(fr_all[j]))
            return rc
        done.append(i)
    tab[pres] = adjust_guest_upper(tab[pres], level)
    if level == 4:
        init_xen_l4_slots(host, mfn)
    return 0


def init_xen_l4_slots(host: "Host", mfn: int) -> None:
    """``init_xen_l4_slots``: Xen's own entries (uncounted), including the linear slot."""
    tab = host.ft.table(mfn)
    tab[L4_XEN_FIRST:L4_XEN_LAST + 1] = _U(0)
    tab[L4_LINEAR_SLOT] = _U(P.make_pte(mfn, P._PAGE_PRESENT | P._PAGE_RW | P._PAGE_ACCESSED | P._PAGE_DIRTY))


def _free_table(host: "Host", mfn: int, level: int) -> None:
    """``free_page_type``: drop the references held by a table's present entries."""
    tab = host.ft.table(mfn)
    if level == 1:
        pres = _present(tab)
        fr = _frames(tab[pres])
        rw = (tab[pres] & _U(P._PAGE_RW)) != 0
        _l1_refs_drop(host, fr, rw, host.ft.owner(mfn))
        return
    guest = _GUEST_L4 if level == 4 else np.ones(512, dtype=bool)
    pres = _present(tab) & guest
    for f in _frames(tab[pres]).tolist():
        if f != mfn:
            put_page_and_type(host, f)


# -- entry updates ----------------------------------------------------------------------------

def _write(tab: np.ndarray, idx: int, new: int, preserve_ad: bool) -> None:
    """``update_intpte``: with PRESERVE_AD the A/D bits currently in memory are kept."""
    if preserve_ad:
        new |= int(tab[idx]) & (P._PAGE_ACCESSED | P._PAGE_DIRTY)
    tab[idx] = _U(new)


def mod_l1_entry(host: "Host", table: int, idx: int, new: int, pt_owner: int, pg_owner: int,
                 preserve_ad: bool, caller: int | None = None, translate: bool = True) -> int:
    """``mod_l1_entry``: the new entry takes its references before it is written, then the
    old entry's are dropped; a change limited to whitelisted bits takes none."""
    tab = host.ft.table(table)
    old = int(tab[idx])
    if new & P._PAGE_PRESENT:
        if new & l1_disallow(host, pt_owner):
            return -E.EINVAL  # "Bad L1 flags"
        pgd = host.domains.get(pg_owner)
        if translate and pgd is not None and pgd.hvm:
            # a translated pg_owner: the frame field is a GFN (get_page_from_gfn)
            g = P.pte_frame(new)
            p2m = host.p2m.get(pg_owner)
            if p2m is None or g >= p2m.size or int(p2m[g]) >= host.nframes \
                    or host.ft.owner(int(p2m[g])) != pg_owner \
                    or not int(host.ft.count_info[int(p2m[g])]) & _COUNT:
                return -E.EINVAL
            new = P.make_pte(int(p2m[g]), new & P.PTE_FLAGS_MASK)
        if (old & P._PAGE_PRESENT) and not ((old ^ new) & _FRAME_AND_FLAGS):
            _write(tab, idx, adjust_guest_l1e(new), preserve_ad)  # fast path
            _dirty(host, pt_owner, table)
            return 0
        fr = np.array([P.pte_frame(new)], dtype=np.int64)
        rw = np.array([bool(new & P._PAGE_RW)])
        rc = _l1_refs_check(host, fr, rw, pt_owner, pg_owner, caller)
        if rc:
            return rc
        _l1_refs_take(host, fr, rw, pt_owner)
        _write(tab, idx, adjust_guest_l1e(new), preserve_ad)
    elif l1tf.pv_l1tf_check_pte(host, pt_owner, 1, new):
        return -E.ERESTART  # not written: shadowed or crashed first (l1tf.py)
    else:
        _write(tab, idx, new, preserve_ad)
    # update_intpte -> paging_write_guest_entry / paging_cmpxchg_guest_entry -> (shadow)
    # sh_validate_guest_entry marks the table's frame, for the page-table owner's vCPU
    _dirty(host, pt_owner, table)
    if old & P._PAGE_PRESENT:
        _l1_refs_drop(host, np.array([P.pte_frame(old)], dtype=np.int64),
                      np.array([bool(old & P._PAGE_RW)]), pt_owner)
    return 0


def mod_upper_entry(host: "Host", table: int, level: int, idx: int, new: int, d: int,
                    preserve_ad: bool) -> int:
    """``mod_l2_entry`` / ``mod_l3_entry`` / ``mod_l4_entry``: the new entry takes a general
    and an L(n-1) type reference (validating the lower table on 0 -> 1); the old entry's
    are dropped after the write.  Errors are those of ``get_page_from_lNe``."""
    if level == 4 and not _GUEST_L4[idx]:
        return -E.EINVAL  # "Illegal L4 update attempt in Xen-private area"
    tab = host.ft.table(table)
    old = int(tab[idx])
    if new & P._PAGE_PRESENT:
        if new & DISALLOW[level]:
            return -E.EINVAL  # "Bad L%d flags"
        if (old & P._PAGE_PRESENT) and not ((old ^ new) & _FRAME_AND_FLAGS):
            _write(tab, idx, adjust_guest_upper(new, level), preserve_ad)  # fast path
            _dirty(host, d, table)
            return 0
        f = P.pte_frame(new)
        if f == table:
            if new & P._PAGE_RW:
                return -E.EINVAL  # "Attempt to create linear p.t. with write perms"
        else:
            rc = get_page_and_type(host, f, d, mm.pgt_level(level - 1))
            if rc:
                return rc
        new = adjust_guest_upper(new, level)
    elif l1tf.pv_l1tf_check_pte(host, d, level, new):
        return -E.ERESTART  # pv_l1tf_check_l2e/l3e/l4e
    _write(tab, idx, new, preserve_ad)
    _dirty(host, d, table)  # update_intpte, as in mod_l1_entry
    if old & P._PAGE_PRESENT and P.pte_frame(old) != table:
        put_page_and_type(host, P.pte_frame(old))
    return 0


# -- hypercalls -------------------------------------------------------------------------------

def _priv_over(host: "Host", caller: int, target: int) -> bool:
    """``xsm_default_action(XSM_TARGET, caller, target)`` (dummy XSM): the caller is the
    target, or the control domain."""
    c = host.domains.get(caller)
    return caller == target or bool(c and c.privileged)


def get_pg_owner(host: "Host", caller: int, domid: int) -> tuple[int, int]:
    """``get_pg_owner``: (rc, owner domid)."""
    domid &= 0xFFFF
    if domid == X.DOMID_SELF:
        return 0, caller
    if domid == caller:
        return -E.ESRCH, -1  # "Cannot specify itself as foreign domain"
    if domid in (X.DOMID_IO, X.DOMID_XEN):
        return 0, domid
    d = host.domains.get(domid)
    if d is None or d.is_system:
        return -E.ESRCH, -1  # "Unknown domain"
    return 0, domid


def mmu_update(host: "Host", caller: int, reqs: np.ndarray, foreigndom: int) -> tuple[int, int]:
    """``do_mmu_update``: requests ``(ptr, val)`` processed in order; the first failure stops
    the batch (earlier requests stay applied).  Returns ``(rc, done)``.

    Order of checks as in Xen: the page-table owner named by bits 31..16 (-ESRCH if absent,
    -EINVAL without vCPU 0), the data-page owner FD (``get_pg_owner``: -ESRCH), then per
    request the XSM_TARGET check (-EPERM) and the request itself."""
    reqs = np.asarray(reqs, dtype=np.uint64).reshape(-1, 2)
    fd, pfd = X.split_foreigndom(foreigndom)
    pt_owner = caller
    if pfd is not None and pfd != caller:
        ptd = host.domains.get(pfd)
        if ptd is None or ptd.is_system:
            return -E.ESRCH, 0
        if ptd.vcpus < 1:
            return -E.EINVAL, 0
        pt_owner = pfd
    rc, pg_owner = get_pg_owner(host, caller, fd)
    if rc:
        return rc, 0
    ptd = host.domains[pt_owner]
    pgd = host.domains.get(pg_owner)
    xsm_normal = xsm_machphys = None
    done = 0
    if len(reqs) >= _BATCH_MIN and not ptd.hvm and not (pgd is not None and pgd.hvm):
        ok = (pg_owner == X.DOMID_IO or _priv_over(host, caller, pg_owner)) \
            and _priv_over(host, caller, pt_owner)
        if ok:
            done = _l1_batch(host, caller, reqs, pt_owner, pg_owner)
            reqs = reqs[done:]
    for ptr, val in reqs.tolist():
        cmd = ptr & X.MMU_CMD_MASK
        if cmd in (X.MMU_NORMAL_PT_UPDATE, X.MMU_PT_UPDATE_PRESERVE_AD, X.MMU_PT_UPDATE_NO_TRANSLATE):
            if ptd.hvm:
                rc = -E.EOPNOTSUPP  # paging_mode_refcounts(pt_owner)
            else:
                if xsm_normal is None:
                    ok = (pg_owner == X.DOMID_IO or _priv_over(host, caller, pg_owner)) \
                        and _priv_over(host, caller, pt_owner)
                    xsm_normal = 0 if ok else -E.EPERM
                rc = xsm_normal or _normal_update(host, caller, ptr, val, cmd, pt_owner, pg_owner)
                if rc == -E.ERESTART:
                    rc = _continued(host, caller, pt_owner, ptr, val, lambda: _normal_update(
                        host, caller, ptr, val, cmd, pt_owner, pg_owner))
                    if rc == -E.ERESTART:
                        return rc, done
        elif cmd == X.MMU_MACHPHYS_UPDATE:
            mfn = ptr >> 12
            if pt_owner != caller:
                rc = -E.EPERM
            elif pgd is not None and pgd.hvm:
                rc = -E.EINVAL  # paging_mode_translate(pg_owner)
            else:
                if xsm_machphys is None:
                    ok = pg_owner == X.DOMID_IO or _priv_over(host, caller, pg_owner)
                    xsm_machphys = 0 if ok else -E.EPERM
                rc = xsm_machphys
                if not rc:
                    if not get_page(host, mfn, pg_owner):
                        rc = -E.EINVAL  # "Could not get page for mach->phys update"
                    else:
                        host.ft.set_m2p(mfn, val)
                        paging.mark_pfn_dirty(host, pg_owner, val)  # paging_mark_pfn_dirty
                        put_page(host, mfn)
        else:
            rc = -E.ENOSYS
        if rc:
            return rc, done
        done += 1
    return 0, done


def _continued(host: "Host", caller: int, pt_owner: int, ptr: int, val: int, again) -> int:
    """An entry update answered -ERESTART by the L1TF check (:mod:`.l1tf`): Xen continues
    the hypercall at that request (``hypercall_create_continuation``).  A domain shadowed
    meanwhile passes the second time.  A guest that crashed itself never runs again (its
    call answers -ERESTART here).  A toolstack's call for a domain that stays checked -- a
    suspended guest, which ``domain_crash`` leaves as it is -- is continued for ever."""
    rc = again()
    if rc != -E.ERESTART:
        return rc
    cd = host.domains.get(caller)
    if cd is not None and cd.is_shutting_down and cd.shutdown_code == X.SHUTDOWN_crash:
        return rc
    raise HypercallLivelock(
        f"mmu_update by d{caller}: the L1TF check refuses the non-present entry {val:#018x} "
        f"for d{pt_owner}'s table at {ptr & ~X.MMU_CMD_MASK:#x} on every continuation "
        "(no shadow paging; domain_crash of an already shut-down domain changes nothing): "
        "the call never returns")


#: below this many requests the one-by-one path is as fast as the batched one
_BATCH_MIN = 8


def _l1_batch(host: "Host", caller: int, reqs: np.ndarray, pt_owner: int, pg_owner: int) -> int:
    """The leading run of ``reqs`` that are L1 entry updates, applied at once when doing so
    gives exactly what ``do_mmu_update`` doing them one by one would: returns how many it
    applied (0 when it declined; the caller then goes on request by request).

    Declines unless every request of the run targets a distinct slot of a validated L1 table
    of ``pt_owner`` (``get_page`` + ``mod_l1_entry``), no new entry has a disallowed flag, no
    frame is both mapped and unmapped by the run, and the new mappings as a whole pass
    ``get_page_from_l1e``.  Under those conditions no request can see another's effects:
    references only go up on the mapped frames and down on the unmapped ones, and a frame
    whose last reference goes is freed in the order its request came."""
    ptr = reqs[:, 0]
    cmd = ptr & _U(X.MMU_CMD_MASK)
    simple = (cmd == _U(X.MMU_NORMAL_PT_UPDATE)) | (cmd == _U(X.MMU_PT_UPDATE_PRESERVE_AD))
    n = int(np.argmin(simple)) if not simple.all() else len(reqs)
    if n < _BATCH_MIN:
        return 0
    ptr, val, cmd = ptr[:n], reqs[:n, 1], cmd[:n]
    table = ((ptr & ~_U(X.MMU_CMD_MASK)) >> _U(12)).astype(np.int64)
    idx = ((ptr & _U(0xFFF)) >> _U(3)).astype(np.int64)
    if table.min() < 0 or table.max() >= host.nframes:
        return 0
    ft = host.ft
    ci, ti = ft.count_info[table], ft.type_info[table]
    tcnt = ci & _U(_COUNT)
    if ((ft.owner1[table] != pt_owner + 1) | (tcnt == 0) | (tcnt >= _U(_COUNT // 2))).any():
        return 0
    if (((ti & _U(_TYPE)) != _U(mm.PGT_l1_page_table)) | ((ti & _U(mm.PGT_validated)) == 0)
            | ((ti & _U(_TCOUNT)) == 0)).any():
        return 0
    slot = table * 512 + idx
    if np.unique(slot).size != n:
        return 0
    utab, inv = np.unique(table, return_inverse=True)
    inv = inv.ravel()
    ut = utab.tolist()
    if any(t not in ft.pages for t in ut):
        return 0  # a table kept as a fingerprint: the one-by-one path materialises it in order
    old = np.empty(n, dtype=np.uint64)
    if len(ut) > 1:
        order = np.argsort(inv, kind="stable")
        groups = np.split(order, np.cumsum(np.bincount(inv, minlength=len(ut)))[:-1])
    else:
        groups = [np.arange(n)]
    for t, gi in zip(ut, groups):  # one gather per table
        old[gi] = ft.pages[t][idx[gi]]
    new_p, old_p = _present(val), _present(old)
    if (new_p & ((val & _U(l1_disallow(host, pt_owner))) != 0)).any():
        return 0
    if l1tf.unsafe(host, pt_owner, 1, val[~new_p]).any():
        return 0  # the L1TF check stops one: the one-by-one path takes it in order
    fast = new_p & old_p & (((old ^ val) & _U(_FRAME_AND_FLAGS)) == 0)
    take, drop = new_p & ~fast, old_p & ~fast
    tf, df = _frames(val[take]), _frames(old[drop])
    if np.isin(tf, df).any():
        return 0
    if tf.size:
        ref = refcounted(host, tf)
        if (ft.count_info[tf[ref]] & _U(_COUNT) >= _U(_COUNT // 2)).any():
            return 0
        trw = (val[take] & _U(P._PAGE_RW)) != 0
        if _l1_refs_check(host, tf, trw, pt_owner, pg_owner, caller):
            return 0
        _l1_refs_take(host, tf, trw, pt_owner)
    # update_intpte: adjusted present entries; PRESERVE_AD keeps the A/D bits in memory
    out = np.where(new_p, adjust_guest_l1e(val), val)
    pres_ad = cmd == _U(X.MMU_PT_UPDATE_PRESERVE_AD)
    out = np.where(pres_ad, out | (old & _U(P._PAGE_ACCESSED | P._PAGE_DIRTY)), out)
    for t, gi in zip(ut, groups):  # slots are distinct: one scatter per table
        ft.pages[t][idx[gi]] = out[gi]
    _dirty(host, pt_owner, utab)  # each update_intpte marks its table
    if df.size:
        _l1_refs_drop(host, df, (old[drop] & _U(P._PAGE_RW)) != 0, pt_owner)
    return n


def _normal_update(host: "Host", caller: int, ptr: int, val: int, cmd: int, pt_owner: int,
                   pg_owner: int) -> int:
    """One MMU_NORMAL_PT_UPDATE / MMU_PT_UPDATE_PRESERVE_AD / MMU_PT_UPDATE_NO_TRANSLATE."""
    table = (ptr & ~X.MMU_CMD_MASK) >> 12
    idx = (ptr & 0xFFF) >> 3
    if not get_page(host, table, pt_owner):
        return -E.EINVAL  # "Could not get page for normal update"
    pres = cmd == X.MMU_PT_UPDATE_PRESERVE_AD
    lvl = is_validated_table(host, table)
    t = _ti(host, table)
    if lvl == 1:
        rc = mod_l1_entry(host, table, idx, val, pt_owner, pg_owner, pres, caller,
                          translate=(cmd != X.MMU_PT_UPDATE_NO_TRANSLATE))
    elif lvl:
        rc = -E.EINVAL if pg_owner != pt_owner else \
            mod_upper_entry(host, table, lvl, idx, val, pt_owner, pres)
    elif (t & _TYPE) == mm.PGT_writable_page and t & _TCOUNT:
        host.ft.table(table)[idx] = _U(val)  # page_lock'ed writable page: a plain write
        _dirty(host, pt_owner, table)  # paging_write_guest_entry (shadow mode)
        rc = 0
    elif t & _TCOUNT:
        rc = -E.EINVAL  # locked with another type (or a type in use)
    else:
        # not lockable: a transient writable type, then a raw write (no validation)
        rc = get_page_type(host, table, mm.PGT_writable_page)
        if rc == 0:
            host.ft.table(table)[idx] = _U(val)
            _dirty(host, pt_owner, table)
            put_page_type(host, table)
    put_page(host, table)
    return rc


def ptwr_emulated_update(host: "Host", domid: int, table: int, idx: int, val: int) -> int:
    """A PV guest's write of one entry of an L1 table it maps read-only (Linux's
    ``native_set_pte`` outside a lazy-MMU batch): the write faults and Xen emulates it
    (``ptwr_do_page_fault`` -> ``ptwr_emulated_update``): the frame must be an L1 table of
    the writer with a type count, the new entry must pass ``get_page_from_l1e(nl1e, d, d)``
    and is adjusted and written through ``paging_cmpxchg_guest_entry`` (which in log-dirty
    mode marks the table's frame dirty), the old entry's references are dropped.  Returns 0,
    or -EFAULT when the write is not emulated (the guest takes the page fault)."""
    if not 0 <= table < host.nframes or host.ft.owner(table) != domid or not 0 <= idx < 512:
        return -E.EFAULT
    t = _ti(host, table)
    if (t & _TYPE) != mm.PGT_l1_page_table or not t & _TCOUNT:
        return -E.EFAULT  # not a page table: an ordinary fault
    if not get_page(host, table, domid):
        return -E.EFAULT
    rc = mod_l1_entry(host, table, idx, val, domid, domid, False, domid)
    if rc == -E.ERESTART:  # the L1TF check: X86EMUL_RETRY, the guest writes again
        d = host.domains[domid]
        rc = -E.ERESTART if d.is_shutting_down else \
            mod_l1_entry(host, table, idx, val, domid, domid, False, domid)
        if rc == -E.ERESTART:  # crashed: it never runs again
            put_page(host, table)
            return rc
    put_page(host, table)
    return -E.EFAULT if rc else 0


_PIN_CMDS = (X.MMUEXT_PIN_L1_TABLE, X.MMUEXT_PIN_L2_TABLE, X.MMUEXT_PIN_L3_TABLE,
             X.MMUEXT_PIN_L4_TABLE)


def mmuext_op(host: "Host", caller: int, ops: list[tuple[int, int]], foreigndom: int,
              vcpu: int = 0) -> tuple[int, int]:
    """``do_mmuext_op`` for ``(cmd, mfn)`` pairs: pin/unpin, new (user) base pointer.

    ``get_pg_owner(foreigndom)`` (-ESRCH); a foreign non-PV owner (-EINVAL); XSM_TARGET
    (-EPERM); then per op.  Pin: the frame must be the owner's (-EINVAL), take a general
    and a type reference of the level (validation errors are returned as they are),
    already pinned -> -EINVAL.  Unpin: owner's frame and pinned, else -EINVAL.  Base
    pointers only for the caller itself (-EPERM).  Unknown commands -ENOSYS."""
    rc, pg_owner = get_pg_owner(host, caller, foreigndom & 0xFFFF)
    if rc:
        return rc, 0
    d = host.domains[pg_owner]
    if pg_owner != caller and d.hvm:
        return -E.EINVAL, 0
    if not _priv_over(host, caller, pg_owner):
        return -E.EPERM, 0
    cd = host.domains[caller]
    done = 0
    for cmd, mfn in ops:
        if cd.hvm and (cmd in _PIN_CMDS or cmd in (X.MMUEXT_UNPIN_TABLE, X.MMUEXT_NEW_BASEPTR,
                                                   X.MMUEXT_NEW_USER_BASEPTR)):
            return -E.EOPNOTSUPP, done
        if cmd in _PIN_CMDS:
            if not d.hvm:  # paging_mode_refcounts(pg_owner): silently ignored
                level = cmd - X.MMUEXT_PIN_L1_TABLE + 1
                if not get_page(host, mfn, pg_owner):
                    return -E.EINVAL, done
                rc = get_page_type(host, mfn, mm.pgt_level(level))
                if rc:
                    put_page(host, mfn)
                    return rc, done  # "Error %d while pinning mfn"
                t = _ti(host, mfn)
                if t & mm.PGT_pinned:
                    put_page_and_type(host, mfn)
                    return -E.EINVAL, done  # "mfn already pinned"
                host.ft.type_info[mfn] = _U(t | mm.PGT_pinned)
                _dirty(host, pg_owner, mfn)  # "a page is dirtied when its pin status is set"
        elif cmd == X.MMUEXT_UNPIN_TABLE:
            if not d.hvm:
                if not get_page(host, mfn, pg_owner):
                    return -E.EINVAL, done  # "mfn bad, or bad owner"
                t = _ti(host, mfn)
                if not t & mm.PGT_pinned:
                    put_page(host, mfn)
                    return -E.EINVAL, done  # "mfn not pinned"
                host.ft.type_info[mfn] = _U(t & ~mm.PGT_pinned)
                put_page_and_type(host, mfn)
                put_page(host, mfn)
                _dirty(host, pg_owner, mfn)  # ... "when its pin status is cleared"
        elif cmd in (X.MMUEXT_NEW_BASEPTR, X.MMUEXT_NEW_USER_BASEPTR):
            if pg_owner != caller:
                return -E.EPERM, done
            rc = new_baseptr(host, d, vcpu, mfn, user=(cmd == X.MMUEXT_NEW_USER_BASEPTR))
            if rc:
                return rc, done
        elif cmd == X.MMUEXT_TLB_FLUSH_LOCAL:
            pass
        else:
            return -E.ENOSYS, done
        done += 1
    return 0, done


def new_baseptr(host: "Host", d: "Domain", vcpu: int, mfn: int, user: bool = False) -> int:
    """``new_guest_cr3`` / ``MMUEXT_NEW_USER_BASEPTR``: the new root takes a general and an
    L4 type reference (errors returned as they are); the old one's are dropped.  Loading
    the current root again changes nothing; ``mfn`` 0 clears a user root."""
    slots = d.guest_table_user if user else d.guest_table
    while len(slots) <= vcpu:
        slots.append(0)
    old = slots[vcpu]
    if old == mfn:
        return 0
    if mfn or not user:
        rc = get_page_and_type(host, mfn, d.domid, mm.PGT_l4_page_table)
        if rc:
            return rc  # "Error while installing new baseptr"
    slots[vcpu] = mfn
    if old:
        put_page_and_type(host, old)
    return 0


def relinquish_tables(host: "Host", d: "Domain") -> None:
    """``domain_relinquish_resources`` for PV page tables: drop CR3s and pins, which
    devalidates every table tree and releases the references its entries held."""
    for slots in (d.guest_table, d.guest_table_user):
        for v, m in enumerate(slots):
            if m:
                slots[v] = 0
                put_page_and_type(host, m)
    own = host.owned_frames(d.domid)
    ti = host.ft.type_info[own]
    pinned = own[(ti & _U(mm.PGT_pinned)) != 0]
    for m in pinned.tolist():
        t = _ti(host, m)
        if t & mm.PGT_pinned:
            host.ft.type_info[m] = _U(t & ~mm.PGT_pinned)
            put_page_and_type(host, m)
