"""Idempotent completion and undo of an exchange group.

Once ``XENMEM_exchange`` has moved a frame there is no way back: the old frame is gone (it
was offline-pending, so it is now offlined).  Everything after it -- copy the content, fix the
P2M frame list, the P2M and the M2P, re-point the cleared entries, re-pin -- must therefore be
*completed*, whatever fails on the way.  Each step here reads what is there first and only
writes what differs, so it can be retried after a transient failure (a failed hypercall) and
run again from the write-ahead journal after the process died (``xenpage recover``).

:func:`roll_back` is the same for a group whose frames were *not* exchanged: entries that
differ from their journaled values are put back (lower levels first), unpinned tables are
pinned again.
"""

from __future__ import annotations

import numpy as np

from ..abi import domctl as D
from ..abi import errno as E
from ..abi import pte as P
from ..abi import xen as X
from .hypervisor import Hypervisor
from .membership import member

_U = np.uint64
RETRIES = 4


class Incomplete(Exception):
    """A step kept failing: ``errno`` is its last error; the journal stays for recovery."""

    def __init__(self, step: str, rc: int):
        super().__init__(f"{step} failed ({E.name(rc)})")
        self.step = step
        self.errno = rc


def _retry(step: str, fn):
    rc = 0
    for _ in range(RETRIES):
        rc = fn()
        if rc == 0:
            return
    raise Incomplete(step, rc)


def _read(hv: Hypervisor, domid: int, mfns) -> np.ndarray | int:
    m = hv.map_foreign(domid, np.asarray(mfns, dtype=np.int64), False)
    if isinstance(m, int):
        return m
    a = m.array.copy()
    m.unmap()
    return a


def _write_rows(hv: Hypervisor, domid: int, mfns: list[int], rows, compare: bool = True) -> int:
    """Write whole frames whose content differs from ``rows`` (a sequence of 512-word rows
    or one ``(n, 512)`` array).  ``compare=False``: write every frame without reading it
    first -- for frames just handed out by XENMEM_exchange, which nothing else can have
    written or typed yet (writing the same words again is harmless: idempotent either way)."""
    if not len(mfns):
        return 0
    want = rows if isinstance(rows, np.ndarray) and rows.ndim == 2 else \
        np.stack([np.asarray(r, dtype=np.uint64).reshape(512) for r in rows])
    need = None
    if compare:
        m = hv.map_foreign(domid, np.asarray(mfns, dtype=np.int64), False)
        if isinstance(m, int):
            return m
        diff = (m.array != want).any(axis=1)  # one pass for a batch, read in place
        m.unmap()
        if not diff.any():
            return 0
        if not diff.all():
            need = np.flatnonzero(diff)
    if need is None:
        wm = hv.map_foreign(domid, np.asarray(mfns, dtype=np.int64), True)
    else:
        wm = hv.map_foreign(domid, np.asarray(mfns, dtype=np.int64)[need], True)
    if isinstance(wm, int):
        return wm
    wm.array[:] = want if need is None else want[need]
    wm.flush()
    wm.unmap()
    return 0


def _write_words(hv: Hypervisor, domid: int, frames: list[int], writes: list[tuple[int, int, int]],
                 compare: bool = True) -> int:
    """``writes`` = (row in ``frames``, word index, value): a read-modify-write of the frames
    holding a word that differs.  ``compare=False``: the frames are mapped writable at once
    and the words written in place (the first pass of an exchange, whose words all differ)."""
    if not writes:
        return 0
    w = np.array(writes, dtype=np.uint64).reshape(-1, 3)
    r, i = w[:, 0].astype(np.int64), w[:, 1].astype(np.int64)
    if not compare:
        wm = hv.map_foreign(domid, np.asarray(frames, dtype=np.int64), True)
        if isinstance(wm, int):
            return wm
        wm.array[r, i] = w[:, 2]
        wm.flush()
        wm.unmap()
        return 0
    cur = _read(hv, domid, frames)
    if isinstance(cur, int):
        return cur
    rows = cur.copy()
    rows[r, i] = w[:, 2]
    return _write_rows(hv, domid, frames, rows)


