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
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import mm
from ..abi import pte as P
from ..abi import xen as X

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

def _l1_refs_check(host: "Host", frames: np.ndarray, rw: np.ndarray, pt_owner: int,
                   pg_owner: int, owner_priv: bool) -> int:
    """Check that every (frame, rw) could take its references (``get_page_from_l1e``)
    without changing anything; 0 or a negative errno."""
    if frames.size == 0:
        return 0
    if (frames >= host.nframes).any():
        return -E.EPERM  # beyond the frame table: I/O space the guest may not map
    own = host.ft.owner1[frames].astype(np.int64) - 1
    ci = host.ft.count_info[frames]
    if ((ci & _U(_COUNT)) == 0).any():
        return -E.EBUSY
    if (own == X.DOMID_IO).any() and not owner_priv:
        return -E.EPERM
    bad_owner = own != pg_owner
    if bad_owner.any():
        # a privileged pg_owner may map its target's frames (xsm_priv_mapping)
        if not (owner_priv and pg_owner != pt_owner):
            return -E.EBUSY
    w = frames[rw]
    if w.size:
        ti = host.ft.type_info[w]
        cnt = ti & _U(_TCOUNT)
        typ = ti & _U(_TYPE)
        if ((cnt != 0) & (typ != _U(mm.PGT_writable_page))).any():
            return -E.EBUSY
    return 0


def _l1_refs_take(host: "Host", frames: np.ndarray, rw: np.ndarray) -> None:
    np.add.at(host.ft.count_info, frames, _U(1))
    w = frames[rw]
    if w.size:
        uw, n = np.unique(w, return_counts=True)
        ti = host.ft.type_info[uw]
        cnt0 = (ti & _U(_TCOUNT)) == 0
        ti = np.where(cnt0, _U(mm.PGT_writable_page | mm.PGT_validated), ti)
        host.ft.type_info[uw] = ti + n.astype(np.uint64)


def _l1_refs_drop(host: "Host", frames: np.ndarray, rw: np.ndarray) -> None:
    """``put_page_from_l1e`` for many entries: writable type refs first, then the general
    references; frames reaching zero are freed."""
    w = frames[rw]
    if w.size:
        uw, n = np.unique(w, return_counts=True)
        ti = host.ft.type_info[uw]
        if ((ti & _U(_TCOUNT)) < n).any():
            raise AssertionError("writable type count underflow")
        host.ft.type_info[uw] = ti - n.astype(np.uint64)
    uf, n = np.unique(frames, return_counts=True)
    ci = host.ft.count_info[uf]
    if ((ci & _U(_COUNT)) < n).any():
        raise AssertionError("general count underflow")
    newc = ci - n.astype(np.uint64)
    host.ft.count_info[uf] = newc
    zero = uf[(newc & _U(_COUNT)) == 0]
    for m in zero.tolist():
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
    """``alloc_lN_table``: validate a frame as an Ln table; on failure nothing is held."""
    d = host.ft.owner(mfn)
    tab = host.ft.table(mfn)
    if level == 1:
        pres = _present(tab)
        if (tab[pres] & _U(L1_DISALLOW)).any():
            return -E.EINVAL
        fr = _frames(tab[pres])
        rw = (tab[pres] & _U(P._PAGE_RW)) != 0
        dom = host.domains.get(d)
        rc = _l1_refs_check(host, fr, rw, d, d, bool(dom and dom.privileged))
        if rc:
            return rc
        _l1_refs_take(host, fr, rw)
        tab[:] = adjust_guest_l1e(tab)
        return 0
    guest = _GUEST_L4 if level == 4 else np.ones(512, dtype=bool)
    pres = _present(tab) & guest
    idx = np.flatnonzero(pres)
    fr_all = _frames(tab)
    # linear (self) entries are skipped as put_page_from_lNe does
    if (tab[idx] & _U(DISALLOW[level])).any():
        return -E.EINVAL
    done: list[int] = []
    for i in idx.tolist():
        f = int(fr_all[i])
        if f == mfn:
            continue
        rc = get_page_and_type(host, f, d, mm.pgt_level(level - 1))
        if rc:
            for j in reversed(done):
                put_page_and_type(host, int(fr_all[j]))
            return -E.EINVAL
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
        _l1_refs_drop(host, fr, rw)
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
                 preserve_ad: bool) -> int:
    tab = host.ft.table(table)
    old = int(tab[idx])
    if new & P._PAGE_PRESENT:
        if new & L1_DISALLOW:
            return -E.EINVAL
        pgd = host.domains.get(pg_owner)
        if pgd is not None and pgd.hvm:
            # a translated pg_owner: the frame field is a GFN
            g = P.pte_frame(new)
            p2m = host.p2m.get(pg_owner)
            if p2m is None or g >= p2m.size:
                return -E.EINVAL
            new = P.make_pte(int(p2m[g]), new & P.PTE_FLAGS_MASK)
        new = adjust_guest_l1e(new)
        if (old & P._PAGE_PRESENT) and not ((old ^ new) & _FRAME_AND_FLAGS):
            _write(tab, idx, new, preserve_ad)
            return 0
        ptd = host.domains.get(pt_owner)
        fr = np.array([P.pte_frame(new)], dtype=np.int64)
        rw = np.array([bool(new & P._PAGE_RW)])
        rc = _l1_refs_check(host, fr, rw, pt_owner, pg_owner, bool(ptd and ptd.privileged))
        if rc:
            return rc
        _l1_refs_take(host, fr, rw)
        _write(tab, idx, new, preserve_ad)
    else:
        _write(tab, idx, new, preserve_ad)
    if old & P._PAGE_PRESENT:
        _l1_refs_drop(host, np.array([P.pte_frame(old)], dtype=np.int64),
                      np.array([bool(old & P._PAGE_RW)]))
    return 0


