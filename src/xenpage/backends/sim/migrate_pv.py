"""Live migration of a PV guest (``xg_sr_save_x86_pv.c`` / ``xg_sr_restore_x86_pv.c``): the
same pre-copy loop as :mod:`.migrate`, with what a PV guest adds:

* pfns go through the guest's own P2M (read through its frame list, as ``xc_map_domain_meminfo``
  does) and page types come from ``getpageframeinfo3`` on the mfns;
* page tables are *normalised* before they are sent: every present entry's frame becomes a
  pfn (through the M2P; Xen's own L4 slots are cleared).  An entry naming a frame outside the
  guest's pseudo-physical map defers the page while the guest runs (EAGAIN) and fails the
  migration once it is suspended (ERANGE, "Bad mfn") -- which is why Linux unmaps its
  grant table and shared_info before suspending;
* the guest is suspended through xenstore (``control/shutdown`` = ``suspend``);
* the stream adds the P2M frames' pfns, shared_info and the vCPU context (CR3 as a pfn);
* the restorer populates each pfn, *localises* page tables (pfn -> the new mfn, populating
  what they name), writes the new P2M into the guest's P2M frames, pins every table that was
  pinned, loads the vCPU context (CR3 back to an mfn) and unpauses.  The guest then resumes in
  the new domain (``xen_post_suspend``): see :mod:`xenpage.guests.linux_pv`.

Log-dirty, the policy, the link and the downtime accounting are those of :mod:`.migrate`.
"""

from __future__ import annotations

import time
from typing import Callable

import numpy as np

from ...abi import domctl as D
from ...abi import errno as E
from ...abi import hvm as H
from ...abi import pte as P
from ...abi import xen as X
from .migrate import (NO_DATA_TYPES, PAGE_BYTES, Link, MigrationCosts, MigrationError, MigrationResult,
                          Round, _enable_logdirty, _Stream, create_incoming, final_dirty, finish, hand_over,
                          send_memory_live,
                          simple_precopy_policy, start, write_batch)

_U = np.uint64
ERANGE = 34
L4_XEN_FIRST, L4_XEN_LAST = 256, 271
SUSPEND_TIMEOUT = 10.0


def _level(t: int) -> int:
    lvl = (t & D.XEN_DOMCTL_PFINFO_LTABTYPE_MASK) >> D.XEN_DOMCTL_PFINFO_LTAB_SHIFT
    return lvl if 1 <= lvl <= 4 and t not in NO_DATA_TYPES else 0


