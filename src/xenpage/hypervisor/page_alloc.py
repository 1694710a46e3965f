"""The buddy heap and the page-offline state machine (``xen/common/page_alloc.c``).

Free memory lives in power-of-two chunks on per-(zone, order) free lists.  A frame in state
``offlined`` is never on a free list: offlining a free frame splits it out of its chunk
(``reserve_offlined_page``) and freeing an ``offlining`` frame moves it to the offlined or
broken list instead of the heap (``free_heap_pages`` / ``mark_page_free``).

Free lists are insertion-ordered dicts (FIFO): split remainders go to the head, freed and
merged chunks to the tail, and allocation takes the head, as Xen's page lists do.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..abi import mm
from .frametable import FrameTable

if TYPE_CHECKING:  # pragma: no cover
    pass

#: Largest buddy order on x86 (``MAX_ORDER``).
MAX_ORDER = 20

_FREE = mm.STATE_FREE
_OFFLINED = mm.STATE_OFFLINED
_OFFLINING = mm.STATE_OFFLINING
_INUSE = mm.STATE_INUSE

_U = np.uint64
_STATE_MASK = _U(mm.PGC_state)
_KEEP_NOT_STATE = _U(~mm.PGC_state & 0xFFFFFFFFFFFFFFFF)


def zone_of(mfn: int) -> int:
    """``page_to_zone``: the zone is the bit length of the MFN (``flsl``)."""
    return int(mfn).bit_length()


class OutOfMemory(Exception):
    """``alloc_heap_pages`` found no chunk (callers turn it into -ENOMEM)."""


def canonical_chunks(free: np.ndarray, base: int, max_order: int) -> list[tuple[int, int]]:
    """Maximal aligned power-of-two chunks covering the True frames of ``free``
    (a window starting at ``base``, aligned to and sized 2^max_order), in address order.
    This is the layout Xen's buddy merging converges to."""
    levels = [free]
    for _ in range(max_order):
        f = levels[-1]
        levels.append(f[0::2] & f[1::2])
    out: list[tuple[int, int]] = []
    for k in range(max_order, -1, -1):
        f = levels[k]
        if k < max_order:
            parent = np.repeat(levels[k + 1], 2)
            heads = np.flatnonzero(f & ~parent)
        else:
            heads = np.flatnonzero(f)
        out.extend((base + (int(i) << k), k) for i in heads)
    out.sort()
    return out