def _set_entries(hv: Hypervisor, domid: int, ents: list[tuple[int, int, int, int]]) -> int:
    """``ents`` = (table mfn, index, value, level of the table): write those that differ,
    lower levels first (a table is revalidated with its own entries already in place)."""
    if not ents:
        return 0
    e = np.array(ents, dtype=np.uint64).reshape(-1, 4)
    t = e[:, 0].astype(np.int64)
    tabs, row = np.unique(t, return_inverse=True)
    cur = _read(hv, domid, tabs)
    if isinstance(cur, int):
        return cur
    idx = e[:, 1].astype(np.int64)
    diff = np.flatnonzero(cur[row.ravel(), idx] != e[:, 2])
    if not diff.size:
        return 0
    diff = diff[np.argsort(e[diff, 3], kind="stable")]  # lower levels first, in order given
    reqs = np.empty((diff.size, 2), dtype=np.uint64)
    reqs[:, 0] = (e[diff, 0] << _U(12)) | (e[diff, 1] * _U(8)) | _U(X.MMU_PT_UPDATE_PRESERVE_AD)
    reqs[:, 1] = e[diff, 2]
    rc, _ = hv.mmu_update(reqs, X.foreigndom(domid, domid))
    return rc


def _pin(hv: Hypervisor, domid: int, pins: list[tuple[int, int]]) -> int:
    """Pin each (mfn, level) that is not pinned yet."""
    if not pins:
        return 0
    rc, t = hv.page_types(domid, np.array([m for m, _ in pins], dtype=np.int64))
    if rc:
        return rc
    for (m, lvl), ty in zip(pins, t.tolist()):
        if ty & D.XEN_DOMCTL_PFINFO_LPINTAB:
            continue
        prc, _ = hv.mmuext_op([(X.MMUEXT_PIN_L1_TABLE + lvl - 1, m)], domid)
        if prc:
            return prc
    return 0


def repoint_values(exchanged, refs_by_target) -> list[tuple[int, int, int, int]]:
    """Every cleared entry of an exchanged frame, in its (possibly moved) table, naming the
    new frame with its original flags."""
    newof = {old: new for old, g, lvl, new in exchanged}
    out = []
    keep = ~P.PTE_FRAME_MASK & 0xFFFFFFFFFFFFFFFF
    for old, g, lvl, new in exchanged:
        nf = new << 12
        out.extend((newof.get(t, t), i, (v & keep) | nf, level) for t, i, v, level in refs_by_target.get(old, ()))
    return out