class _Save:
    def __init__(self, src, domid: int, p2m: np.ndarray):
        self.src, self.domid, self.p2m = src, domid, p2m
        self.n = p2m.size
        self.deferred: set[int] = set()
        self.paused = False

    def in_pseudophysmap(self, mfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``mfn_in_pseudophysmap``: (ok mask, pfns)."""
        pf = self.src.m2p(mfns)
        ok = pf < _U(self.n)
        pfi = np.where(ok, pf, 0).astype(np.int64)
        ok &= self.p2m[pfi] == mfns
        return ok, pfi

    def normalise(self, words: np.ndarray, level: int) -> np.ndarray | None:
        """``normalise_pagetable``: None when the page must be deferred (EAGAIN)."""
        w = words.copy()
        if level == 4:
            w[L4_XEN_FIRST:L4_XEN_LAST + 1] = 0
        pres = (w & _U(P._PAGE_PRESENT)) != 0
        fr = ((w >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)
        ok, pfi = self.in_pseudophysmap(fr[pres])
        if not ok.all():
            if not self.paused:
                return None
            bad = int(fr[pres][~ok][0])
            raise MigrationError(-ERANGE, f"Bad mfn for L{level}: {bad:#x} is not in d{self.domid}'s "
                                            "pseudo-physical map")
        idx = np.flatnonzero(pres)
        w[idx] = (w[idx] & ~_U(P.PTE_FRAME_MASK)) | (pfi.astype(np.uint64) << _U(12))
        return w


class _RestorePV:
    def __init__(self, dst, domid: int, n: int):
        self.dst, self.domid, self.n = dst, domid, n
        self.p2m = np.full(n, -1, dtype=np.int64)
        self.types = np.full(n, D.XEN_DOMCTL_PFINFO_XTAB, dtype=np.uint32)
        self.broken: set[int] = set()

    def populate(self, pfns: np.ndarray) -> None:
        need = np.unique(pfns[self.p2m[pfns] < 0])
        if need.size == 0:
            return
        rc, mfns = self.dst.populate_physmap(self.domid, need)
        if rc != need.size:
            raise MigrationError(rc if rc < 0 else -E.ENOMEM, f"populating {need.size} pfns failed ({rc})")
        self.p2m[need] = np.asarray(mfns, dtype=np.int64)

    def page_data(self, pfns: np.ndarray, types: np.ndarray, data) -> None:
        pop = ~np.isin(types, (D.XEN_DOMCTL_PFINFO_XTAB, D.XEN_DOMCTL_PFINFO_BROKEN))
        self.broken.update(pfns[types == D.XEN_DOMCTL_PFINFO_BROKEN].tolist())
        self.populate(pfns[pop])
        self.types[pfns] = types
        has = np.flatnonzero(~np.isin(types, NO_DATA_TYPES))
        if has.size == 0:
            return
        for j, i in enumerate(has.tolist()):
            lvl = _level(int(types[i]))
            if lvl:
                data.set_words(j, self.localise(data.words(j)))
        rc = self.dst.write_pages(self.domid, self.p2m[pfns[has]], data)
        if rc:
            raise MigrationError(rc, f"writing pages into d{self.domid} failed ({E.name(rc)})")

    def localise(self, w: np.ndarray) -> np.ndarray:
        """``x86_pv_localise_page``: pfns back to (new) mfns, populating what is named."""
        pres = (w & _U(P._PAGE_PRESENT)) != 0
        pf = ((w >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)
        idx = np.flatnonzero(pres)
        if idx.size == 0:
            return w
        if (pf[idx] >= self.n).any():
            raise MigrationError(-ERANGE, "a page-table entry names a pfn beyond the P2M")
        self.populate(pf[idx])
        w = w.copy()
        w[idx] = (w[idx] & ~_U(P.PTE_FRAME_MASK)) | (self.p2m[pf[idx]].astype(np.uint64) << _U(12))
        return w


def _suspend(src, domid: int, stream: _Stream, timeout: float = SUSPEND_TIMEOUT) -> None:
    """libxl's suspend of a PV guest: ``control/shutdown`` = ``suspend`` and wait."""
    path = f"/local/domain/{domid}/control/shutdown"
    rc = src.xs_write(path, "suspend")
    if rc:
        raise MigrationError(rc, f"cannot write {path}")
    t0 = time.monotonic()
    while True:
        stream.elapse(0.001)
        i = src.domain_info(domid)
        if i is not None and i.shutdown and i.shutdown_reason == X.SHUTDOWN_suspend:
            return
        if time.monotonic() - t0 > timeout:
            src.xs_write(path, "")
            raise MigrationError(-E.ETIMEDOUT, f"d{domid} did not suspend")


def migrate_pv(src, domid: int, dst=None, link: Link | None = None,
               costs: MigrationCosts | None = None,
               policy: Callable[[int, int], int] = simple_precopy_policy,
               hook: Callable | None = None) -> MigrationResult:
    """Live-migrate PV guest ``domid`` from ``src`` to ``dst`` (default: the same host)."""
    wall0 = time.perf_counter()
    same, dst, link, costs, hook, res, info = start(src, domid, dst, link, costs, hook)
    if info is None:
        return res
    if info.hvm or domid == 0:
        res.rc, res.error = -E.EINVAL, f"d{domid} is not a PV guest that can be migrated"
        return res
    if info.shutdown or info.dying:
        res.rc, res.error = -E.EINVAL, f"d{domid} is not running"
        return res
    rc, p2m_frames, n = src.pv_p2m_frames(domid)
    if rc:
        res.rc, res.error = rc, f"cannot locate d{domid}'s P2M ({E.name(rc)})"
        return res
    fm = src.map_foreign(domid, p2m_frames, False)
    if isinstance(fm, int):
        res.rc, res.error = fm, f"cannot map d{domid}'s P2M ({E.name(fm)})"
        return res
    raw = fm.array.ravel()[:n].copy()
    fm.unmap()
    p2m = np.where(raw == _U(X.INVALID_MFN), -1, raw.astype(np.int64))
    new = create_incoming(dst, info, same, False, res)
    if new is None:
        return res
    stream = _Stream(src, dst, link)
    save = _Save(src, domid, p2m)
    restore = _RestorePV(dst, new, n)
    suspended = False
    try:
        hook("created", new=new)
        _enable_logdirty(src, domid)
        stream.send(2 * H.REC_HEADER_BYTES + 64 + 8 * len(p2m_frames))   # headers, PV_INFO, P2M frames
        send_memory_live(src, domid, n, res, policy,
                         lambda pfns, live: _send(save, restore, pfns, stream, res, live=live, hook=hook))
        t_down = stream.t
        _suspend(src, domid, stream)
        suspended = True
        save.paused = True
        stream.elapse(costs.suspend_s)
        hook("suspended")
        final = np.union1d(final_dirty(src, domid, n, res),
                           np.array(sorted(save.deferred), dtype=np.int64))
        save.deferred.clear()
        t_final = stream.t
        _send(save, restore, final, stream, res, live=False, hook=hook)
        final_s = stream.t - t_final
        # P2M frames (as pfns), shared_info, the vCPU context (CR3 as a pfn), END
        p2m_pfns = src.m2p(p2m_frames).astype(np.int64)
        rc, ctx = src.vcpu_getcontext(domid)
        if rc:
            raise MigrationError(rc, f"reading d{domid}'s vCPU context failed ({E.name(rc)})")
        t_ctx = stream.t
        stream.send(H.REC_HEADER_BYTES + PAGE_BYTES)                       # SHARED_INFO
        stream.send(H.REC_HEADER_BYTES + int(getattr(ctx, "nbytes", 0)))  # VCPU_BASIC ...
        stream.send(H.REC_HEADER_BYTES)                                    # END
        ctx_s = stream.t - t_ctx
        stream.elapse(link.latency_s)
        hook("stream-end")
        _finish_restore(dst, new, restore, p2m_pfns, src, ctx)
        hand_over(src, domid, dst, new, info.name, stream, link, costs, hook)
        dst.wait(0)   # the guest resumes in its new domain
    except MigrationError as e:
        if new >= 0 and dst.domain_info(new) is not None:
            dst.destroy(new)
        if src.domain_info(domid) is not None:
            src.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_OFF)
            src.set_domain_name(domid, info.name)
            if suspended:
                src.resume(domid, fast=True)
                src.wait(0)
        res.rc, res.error = e.rc, str(e)
        res.wall_s = time.perf_counter() - wall0
        return res
    src.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_OFF)
    src.destroy(domid)
    hook("destroyed")
    return finish(res, stream, link, costs, t_down, final_s, ctx_s, restore.broken, wall0)


