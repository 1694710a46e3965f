"""The buddy heap and the page-offline state machine (``xen/common/page_alloc.c``).

Free memory lives in power-of-two chunks on per-(zone, order) free lists.  A frame in state
``offlined`` is never on a free list: offlining a free frame splits it out of its chunk
(``reserve_offlined_page``) and freeing an ``offlining`` frame moves it to the offlined or
broken list instead of the heap (``free_heap_pages`` / ``mark_page_free``).

Free lists are insertion-ordered dicts (FIFO): split remainders go to the head, freed and
merged chunks to the tail, and allocation takes the head, as Xen's page lists do.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..abi import mm
from .frametable import FrameTable
from .quirks import HostCrash

if TYPE_CHECKING:  # pragma: no cover
    pass

MAX_ORDER = mm.MAX_ORDER

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


def split_417(offlined: np.ndarray, head: int, order: int) -> list[tuple[int, int]]:
    """Xen 4.17's ``reserve_offlined_page`` re-split of the buddy [head, head+2^order)
    (``offlined`` marks its offlined frames): from each frame that is not offlined, grow a
    piece while the next upper half holds no offlined frame and the doubled piece would end
    strictly before the buddy's end -- never checking that the piece's start is aligned to
    its order.  Pieces in address order."""
    end = 1 << order
    bad = np.flatnonzero(offlined)
    out: list[tuple[int, int]] = []
    cur = 0
    while cur < end:
        if offlined[cur]:
            cur += 1
            continue
        k = 0
        nxt_bad = bad[np.searchsorted(bad, cur)] if bad.size and bad[-1] >= cur else end
        while k < order:
            if cur + (1 << (k + 1)) >= end:   # 4.17: ">=" (stops one step early)
                break
            if nxt_bad < cur + (1 << (k + 1)):  # an offlined frame in the upper half
                break
            k += 1
        out.append((head + cur, k))
        cur += 1 << k
    return out


class Heap:
    """Per-(zone, order) free lists over a :class:`FrameTable`.

    Each list is an ``OrderedDict`` of chunk heads used as a FIFO page list: adding at the
    head (split remainders) and at the tail (freed and re-split chunks) are O(1)."""

    #: Up to this many frames, offlining free frames and onlining offlined frames walk them
    #: one by one exactly as Xen does (list positions included); beyond it, the heap is
    #: recomputed over the affected windows (same chunks; untouched chunks keep their place
    #: in the lists, new ones are appended in address order).
    PER_FRAME_LIMIT = 64

    def __init__(self, ft: FrameTable, max_order: int = MAX_ORDER):
        self.ft = ft
        self.max_order = max_order
        self.lists: dict[tuple[int, int], OrderedDict[int, None]] = {}
        self.free_pages = 0
        #: free frames per zone (which zones ``alloc`` need look at)
        self.zone_pages: dict[int, int] = {}
        #: the host's fidelity switches (``reserve_misaligned``); set by the host
        self.quirks = None
        #: chunks on the lists whose head is not aligned to their order (Xen 4.17 defect)
        self.misaligned = 0
        self.offlined_list: dict[int, None] = {}   # page_offlined_list
        self.broken_list: dict[int, None] = {}     # page_broken_list

    # -- list primitives --------------------------------------------------------------------
    def _add(self, head: int, order: int, tail: bool = True) -> None:
        key = (zone_of(head), order)
        lst = self.lists.get(key)
        if lst is None:
            lst = self.lists[key] = OrderedDict()
        lst[head] = None
        if not tail:
            lst.move_to_end(head, last=False)
        self.ft.buddy_order[head] = order + 1
        self.free_pages += 1 << order
        self.zone_pages[key[0]] = self.zone_pages.get(key[0], 0) + (1 << order)
        if head & ((1 << order) - 1):
            self.misaligned += 1

    def _remove(self, head: int, order: int) -> None:
        z = zone_of(head)
        del self.lists[(z, order)][head]
        self.ft.buddy_order[head] = 0
        self.free_pages -= 1 << order
        self.zone_pages[z] -= 1 << order
        if head & ((1 << order) - 1):
            self.misaligned -= 1

    def _list_offlined(self, mfns) -> None:
        """Append offlined frames (in the given order) to the broken or offlined list by
        their PGC_broken bit (``reserve_offlined_page``)."""
        mfns = np.asarray(mfns, dtype=np.int64)
        if mfns.size == 0:
            return
        br = (self.ft.count_info[mfns] & _U(mm.PGC_broken)) != 0
        if mfns.size == 1:
            (self.broken_list if br[0] else self.offlined_list)[int(mfns[0])] = None
            return
        # Interleaved order matters only within each list; each list keeps its own order.
        self.broken_list.update(dict.fromkeys(mfns[br].tolist()))
        self.offlined_list.update(dict.fromkeys(mfns[~br].tolist()))

    def chunk_of(self, mfn: int) -> tuple[int, int] | None:
        """The free chunk (head, order) containing ``mfn``, if any: ``reserve_heap_page``
        searches the lists of the frame's zone, orders from 0 up, each in list order, for the
        first chunk that covers it (with misaligned chunks about, that need not be the
        aligned one)."""
        bo = self.ft.buddy_order
        if not self.misaligned:
            for k in range(self.max_order + 1):
                h = mfn & ~((1 << k) - 1)
                if h < self.ft.nframes and bo[h] == k + 1:
                    return h, k
            return None
        z = zone_of(mfn)
        for k in range(self.max_order + 1):
            for h in self.lists.get((z, k), ()):
                if h <= mfn < h + (1 << k):
                    return h, k
        return None

    def chunks(self) -> list[tuple[int, int]]:
        """Every free chunk as (head, order), in address order."""
        heads = np.flatnonzero(self.ft.buddy_order)
        return [(int(h), int(self.ft.buddy_order[h]) - 1) for h in heads]

    def list_order(self) -> list[tuple[int, int, list[int]]]:
        """Every non-empty free list as (zone, order, heads in list order)."""
        return [(z, o, list(lst)) for (z, o), lst in sorted(self.lists.items()) if lst]

    # -- allocation -------------------------------------------------------------------------
    def alloc(self, order: int = 0) -> int:
        """``alloc_heap_pages``: search zones from the highest down and, in each zone, orders
        from ``order`` up; split the chunk, returning its highest-addressed part and putting
        the lower halves back at the head of their lists.  Marks the frames ``inuse`` with a
        zero count and no owner (the caller assigns them)."""
        need = 1 << order
        zp = self.zone_pages
        zones = getattr(self, "_zones_desc", None)
        if zones is None or len(zones) != len(zp):  # zones are only ever added
            zones = self._zones_desc = sorted(zp, reverse=True)
        lists = self.lists
        for z in zones:
            if zp[z] < need:
                continue
            for j in range(order, self.max_order + 1):
                lst = lists.get((z, j))
                if lst:
                    head = next(iter(lst))
                    self._remove(head, j)
                    while j > order:
                        j -= 1
                        self._add(head, j, tail=False)
                        head += 1 << j
                    ft = self.ft
                    if order == 0:  # one frame: Python integers
                        if (int(ft.count_info[head]) & mm.PGC_state) >> mm.PGC_state_shift != _FREE:
                            raise HostCrash(f"Xen would crash: the heap handed out mfn {head:#x}, which "
                                            "is not free (a misaligned buddy merged over frames in use)")
                        ft.count_info[head] = 0  # state inuse, count 0
                        ft.type_info[head] = 0
                        ft.owner1[head] = 0
                        return head
                    st = ft.states(head, need)
                    if not (st == _FREE).all():
                        # alloc_heap_pages: BUG_ON on a frame that is not free
                        raise HostCrash(f"Xen would crash: the heap handed out mfn "
                                        f"{head + int(np.flatnonzero(st != _FREE)[0]):#x}, which "
                                        "is not free (a misaligned buddy merged over frames in use)")
                    sl = slice(head, head + need)
                    ft.count_info[sl] = _U(0)  # state inuse, count 0
                    ft.type_info[sl] = _U(0)
                    ft.owner1[sl] = 0
                    return head
        raise OutOfMemory(order)

    # -- freeing ----------------------------------------------------------------------------
    def free(self, head: int, order: int = 0) -> list[int]:
        """``free_heap_pages``: each frame goes ``inuse``->``free`` or ``offlining``->``offlined``
        (``mark_page_free``, keeping PGC_broken; the M2P entry is invalidated and the owner
        cleared); the chunk merges with free buddies of equal order and goes to the tail of its
        list; if it held offlined frames the merged chunk is re-split around them
        (``reserve_offlined_page``).  Returns the frames that became offlined."""
        if order == 0:
            return self._free_one(head)
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
        offlined = (head + np.flatnonzero(offl)).tolist()
        # Merge with free buddies of the same order.
        while order < self.max_order:
            mask = 1 << order
            buddy = head ^ mask
            if buddy + mask > self.ft.nframes or self.ft.buddy_order[buddy] != order + 1:
                break
            self._remove(buddy, order)
            head = min(head, buddy)
            order += 1
        if offlined:
            self.reserve_offlined(head, order, offlined)
        else:
            self._add(head, order, tail=True)
        return offlined

    def _free_one(self, head: int) -> list[int]:
        """:meth:`free` of one frame, with Python integers (the exchange path frees its
        frames one by one)."""
        ft = self.ft
        mfn = head
        c = int(ft.count_info[head])
        st = (c & mm.PGC_state) >> mm.PGC_state_shift
        if st not in (_INUSE, _OFFLINING):
            raise AssertionError(f"free_heap_pages: mfn {head:#x} is neither inuse nor offlining")
        if st == _INUSE and c & mm.PGC_broken:
            raise AssertionError("free_heap_pages: a broken frame in state inuse")
        offl = st == _OFFLINING
        ft.count_info[head] = (c & mm.PGC_broken) | (mm.PGC_state_offlined if offl else mm.PGC_state_free)
        ft.type_info[head] = 0
        ft.owner1[head] = 0
        ft.m2p_plus1[head] = 0
        order = 0
        bo = ft.buddy_order
        n = ft.nframes
        while order < self.max_order:
            mask = 1 << order
            buddy = head ^ mask
            if buddy + mask > n or bo[buddy] != order + 1:
                break
            self._remove(buddy, order)
            head = min(head, buddy)
            order += 1
        if offl:
            if order:
                self.reserve_offlined(head, order, [mfn])
            else:
                self._list_offlined([mfn])
            return [mfn]
        self._add(head, order, tail=True)
        return []

    def reserve_offlined(self, head: int, order: int, offlined: Iterable[int] | None = None) -> None:
        """``reserve_offlined_page`` on the buddy [head, head+2^order) (not on any list): put
        its free frames back at the tails of the lists, in address order, then append its
        offlined frames to the broken or offlined list.

        The pieces are the maximal aligned sub-buddies (what Xen does since the 2026 fixes,
        and xen-semantics.md 1.8), or with the ``reserve_misaligned`` quirk what Xen 4.17
        does: :func:`split_417`."""
        n = 1 << order
        states = self.ft.states(head, n)
        if getattr(self.quirks, "reserve_misaligned", False):
            pieces = split_417(states == _OFFLINED, head, order)
        else:
            pieces = canonical_chunks(states == _FREE, head, order)
        for h, k in pieces:
            self._add(h, k, tail=True)
        if offlined is None:
            offlined = head + np.flatnonzero(states == _OFFLINED)
        self._list_offlined(np.asarray(list(offlined), dtype=np.int64))

    def rebuild(self, start: int, end: int) -> None:
        """Recompute the free chunks of every MAX_ORDER-aligned window meeting [start, end)
        from the frames' states (after a vectorised change of many frames).  Chunks that are
        unchanged keep their place in the lists; chunks that went away are removed and new
        ones are appended in address order -- what freeing the frames one by one in address
        order gives."""
        w = 1 << self.max_order
        a = (max(start, 0) // w) * w
        end = min(end, self.ft.nframes)
        while a < end:
            b = min(a + w, self.ft.nframes)
            old_heads = np.flatnonzero(self.ft.buddy_order[a:b]) + a
            old = dict(zip(old_heads.tolist(), (self.ft.buddy_order[old_heads] - 1).tolist()))
            free = np.zeros(w, dtype=bool)
            free[:b - a] = self.ft.states(a, b - a) == _FREE
            new = canonical_chunks(free, a, self.max_order)
            keep = {h for h, k in new if old.get(h) == k}
            for h, k in old.items():
                if h not in keep:
                    self._remove(h, k)
            for h, k in new:
                if h not in keep:
                    self._add(h, k, tail=True)
            a += w

    def take_free_range(self, mfns: np.ndarray) -> None:
        """Mark free frames ``offlined`` and withdraw them from the heap (``mark_page_offline``
        + ``reserve_heap_page``/``reserve_offlined_page``), in the order given."""
        mfns = np.asarray(mfns, dtype=np.int64)
        if mfns.size == 0:
            return
        if mfns.size <= self.PER_FRAME_LIMIT:
            for m in mfns.tolist():
                self.ft.set_state(m, _OFFLINED)
                c = self.chunk_of(m)
                if c is None:  # not found in the buddy lists: silently ignored, as in Xen
                    continue
                self._remove(*c)
                self.reserve_offlined(c[0], c[1], [m])
            return
        ci = self.ft.count_info[mfns]
        self.ft.count_info[mfns] = (ci & _KEEP_NOT_STATE) | _U(mm.PGC_state_offlined)
        self.rebuild(int(mfns.min()), int(mfns.max()) + 1)
        self._list_offlined(mfns)

    def return_offlined(self, mfns: np.ndarray) -> None:
        """``online_page`` of offlined frames: off the offlined list, ``inuse``, then
        ``free_heap_pages(pg, 0)`` each, in the order given."""
        mfns = np.asarray(mfns, dtype=np.int64)
        if mfns.size == 0:
            return
        if mfns.size <= self.PER_FRAME_LIMIT:
            for m in mfns.tolist():
                self.offlined_list.pop(m, None)
                self.ft.set_state(m, _INUSE)
                self.free(m, 0)
            return
        pop = self.offlined_list.pop
        for k in mfns.tolist():
            pop(k, None)
        sl = mfns
        self.ft.count_info[sl] = (self.ft.count_info[sl] & _KEEP_NOT_STATE) | _U(mm.PGC_state_free)
        self.ft.type_info[sl] = _U(0)
        self.ft.owner1[sl] = 0
        self.ft.m2p_plus1[sl] = _U(0)
        self.rebuild(int(mfns.min()), int(mfns.max()) + 1)

    # -- persistence ------------------------------------------------------------------------
    def _count_misaligned(self) -> None:
        self.misaligned = sum(1 for (z, o), lst in self.lists.items() if o
                              for h in lst if h & ((1 << o) - 1))

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
            h.lists[(z, o)] = OrderedDict.fromkeys(heads)
            h.free_pages += len(heads) << o
            h.zone_pages[z] = h.zone_pages.get(z, 0) + (len(heads) << o)
        h._count_misaligned()
        h.offlined_list = dict.fromkeys(st["offlined"])
        h.broken_list = dict.fromkeys(st["broken"])
        return h

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The lists as arrays (for the ``.npz``): every free list's heads in list order
        with its (zone, order, length), and the offlined and broken lists."""
        keys = [(z, o) for (z, o), lst in self.lists.items() if lst]
        heads = [np.fromiter(self.lists[k].keys(), dtype=np.int64, count=len(self.lists[k]))
                 for k in keys]
        return {
            "lists_key": np.array([[z, o, len(hd)] for (z, o), hd in zip(keys, heads)],
                                  dtype=np.int64).reshape(-1, 3),
            "lists_heads": np.concatenate(heads) if heads else np.zeros(0, dtype=np.int64),
            "offlined": np.fromiter(self.offlined_list.keys(), dtype=np.int64,
                                    count=len(self.offlined_list)),
            "broken": np.fromiter(self.broken_list.keys(), dtype=np.int64,
                                  count=len(self.broken_list)),
        }

    @classmethod
    def from_arrays(cls, ft: FrameTable, a: dict[str, np.ndarray],
                    max_order: int = MAX_ORDER) -> "Heap":
        h = cls(ft, max_order)
        key, heads = np.asarray(a["lists_key"], dtype=np.int64), np.asarray(a["lists_heads"])
        if key.ndim != 2 or key.shape[1] != 3 or int(key[:, 2].sum()) != heads.size:
            raise ValueError("heap lists inconsistent")
        pos = 0
        for z, o, n in key.tolist():
            h.lists[(z, o)] = OrderedDict.fromkeys(heads[pos:pos + n].tolist())
            h.free_pages += n << o
            h.zone_pages[z] = h.zone_pages.get(z, 0) + (n << o)
            pos += n
        h._count_misaligned()
        h.offlined_list = dict.fromkeys(np.asarray(a["offlined"]).tolist())
        h.broken_list = dict.fromkeys(np.asarray(a["broken"]).tolist())
        return h