def complete(hv: Hypervisor, domid: int, exchanged, content: dict, refs_by_target: dict,
             unpinned: list[int], p2m_frames: np.ndarray, fl_frames: np.ndarray,
             hook=None, fresh: bool = False, rows: np.ndarray | None = None) -> tuple[np.ndarray, list[int]]:
    """Finish an exchange group: ``exchanged`` = [(old, gpfn, level, new)], ``content`` =
    {old: uint64[512]} as snapshotted before the exchange, ``refs_by_target`` =
    {old: [(table, index, value, level)]} the entries cleared, ``unpinned`` the old frames
    that were unpinned.  Returns (updated P2M frame list, new frames whose M2P was fixed).
    ``fresh``: called right after the exchange (not from the journal): the new frames are
    written without being read first, and the P2M frames in place; ``rows``: the content as
    one ``(n, 512)`` array in the order of ``exchanged`` (else taken from ``content``).
    Raises :class:`Incomplete` when a step keeps failing."""
    hook = hook or (lambda step, **kw: None)
    news = [new for _, _, _, new in exchanged]
    if rows is None:
        rows = np.stack([np.asarray(content[old], dtype=np.uint64).reshape(512) for old, _, _, _ in exchanged])
    _retry("copy", lambda: _write_rows(hv, domid, news, rows, compare=not fresh))
    hook("copied")
    p2m_frames = np.asarray(p2m_frames, dtype=np.int64)
    olds = np.array([old for old, _, _, _ in exchanged], dtype=np.int64)
    hit = np.flatnonzero(member(p2m_frames, olds))  # vectorised: a big guest has 10^5 frames
    pos = dict(zip(p2m_frames[hit].tolist(), hit.tolist()))
    moved = [(pos[old], new) for old, _, _, new in exchanged if old in pos]
    if moved:  # a copy only when a P2M frame itself moved
        p2m_frames = p2m_frames.copy()
    for i, new in moved:
        p2m_frames[i] = new
    # A guest that publishes only the linear P2M (p2m_cr3/p2m_vaddr) has no frame list to
    # fix: its virtual mapping of the P2M is re-pointed with the other entries.
    if moved and len(fl_frames):
        fl_idx = sorted({i // 512 for i, _ in moved})
        row = {f: k for k, f in enumerate(fl_idx)}
        fls = [int(fl_frames[f]) for f in fl_idx]
        _retry("P2M frame list", lambda: _write_words(hv, domid, fls,
                                                      [(row[i // 512], i % 512, new) for i, new in moved]))
    pf_idx = sorted({g // 512 for _, g, _, _ in exchanged})
    prow = {p: k for k, p in enumerate(pf_idx)}
    pfs = [int(p2m_frames[p]) for p in pf_idx]
    _retry("P2M", lambda: _write_words(hv, domid, pfs,
                                       [(prow[g // 512], g % 512, new) for _, g, _, new in exchanged],
                                       compare=not fresh))
    hook("p2m")
    fixed: list[int] = []

    def m2p() -> int:
        cur = hv.m2p(np.array(news, dtype=np.int64))
        fix = [(new, g) for (_, g, _, new), v in zip(exchanged, cur.tolist()) if v != g]
        if not fix:
            return 0
        reqs = np.array([[(new << 12) | X.MMU_MACHPHYS_UPDATE, g] for new, g in fix], dtype=np.uint64)
        rc, _ = hv.mmu_update(reqs, domid)
        if rc == 0:
            fixed.extend(n for n, _ in fix)
        return rc
    _retry("M2P", m2p)
    ents = repoint_values(exchanged, refs_by_target)
    _retry("re-point", lambda: _set_entries(hv, domid, ents))
    lv = {old: (new, lvl) for old, _, lvl, new in exchanged}
    pins = [lv[old] for old in unpinned if old in lv]
    _retry("re-pin", lambda: _pin(hv, domid, pins))
    return p2m_frames, fixed


def roll_back(hv: Hypervisor, domid: int, refs: list[tuple[int, int, int, int]],
              unpinned: list[tuple[int, int]]) -> None:
    """Put ``refs`` (table, index, original value, level) back and re-pin ``unpinned``
    (mfn, level).  Raises :class:`Incomplete`."""
    _retry("restore", lambda: _set_entries(hv, domid, list(refs)))
    _retry("re-pin", lambda: _pin(hv, domid, list(unpinned)))


def find_new_frame(hv: Hypervisor, domid: int, old: int, gpfn: int) -> int | None:
    """After an exchange whose result was never recorded: the frame of ``domid`` that the
    M2P names ``gpfn`` (Xen set it from the GPFN passed to XENMEM_exchange)."""
    n = hv.max_mfn()
    for s in range(0, n, 1 << 20):
        mf = np.arange(s, min(n, s + (1 << 20)), dtype=np.int64)
        hit = mf[hv.m2p(mf) == _U(gpfn)]
        hit = hit[hit != old]
        if hit.size:
            rc, t = hv.page_types(domid, hit)
            if rc == 0:
                mine = hit[t != np.uint32(D.XEN_DOMCTL_PFINFO_XTAB)]
                if mine.size:
                    return int(mine[0])
    return None