def _send(save: _Save, restore: _RestorePV, pfns: np.ndarray, stream: _Stream, res: MigrationResult,
          live: bool, hook) -> None:
    """``send_dirty_pages`` / ``write_batch`` for a PV guest."""
    src, domid = save.src, save.domid
    r = Round(len(res.rounds) + 1, live)
    res.rounds.append(r)
    t0 = stream.t
    for s in range(0, pfns.size, H.MAX_BATCH_SIZE):
        batch = pfns[s:s + H.MAX_BATCH_SIZE]
        mfns = save.p2m[batch]
        types = np.full(batch.size, D.XEN_DOMCTL_PFINFO_XTAB, dtype=np.uint32)
        valid = mfns >= 0
        for pf in batch[~valid].tolist():   # a ballooned pfn: later
            save.deferred.add(pf)
        if valid.any():
            rc, t = src.page_types(domid, mfns[valid])
            if rc:
                raise MigrationError(rc, f"getpageframeinfo3 failed ({E.name(rc)})")
            types[valid] = np.asarray(t, dtype=np.uint32)
        has = np.flatnonzero(~np.isin(types, NO_DATA_TYPES))
        data = None
        if has.size:
            rc, data = src.read_pages(domid, mfns[has])
            if rc:
                raise MigrationError(rc, f"mapping {has.size} pages of d{domid} failed ({E.name(rc)})")
            keep = []
            for j, i in enumerate(has.tolist()):
                lvl = _level(int(types[i]))
                if lvl:
                    w = save.normalise(data.words(j), lvl)
                    if w is None:                       # EAGAIN: send it later
                        save.deferred.add(int(batch[i]))
                        types[i] = D.XEN_DOMCTL_PFINFO_XTAB
                        continue
                    data.set_words(j, w)
                keep.append(j)
            if len(keep) < has.size:
                data = data.select(np.array(keep, dtype=np.int64))
                has = has[keep]
        write_batch(stream, restore, r, batch, types, data, int(has.size))
        hook("batch", round=r.index, live=live)
    r.seconds = stream.t - t0