def mod_upper_entry(host: "Host", table: int, level: int, idx: int, new: int, d: int,
                    preserve_ad: bool) -> int:
    """``mod_l2_entry`` / ``mod_l3_entry`` / ``mod_l4_entry``."""
    if level == 4 and not _GUEST_L4[idx]:
        return -E.EINVAL  # "Illegal L4 update attempt in Xen-private area"
    tab = host.ft.table(table)
    old = int(tab[idx])
    if new & P._PAGE_PRESENT:
        if new & DISALLOW[level]:
            return -E.EINVAL
        new = adjust_guest_upper(new, level)
        if (old & P._PAGE_PRESENT) and not ((old ^ new) & _FRAME_AND_FLAGS):
            _write(tab, idx, new, preserve_ad)
            return 0
        f = P.pte_frame(new)
        if f != table:
            rc = get_page_and_type(host, f, d, mm.pgt_level(level - 1))
            if rc:
                return -E.EINVAL
    _write(tab, idx, new, preserve_ad)
    if old & P._PAGE_PRESENT and P.pte_frame(old) != table:
        put_page_and_type(host, P.pte_frame(old))
    return 0


# -- hypercalls -------------------------------------------------------------------------------

def _priv_over(host: "Host", caller: int, target: int) -> bool:
    """XSM_TARGET: the caller is the target or the control domain."""
    c = host.domains.get(caller)
    return caller == target or bool(c and c.privileged)


def get_pg_owner(host: "Host", caller: int, domid: int) -> tuple[int, int]:
    """``get_pg_owner``: (rc, owner domid)."""
    if domid == X.DOMID_SELF:
        return 0, caller
    if domid == caller:
        return -E.ESRCH, -1  # "Cannot specify itself as foreign domain"
    if domid in (X.DOMID_IO, X.DOMID_XEN):
        return 0, domid
    if domid not in host.domains:
        return -E.ESRCH, -1
    return 0, domid


