"""Which of many frame numbers are among a few target frames, in time proportional to the
many and memory independent of the host's size.

``np.isin(values, targets, kind="table")`` allocates a table spanning the targets' range --
up to the whole host for frames spread over it -- and the sorting kind sorts the many; here a
64 KiB filter on the low 16 bits of the targets (it stays in the cache) picks the candidates
in one pass, and only those (about ``len(targets) / 65536`` of the rest) are compared exactly.
"""

from __future__ import annotations

import numpy as np

_BITS = 16
_MASK = (1 << _BITS) - 1


def member(values: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Boolean array shaped like ``values``: which are in ``targets`` (both integer arrays
    of one kind, unsigned or non-negative)."""
    v = np.asarray(values)
    t = np.asarray(targets).ravel()
    if t.size == 0:
        return np.zeros(v.shape, dtype=bool)
    if t.size == 1:
        return v == t[0]
    m = v.dtype.type(_MASK)
    filt = np.zeros(_MASK + 1, dtype=bool)
    filt[(t & t.dtype.type(_MASK)).astype(np.intp)] = True
    key = v & m
    key = key.view(np.intp) if key.dtype.itemsize == np.dtype(np.intp).itemsize else key.astype(np.intp)
    cand = filt[key]
    idx = np.flatnonzero(cand)
    if idx.size:
        flat = v.reshape(-1)
        cand.reshape(-1)[idx] = np.isin(flat[idx], t)
    return cand


def frame_filter(targets: np.ndarray) -> np.ndarray | None:
    """The 64 KiB filter of :func:`member_frames` for ``targets`` (None for one target or
    none: compared directly), to be built once for many calls."""
    t = np.asarray(targets, dtype=np.uint64).ravel()
    if t.size <= 1:
        return None
    filt = np.zeros(_MASK + 1, dtype=bool)
    filt[(t & np.uint64(_MASK)).astype(np.intp)] = True
    return filt


def member_frames(ptes: np.ndarray, targets: np.ndarray, shift: int, frame_mask: int,
                  filt: np.ndarray | None = None) -> np.ndarray:
    """Boolean array shaped like ``ptes`` (``uint64`` page-table entries): which entries'
    frame field ``(pte >> shift) & frame_mask`` is in ``targets`` -- the filter is taken on
    the field's low 16 bits straight from the entries, the whole field only for the
    candidates.  ``filt``: :func:`frame_filter` of ``targets``, if already built."""
    t = np.asarray(targets, dtype=np.uint64).ravel()
    e = np.asarray(ptes, dtype=np.uint64)
    if t.size <= 1:
        f = e >> np.uint64(shift)
        f &= np.uint64(frame_mask)
        return f == t[0] if t.size else np.zeros(e.shape, dtype=bool)
    if filt is None:
        filt = frame_filter(t)
    key = e >> np.uint64(shift)
    key &= np.uint64(_MASK)
    cand = filt.take(key.view(np.intp))
    idx = np.flatnonzero(cand)
    if idx.size:
        f = (e.reshape(-1)[idx] >> np.uint64(shift)) & np.uint64(frame_mask)
        cand.reshape(-1)[idx] = np.isin(f, t)
    return cand