def _finish_restore(dst, new: int, restore: _RestorePV, p2m_pfns: np.ndarray, src, ctx) -> None:
    """After END: the new P2M into the guest's P2M frames, the pins, the vCPU context."""
    n = restore.n
    if (restore.p2m[p2m_pfns] < 0).any():
        raise MigrationError(-E.EINVAL, "a P2M frame was never sent")
    frames = restore.p2m[p2m_pfns]
    rc, data = dst.read_pages(new, frames)
    if rc:
        raise MigrationError(rc, f"mapping d{new}'s P2M frames failed ({E.name(rc)})")
    words = np.full(len(frames) * 512, _U(X.INVALID_MFN), dtype=np.uint64)
    ok = restore.p2m >= 0
    words[:n][ok] = restore.p2m[ok].astype(np.uint64)
    for i in range(len(frames)):
        data.set_words(i, words[i * 512:(i + 1) * 512])
    rc = dst.write_pages(new, frames, data)
    if rc:
        raise MigrationError(rc, f"writing d{new}'s P2M failed ({E.name(rc)})")
    # pin_pagetables: every table that was pinned, in pfn order
    pinned = np.flatnonzero((restore.types & np.uint32(D.XEN_DOMCTL_PFINFO_LPINTAB)) != 0)
    ops = []
    for pf in pinned.tolist():
        t = int(restore.types[pf])
        lvl = _level(t & ~D.XEN_DOMCTL_PFINFO_LPINTAB)
        if lvl and restore.p2m[pf] >= 0:
            ops.append((X.MMUEXT_PIN_L1_TABLE + lvl - 1, int(restore.p2m[pf])))
    if ops:
        rc, done = dst.mmuext_op(ops, new)
        if rc:
            raise MigrationError(rc, f"pinning d{new}'s page tables failed ({E.name(rc)}) after {done}")
    # the vCPU context: CR3 (an mfn of the old domain) -> pfn -> the new mfn
    for attr in ("cr3", "user_cr3"):
        m = int(getattr(ctx, attr, 0) or 0)
        if m:
            pf = int(src.m2p(np.array([m], dtype=np.int64))[0])
            if pf >= n or restore.p2m[pf] < 0:
                raise MigrationError(-E.EINVAL, f"{attr} {m:#x} is not a frame of the guest")
            setattr(ctx, attr, int(restore.p2m[pf]))
    rc = dst.vcpu_setcontext(new, ctx)
    if rc:
        raise MigrationError(rc, f"loading d{new}'s vCPU context failed ({E.name(rc)})")