class Heap:
    """Per-(zone, order) free lists over a :class:`FrameTable`."""

    def __init__(self, ft: FrameTable, max_order: int = MAX_ORDER):
        self.ft = ft
        self.max_order = max_order
        self.lists: dict[tuple[int, int], dict[int, None]] = {}
        self.free_pages = 0
        self.offlined_list: dict[int, None] = {}   # page_offlined_list
        self.broken_list: dict[int, None] = {}     # page_broken_list

    # -- list primitives --------------------------------------------------------------------
    def _add(self, head: int, order: int, tail: bool = True) -> None:
        key = (zone_of(head), order)
        lst = self.lists.setdefault(key, {})
        if tail:
            lst[head] = None
        else:
            new = {head: None}
            new.update(lst)
            self.lists[key] = new
        self.ft.buddy_order[head] = order + 1
        self.free_pages += 1 << order

    def _remove(self, head: int, order: int) -> None:
        del self.lists[(zone_of(head), order)][head]
        self.ft.buddy_order[head] = 0
        self.free_pages -= 1 << order

    def chunk_of(self, mfn: int) -> tuple[int, int] | None:
        """The free chunk (head, order) containing ``mfn``, if any."""
        bo = self.ft.buddy_order
        for k in range(self.max_order + 1):
            h = mfn & ~((1 << k) - 1)
            if h < self.ft.nframes and bo[h] == k + 1:
                return h, k
        return None

    def chunks(self) -> list[tuple[int, int]]:
        """Every free chunk as (head, order), in address order."""
        heads = np.flatnonzero(self.ft.buddy_order)
        return [(int(h), int(self.ft.buddy_order[h]) - 1) for h in heads]

    # -- allocation -------------------------------------------------------------------------
    def alloc(self, order: int = 0) -> int:
        """``alloc_heap_pages``: search zones from the highest down and, in each zone, orders
        from ``order`` up; split the chunk, returning its highest-addressed part and putting
        the lower halves back at the head of their lists.  Marks the frames ``inuse`` with a
        zero count and no owner (the caller assigns them)."""
        zones = sorted({z for (z, o), lst in self.lists.items() if lst and o >= order},
                       reverse=True)
        for z in zones:
            for j in range(order, self.max_order + 1):
                lst = self.lists.get((z, j))
                if lst:
                    head = next(iter(lst))
                    self._remove(head, j)
                    while j > order:
                        j -= 1
                        self._add(head, j, tail=False)
                        head += 1 << j
                    n = 1 << order
                    st = self.ft.states(head, n)
                    assert (st == _FREE).all(), "allocator handed out a frame that is not free"
                    sl = slice(head, head + n)
                    self.ft.count_info[sl] = _U(0)  # state inuse, count 0
                    self.ft.type_info[sl] = _U(0)
                    self.ft.owner1[sl] = 0
                    return head
        raise OutOfMemory(order)

    # -- freeing ----------------------------------------------------------------------------
    def free(self, head: int, order: int = 0) -> list[int]:
        """``free_heap_pages``: each frame goes ``inuse``->``free`` or ``offlining``->``offlined``
        (``mark_page_free``, keeping PGC_broken; the M2P entry is invalidated and the owner
        cleared); the chunk merges with free buddies of equal order; chunks that contained
        offlined frames are re-split around them (``reserve_offlined_page``).
        Returns the frames that became offlined."""
        n = 1 << order
        sl = slice(head, head + n)
        ci = self.ft.count_info[sl]
        st = ((ci & _STATE_MASK) >> _U(mm.PGC_state_shift)).astype(np.int8)
        bad = (st != _INUSE) & (st != _OFFLINING)
        if bad.any():
            raise AssertionError(f"free_heap_pages: mfn {head + int(np.flatnonzero(bad)[0]):#x} "
                                 "is neither inuse nor offlining")
        if ((st == _INUSE) & ((ci & _U(mm.PGC_broken)) != 0)).any():
            raise AssertionError("free_heap_pages: a broken frame in state inuse")
        offl = st == _OFFLINING
        newstate = np.where(offl, _U(mm.PGC_state_offlined), _U(mm.PGC_state_free))
        keep = ci & _U(mm.PGC_broken)
        self.ft.count_info[sl] = keep | newstate
        self.ft.type_info[sl] = _U(0)
        self.ft.owner1[sl] = 0
        self.ft.m2p_plus1[sl] = _U(0)
        # Merge with buddies (only if every frame of the chunk is free).
        offlined = [head + int(i) for i in np.flatnonzero(offl)]
        if offlined:
            self.reserve_offlined(head, order, offlined)
            return offlined
        while order < self.max_order:
            mask = 1 << order
            buddy = head ^ mask
            if buddy + mask > self.ft.nframes or self.ft.buddy_order[buddy] != order + 1:
                break
            self._remove(buddy, order)
            head = min(head, buddy)
            order += 1
        self._add(head, order, tail=True)
        return []

    def reserve_offlined(self, head: int, order: int, offlined: Iterable[int]) -> None:
        """``reserve_offlined_page``: put the free frames of chunk [head, head+2^order) back as
        maximal aligned sub-chunks; move each offlined frame to the broken or offlined list."""
        n = 1 << order
        free = self.ft.states(head, n) == _FREE
        for h, k in canonical_chunks(free, head, order):
            self._add(h, k, tail=True)
        broken = np.uint64(mm.PGC_broken)
        for m in offlined:
            if int(self.ft.count_info[m]) & mm.PGC_broken:
                self.broken_list[m] = None
            else:
                self.offlined_list[m] = None
        del broken

    def rebuild(self, start: int, end: int) -> None:
        """Recompute the free chunks of every MAX_ORDER-aligned window meeting [start, end)
        from the frames' states (used after a vectorised change of many frames)."""
        w = 1 << self.max_order
        a = (start // w) * w
        while a < end:
            b = min(a + w, self.ft.nframes)
            heads = np.flatnonzero(self.ft.buddy_order[a:b])
            for h in heads.tolist():
                self._remove(a + h, int(self.ft.buddy_order[a + h]) - 1)
            size = w
            free = np.zeros(size, dtype=bool)
            free[:b - a] = self.ft.states(a, b - a) == _FREE
            for h, k in canonical_chunks(free, a, self.max_order):
                self._add(h, k, tail=True)
            a += w

    def take_free_range(self, mfns: np.ndarray) -> None:
        """Mark free frames ``offlined`` and withdraw them from the heap (vectorised
        ``mark_page_offline`` + ``reserve_offlined_page`` for many free frames)."""
        if mfns.size == 0:
            return
        ci = self.ft.count_info[mfns]
        self.ft.count_info[mfns] = (ci & _KEEP_NOT_STATE) | _U(mm.PGC_state_offlined)
        self.rebuild(int(mfns.min()), int(mfns.max()) + 1)
        br = (ci & _U(mm.PGC_broken)) != 0
        for m, b in zip(mfns.tolist(), br.tolist()):
            (self.broken_list if b else self.offlined_list)[m] = None

    # -- persistence ------------------------------------------------------------------------
    def to_state(self) -> dict:
        return {
            "lists": [[z, o, list(lst.keys())] for (z, o), lst in self.lists.items() if lst],
            "offlined": list(self.offlined_list.keys()),
            "broken": list(self.broken_list.keys()),
        }

    @classmethod
    def from_state(cls, ft: FrameTable, st: dict, max_order: int = MAX_ORDER) -> "Heap":
        h = cls(ft, max_order)
        for z, o, heads in st["lists"]:
            h.lists[(z, o)] = dict.fromkeys(heads)
            h.free_pages += len(heads) << o
        h.offlined_list = dict.fromkeys(st["offlined"])
        h.broken_list = dict.fromkeys(st["broken"])
        return h
