"""Offline frames without letting Xen 4.17 misalign its free buddies.

When a frame becomes offlined inside a larger free buddy -- a free frame offlined, or an
offline-pending frame freed by ``XENMEM_exchange`` next to free frames -- Xen 4.17's
``reserve_offlined_page`` re-splits the buddy growing pieces from the frame after it without
checking their alignment.  The misaligned chunks later merge over frames in use and Xen
hands pages out twice or crashes (seen in our lab; fixed upstream in 2026).

The split is safe when the frame is the *last* frame of its buddy: the pieces before it grow
from the buddy's aligned head and stay aligned.  Buddies are aligned, so the buddy of order
``j`` around frame X ends at ``X | (2^j - 1)``.  :class:`SplitGuard` first offlines, from
the highest order down, each such *guard frame* that is free -- each is then itself the last
frame of its buddy -- so that no free buddy can extend past X any more; then X is offlined
(or exchanged) safely; then the guard frames are onlined again (``free_heap_pages`` merges
them back correctly).  Frames of a run are offlined from the highest down for the same
reason.  A guard frame found in use (its offline answers PENDING) is onlined at once: it
already keeps buddies from growing past it.

Whether a frame is free cannot be asked of Xen (``query_page_offline`` says 0 for free and
in use alike), hence the offline attempt.  Frames known to be in use (a guest's own frames)
are skipped, frames already offlined or pending are left alone, and only frames this guard
offlined are onlined afterwards.  What it cannot cover: a pending frame freed together with
its neighbours (its domain destroyed, e.g. after a live migration) -- Xen merges them before
splitting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np

from .. import statefiles
from ..abi import mm
from ..abi import sysctl as S
from .hypervisor import Hypervisor


def guard_frames(targets: Iterable[int], max_mfn: int, skip: np.ndarray | None = None) -> list[int]:
    """The guard frames of ``targets``: for each target X and order j = 1..MAX_ORDER the last
    frame ``X | (2^j - 1)`` of the aligned block of order j holding X, when it is not X, below
    ``max_mfn``, not itself a target and not in ``skip``; unique, highest first (the order in
    which offlining them is safe)."""
    t = _distinct(np.asarray(targets if isinstance(targets, np.ndarray) else list(targets),
                             dtype=np.int64))
    if t.size == 0:
        return []
    # one order at a time: a million targets never make an array of all their guards
    # (t is sorted, so each t | mask is too)
    g = _distinct(np.concatenate([_distinct(t | np.int64((1 << j) - 1), presorted=True)
                                  for j in range(1, mm.MAX_ORDER + 1)]))
    g = g[(g < max_mfn) & ~np.isin(g, t)]
    if skip is not None and len(skip):
        g = g[~np.isin(g, np.asarray(skip, dtype=np.int64))]
    return g[::-1].tolist()


def _distinct(a: np.ndarray, presorted: bool = False) -> np.ndarray:
    """Sorted distinct values by one sort (numpy 2.4's hashing ``np.unique`` takes seconds
    on a million consecutive frames)."""
    s = a if presorted else np.sort(a)
    return s[np.r_[True, s[1:] != s[:-1]]] if s.size else s


#: In the state directory while guard frames may be held: the frames a guard may have taken
#: (all online when it started), so that ``xenpage recover`` gives back what a killed
#: ``mem-offline`` left offline.
RECORD = "split-guard.json"


class SplitGuard:
    """Guard frames offlined around a set of target frames for as long as it is open.

    ``protect(targets, in_use)`` offlines the free guard frames; ``release()`` onlines the
    ones it offlined, in reverse order.  The caller keeps dom0 off pCPU 0 (offlining a guard
    frame that turns out to be a PV domain's takes that domain's PoD lock).  With a
    ``state_dir`` the frames it is about to touch are recorded there first (fsync'd) and the
    record is removed once they are back (:func:`recover`)."""

    def __init__(self, hv: Hypervisor, state_dir=None):
        self.hv = hv
        self.record = Path(state_dir) / RECORD if state_dir is not None else None
        self.held: list[int] = []
        self.probed = 0
        self.in_use_found = 0

    def _online_now(self, frames: list[int]) -> list[int]:
        """The frames query_page_offline reports plainly online (not offlined, pending or
        broken): the only ones a guard may take."""
        busy = S.PG_OFFLINE_STATUS_OFFLINED | S.PG_OFFLINE_STATUS_BROKEN | S.PG_OFFLINE_STATUS_OFFLINE_PENDING
        held = set(self.held)
        frames = [y for y in frames if y not in held]
        if not frames:
            return []
        rcs, q = self.hv.page_offline_each(S.sysctl_query_page_offline, np.array(frames, dtype=np.int64))
        keep = (rcs == 0) & ((q & np.uint32(busy)) == 0)
        return np.asarray(frames, dtype=np.int64)[keep].tolist()

    def protect(self, targets: Iterable[int], in_use: np.ndarray | None = None) -> None:
        hv = self.hv
        todo = self._online_now(guard_frames(targets, hv.max_mfn(), skip=in_use))
        if self.record is not None and todo:
            statefiles.write_frames(self.record, self.held + todo)
        for y in todo:
            self.probed += 1
            rc, st = hv.page_offline_op(S.sysctl_page_offline, y, y)
            if rc or st is None:
                continue  # refused (Xen's image, reserved): never free, never in a buddy
            low = int(st[0]) & S.PG_OFFLINE_STATUS_MASK
            if low == S.PG_OFFLINE_OFFLINED:
                self.held.append(y)
            elif low == S.PG_OFFLINE_PENDING or low == S.PG_OFFLINE_FAILED:
                # in use: it already stops buddies; give it back to its owner at once
                self.in_use_found += 1
                hv.page_offline_op(S.sysctl_page_online, y, y)

    def release(self) -> None:
        while self.held:
            y = self.held.pop()
            self.hv.page_offline_op(S.sysctl_page_online, y, y)
        if self.record is not None and self.record.exists():
            self.record.unlink()

    def summary(self) -> dict:
        return {"guard_frames_probed": self.probed, "guard_frames_in_use": self.in_use_found}


def recover(hv: Hypervisor, state_dir) -> list[int]:
    """After a ``mem-offline`` killed while it held guard frames: online every recorded frame
    that is now offlined or offline-pending (each was plainly online when the guard took it),
    then drop the record.  Returns the frames given back."""
    path = Path(state_dir) / RECORD
    frames = statefiles.read_frames(path, "split-guard record", "nothing onlined")
    if frames is None:
        return []
    back = []
    for y in frames:
        rc, q = hv.page_offline_op(S.sysctl_query_page_offline, y, y)
        if rc == 0 and q is not None and int(q[0]) & (S.PG_OFFLINE_STATUS_OFFLINED
                                                      | S.PG_OFFLINE_STATUS_OFFLINE_PENDING) \
                and not int(q[0]) & S.PG_OFFLINE_STATUS_BROKEN:
            if hv.page_offline_op(S.sysctl_page_online, y, y)[0] == 0:
                back.append(y)
    path.unlink()
    return back


def split_misaligns(hv: Hypervisor) -> bool:
    """Whether the host's Xen misaligns buddies around offlined frames: every released Xen
    up to 4.17.7 (the backend says; the simulator follows its quirk switch)."""
    return bool(hv.split_misaligns())