def mmu_update(host: "Host", caller: int, reqs: np.ndarray, foreigndom: int) -> tuple[int, int]:
    """``do_mmu_update``: requests ``(ptr, val)`` processed in order; the first failure stops
    the batch (earlier requests stay applied).  Returns ``(rc, done)``."""
    reqs = np.asarray(reqs, dtype=np.uint64).reshape(-1, 2)
    fd, pfd = X.split_foreigndom(foreigndom)
    pt_owner = caller if pfd is None else pfd
    if pt_owner != caller:
        ptd = host.domains.get(pt_owner)
        if ptd is None or ptd.is_system:
            return -E.ESRCH, 0
        if ptd.vcpus < 1:
            return -E.EINVAL, 0
        if not _priv_over(host, caller, pt_owner):
            return -E.EPERM, 0
    ptd = host.domains[pt_owner]
    rc, pg_owner = get_pg_owner(host, caller, fd)
    if rc:
        return rc, 0
    if pg_owner != caller and pg_owner not in (X.DOMID_IO, X.DOMID_XEN) \
            and not _priv_over(host, caller, pg_owner):
        return -E.EPERM, 0
    done = 0
    for ptr, val in reqs.tolist():
        cmd = ptr & X.MMU_CMD_MASK
        if cmd in (X.MMU_NORMAL_PT_UPDATE, X.MMU_PT_UPDATE_PRESERVE_AD):
            if ptd.hvm:
                return -E.EOPNOTSUPP, done
            table = ptr >> 12
            idx = (ptr & 0xFFF) >> 3
            if not get_page(host, table, pt_owner):
                return -E.EINVAL, done  # "Could not get page for normal update"
            pres = cmd == X.MMU_PT_UPDATE_PRESERVE_AD
            lvl = is_validated_table(host, table)
            t = _ti(host, table)
            if lvl == 1:
                rc = mod_l1_entry(host, table, idx, val, pt_owner, pg_owner, pres)
            elif lvl:
                rc = -E.EINVAL if pg_owner != pt_owner else \
                    mod_upper_entry(host, table, lvl, idx, val, pt_owner, pres)
            elif (t & _TYPE) == mm.PGT_writable_page and t & _TCOUNT:
                host.ft.table(table)[idx] = _U(val)
                rc = 0
            elif t & _TCOUNT:
                rc = -E.EINVAL
            else:
                rc = get_page_type(host, table, mm.PGT_writable_page)
                if rc == 0:
                    host.ft.table(table)[idx] = _U(val)
                    put_page_type(host, table)
            put_page(host, table)
        elif cmd == X.MMU_MACHPHYS_UPDATE:
            mfn = ptr >> 12
            if pt_owner != caller:
                rc = -E.EPERM
            elif pg_owner in host.domains and host.domains[pg_owner].hvm:
                rc = -E.EINVAL
            elif not get_page(host, mfn, pg_owner):
                rc = -E.EINVAL
            else:
                host.ft.set_m2p(mfn, val)
                put_page(host, mfn)
                rc = 0
        else:
            rc = -E.ENOSYS
        if rc:
            return rc, done
        done += 1
    return 0, done


def mmuext_op(host: "Host", caller: int, ops: list[tuple[int, int]], foreigndom: int,
              vcpu: int = 0) -> tuple[int, int]:
    """``do_mmuext_op`` for ``(cmd, mfn)`` pairs: pin/unpin, new (user) base pointer."""
    rc, pg_owner = get_pg_owner(host, caller, foreigndom & 0xFFFF)
    if rc:
        return rc, 0
    if not _priv_over(host, caller, pg_owner):
        return -E.EPERM, 0
    d = host.domains.get(pg_owner)
    done = 0
    for cmd, mfn in ops:
        if cmd in (X.MMUEXT_PIN_L1_TABLE, X.MMUEXT_PIN_L2_TABLE, X.MMUEXT_PIN_L3_TABLE,
                   X.MMUEXT_PIN_L4_TABLE):
            if d is None or d.hvm:
                return -E.EINVAL, done
            level = cmd - X.MMUEXT_PIN_L1_TABLE + 1
            rc = get_page_and_type(host, mfn, pg_owner, mm.pgt_level(level))
            if rc:
                return -E.EINVAL, done
            t = _ti(host, mfn)
            if t & mm.PGT_pinned:
                put_page_and_type(host, mfn)
                return -E.EINVAL, done  # "Mfn already pinned"
            host.ft.type_info[mfn] = _U(t | mm.PGT_pinned)
        elif cmd == X.MMUEXT_UNPIN_TABLE:
            if not get_page(host, mfn, pg_owner):
                return -E.EINVAL, done
            t = _ti(host, mfn)
            if not t & mm.PGT_pinned:
                put_page(host, mfn)
                return -E.EINVAL, done  # "mfn not pinned"
            host.ft.type_info[mfn] = _U(t & ~mm.PGT_pinned)
            put_page_and_type(host, mfn)
            put_page(host, mfn)
        elif cmd in (X.MMUEXT_NEW_BASEPTR, X.MMUEXT_NEW_USER_BASEPTR):
            if pg_owner != caller:
                return -E.EINVAL, done
            rc = new_baseptr(host, d, vcpu, mfn, user=(cmd == X.MMUEXT_NEW_USER_BASEPTR))
            if rc:
                return rc, done
        elif cmd == X.MMUEXT_TLB_FLUSH_LOCAL:
            pass
        else:
            return -E.EINVAL, done
        done += 1
    return 0, done


def new_baseptr(host: "Host", d: "Domain", vcpu: int, mfn: int, user: bool = False) -> int:
    """``new_guest_cr3``: the new root takes a general and an L4 type reference; the old
    one's are dropped.  ``mfn`` 0 clears a user root."""
    slots = d.guest_table_user if user else d.guest_table
    while len(slots) <= vcpu:
        slots.append(0)
    if mfn:
        rc = get_page_and_type(host, mfn, d.domid, mm.PGT_l4_page_table)
        if rc:
            return -E.EINVAL
    old = slots[vcpu]
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
