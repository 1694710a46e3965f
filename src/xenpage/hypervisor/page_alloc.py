"""The buddy heap and the page-offline state machine (``xen/common/page_alloc.c``).

Free memory lives in power-of-two chunks on per-(zone, order) free lists.  A frame in state
``offlined`` is never on a free list: offlining a free frame splits it out of its chunk
(``reserve_offlined_page``) and freeing an ``offlining`` frame moves it to the offlined or
broken list instead of the heap (``free_heap_pages`` / ``mark_page_free``).

Free lists are insertion-ordered dicts used as Xen's page lists.  Where a chunk goes is
``page_list_add_scrub``'s rule: a chunk holding frames still to be scrubbed goes to the tail,
a clean one to the head -- so a frame freed by a running domain, a frame onlined again, the
pieces ``reserve_offlined_page`` leaves and the init memory Xen frees once it runs
(``init_done``) are the first handed out again, while a dying domain's memory and frames
given back without an owner (``free_domheap_pages``: scrub) wait at the tails.  Allocation
takes the head of the smallest order in the highest zone (``get_free_buddy``), skipping a
dirty head for an order above 0 once before taking any.  Each dirty chunk keeps the index of
its first dirty frame (``first_dirty``), merged and split as Xen does.

The idle scrubber (``scrub_free_pages``, which cleans a dirty chunk and moves it to the head)
runs whenever the host idles (:meth:`Heap.scrub`, from ``Host.run_guests``: dom0 waiting while
guests run): on the lab's Xen 4.17.7 the frames an exchange gave back with no owner came out
first again in the next batch, seconds later.  It is taken to have finished at boot (every
boot chunk is clean, in address order: what scrubbing a list from its tail gives).  One NUMA node: no DMA zone (``arch_want_default_dmazone`` is false on x86
with one node).
"""

from __future__ import annotations

from collections import OrderedDict
from itertools import repeat
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
        #: free chunks holding frames still to be scrubbed: head -> ``first_dirty``
        self.dirty: dict[int, int] = {}

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

    def _add_scrub(self, head: int, order: int, first_dirty: int | None) -> None:
        """``page_list_add_scrub``: a chunk with frames to scrub (``first_dirty`` not None)
        goes to the tail of its list, a clean one to the head."""
        if first_dirty is None:
            self._add(head, order, tail=False)
        else:
            self._add(head, order, tail=True)
            self.dirty[head] = first_dirty

    def _remove(self, head: int, order: int) -> None:
        z = zone_of(head)
        del self.lists[(z, order)][head]
        self.dirty.pop(head, None)
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
        # (no temporary dict: a million frames offlined at once make one dict, not two)
        for name, sel in (("broken_list", br), ("offlined_list", ~br)):
            keys = mfns[sel].tolist()
            if not getattr(self, name):
                setattr(self, name, dict.fromkeys(keys))
            else:
                getattr(self, name).update(zip(keys, repeat(None)))

    def scrub(self) -> int:
        """``scrub_free_pages`` run to the end by idle pCPUs: each list's dirty chunks (at its
        tail) are taken from the last, scrubbed and put back at the head -- so they end at the
        head, clean, in their order.  Returns the chunks scrubbed."""
        if not self.dirty:
            return 0
        n = 0
        for lst in self.lists.values():
            dirty = [h for h in lst if h in self.dirty]
            for h in reversed(dirty):
                lst.move_to_end(h, last=False)
            n += len(dirty)
        self.dirty.clear()
        return n

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
    def alloc(self, order: int = 0, zone_hi: int | None = None) -> int:
        """``alloc_heap_pages`` (``get_free_buddy``): zones from ``zone_hi`` (default: the
        highest) down and, in each zone, orders from ``order`` up, taking the head of the
        first non-empty list -- for an order above 0 a dirty head is put back at the tail and
        the next order tried, and only when no clean chunk was found is a dirty one taken
        (the second pass, ``MEMF_no_scrub``).  The chunk is split, its highest-addressed part
        returned and the lower halves put back by ``page_list_add_scrub`` (clean: at the
        head).  Marks the frames ``inuse`` with a zero count and no owner (the caller assigns
        them).  ``zone_hi``: the highest zone allowed (``bits_to_zone`` of the address bits
        a caller such as ``XENMEM_exchange`` asked for)."""
        zones = sorted((z for z, n in self.zone_pages.items()
                        if n >= 1 << order and (zone_hi is None or z <= zone_hi)), reverse=True)
        found = None
        for use_unscrubbed in (False, True):
            for z in zones:
                for j in range(order, self.max_order + 1):
                    lst = self.lists.get((z, j))
                    if not lst:
                        continue
                    head = next(iter(lst))
                    if head not in self.dirty or order == 0 or use_unscrubbed:
                        found = (head, j)
                        break
                    lst.move_to_end(head, last=True)
                if found:
                    break
            if found:
                break
        if found is None:
            raise OutOfMemory(order)
        head = self._take_split(*found, order)
        n = 1 << order
        st = self.ft.states(head, n)
        if not (st == _FREE).all():
            # alloc_heap_pages: BUG_ON on a frame that is not free
            raise HostCrash(f"Xen would crash: the heap handed out mfn "
                            f"{head + int(np.flatnonzero(st != _FREE)[0]):#x}, which "
                            "is not free (a misaligned buddy merged over frames in use)")
        sl = slice(head, head + n)
        self.ft.count_info[sl] = _U(0)  # state inuse, count 0
        self.ft.type_info[sl] = _U(0)
        self.ft.owner1[sl] = 0
        return head

    def _take_split(self, head: int, j: int, order: int) -> int:
        """The chunk of order ``j`` at ``head`` off its free list, split down to ``order`` as
        ``alloc_heap_pages`` does: the lower half of each split goes back to the free lists
        (with its share of the first-dirty mark), the upper half is split on; the frame
        handed out is the highest chunk's head."""
        fd = self.dirty.get(head)
        self._remove(head, j)
        while j > order:
            j -= 1
            half = 1 << j
            self._add_scrub(head, j, fd if fd is not None and half > fd else None)
            head += half
            if fd is not None:
                fd = fd - half if fd >= half else 0
        return head

    def alloc_frames(self, k: int, zone_hi: int | None = None) -> list[int]:
        """``k`` calls of :meth:`alloc` for order 0 (and ``zone_hi``), one after another -- the same frames in
        the same order, the lists, counters and frames left the same, a :class:`HostCrash`
        on the same frame -- with what each call redid done once: the zones that have free
        frames are listed again only when one runs out (or a split put a piece in another
        zone), a whole aligned chunk that the next allocations would split piece by piece
        is handed out at once (its frames from the highest down, as the splits give them),
        and the handed-out frames are marked ``inuse`` (zero count, no owner) together at
        the end.  For order 0 every head is
        taken as it is (dirty or not: ``get_free_buddy`` skips a dirty head only above order
        0).  Fewer than ``k`` frames: the heap ran out there (:meth:`alloc` would raise
        :class:`OutOfMemory` on the next call)."""
        got: list[int] = []
        lists, dirty, bo, ci = self.lists, self.dirty, self.ft.buddy_order, self.ft.count_info
        top = self.max_order + 1
        free_bits = _FREE << mm.PGC_state_shift
        state_mask = int(_STATE_MASK)
        zones: list[int] | None = None
        try:
            while len(got) < k:
                if zones is None:
                    zones = sorted((z for z, n in self.zone_pages.items()
                                    if n >= 1 and (zone_hi is None or z <= zone_hi)), reverse=True)
                head = j = -1
                for z in zones:
                    for j in range(top):
                        lst = lists.get((z, j))
                        if lst:
                            head = next(iter(lst))
                            break
                    if head >= 0:
                        break
                if head < 0:
                    break  # alloc: OutOfMemory
                z = zone_of(head)
                if j == 0:  # _remove of an order-0 chunk, inline
                    del lists[(z, 0)][head]
                    dirty.pop(head, None)
                    bo[head] = 0
                    self.free_pages -= 1
                    self.zone_pages[z] -= 1
                elif k - len(got) >= 1 << j and not head & ((1 << j) - 1) \
                        and (self.ft.states(head, 1 << j) == _FREE).all():
                    # a whole aligned chunk: j was the smallest order with a chunk in the
                    # highest zone, so the pieces each split puts back are that zone's only
                    # chunks below order j, and the next allocations take them one after
                    # another -- every frame, from the highest down; each piece added is
                    # removed again (clean or dirty, it was alone on its list)
                    self._remove(head, j)
                    got.extend(range(head + (1 << j) - 1, head - 1, -1))
                    if self.zone_pages[z] == 0:
                        zones = None
                    continue
                else:
                    head = self._take_split(head, j, 0)
                    if zone_of(head) != z:  # a piece went to another zone: list them again
                        zones = None
                if self.zone_pages[z] == 0:
                    zones = None
                if int(ci[head]) & state_mask != free_bits:
                    raise HostCrash(f"Xen would crash: the heap handed out mfn {head:#x}, which "
                                    "is not free (a misaligned buddy merged over frames in use)")
                got.append(head)
        finally:
            if got:
                idx = np.array(got, dtype=np.int64)
                ci[idx] = _U(0)  # state inuse, count 0
                self.ft.type_info[idx] = _U(0)
                self.ft.owner1[idx] = 0
        return got

    # -- freeing ----------------------------------------------------------------------------
    def free(self, head: int, order: int = 0, scrub: bool = False) -> list[int]:
        """``free_heap_pages``: each frame goes ``inuse``->``free`` or ``offlining``->``offlined``
        (``mark_page_free``, keeping PGC_broken; the M2P entry is invalidated and the owner
        cleared); the chunk merges with free buddies of equal order (carrying their
        ``first_dirty``) and goes back by ``page_list_add_scrub`` -- ``scrub`` (a dying
        domain's frame, or one with no owner) to the tail, else to the head; if it held
        offlined frames the merged chunk is re-split around them (``reserve_offlined_page``).
        Returns the frames that became offlined."""
        if order == 0:
            return self._free_one(head, scrub)
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
        return self._merge_and_add(head, order, 0 if scrub else None, offlined)

    def _merge_and_add(self, head: int, order: int, fd: int | None, offlined: list[int]) -> list[int]:
        """The merging loop of ``free_heap_pages`` (with its ``first_dirty`` updates), then
        ``page_list_add_scrub`` and, if the chunk holds offlined frames,
        ``reserve_offlined_page``."""
        bo = self.ft.buddy_order
        n = self.ft.nframes
        while order < self.max_order:
            mask = 1 << order
            buddy = head ^ mask
            if buddy + mask > n or bo[buddy] != order + 1:
                break
            bfd = self.dirty.get(buddy)
            self._remove(buddy, order)
            if buddy < head:  # the predecessor takes over as the head
                if bfd is None and fd is not None:
                    bfd = mask + fd
                fd = bfd
                head = buddy
            elif fd is None and bfd is not None:
                fd = mask + bfd
            order += 1
        if offlined:
            self.reserve_offlined(head, order, offlined, first_dirty=fd)
        else:
            self._add_scrub(head, order, fd)
        return offlined

    def _free_one(self, head: int, scrub: bool = False) -> list[int]:
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
        return self._merge_and_add(head, 0, 0 if scrub else None, [mfn] if offl else [])

    def reserve_offlined(self, head: int, order: int, offlined: Iterable[int] | None = None,
                         first_dirty: int | None = None) -> None:
        """``reserve_offlined_page`` on the buddy [head, head+2^order) (not on any list): put
        its free frames back as pieces, in address order, each by ``page_list_add_scrub``
        (clean: at the head; a piece at or past the buddy's ``first_dirty``, which Xen walks
        along with the pieces, at the tail), then append its offlined frames to the broken
        or offlined list.

        The pieces are the maximal aligned sub-buddies (what Xen does since the 2026 fixes,
        and xen-semantics.md 1.8), or with the ``reserve_misaligned`` quirk what Xen 4.17
        does: :func:`split_417`."""
        n = 1 << order
        states = self.ft.states(head, n)
        offl = states == _OFFLINED
        if getattr(self.quirks, "reserve_misaligned", False):
            pieces = split_417(offl, head, order)
        else:
            pieces = canonical_chunks(states == _FREE, head, order)
        fd = first_dirty
        cur = head
        for h, k in pieces:
            if fd is not None and fd and h > cur:  # offlined frames passed over
                fd = max(fd - int(offl[cur - head:h - head].sum()), 0)
            size = 1 << k
            self._add_scrub(h, k, fd if fd is not None and size > fd else None)
            if fd is not None:
                fd = fd - size if fd >= size else 0
            cur = h + size
        if offlined is None:
            offlined = head + np.flatnonzero(offl)
        self._list_offlined(np.asarray(list(offlined), dtype=np.int64))

    def rebuild(self, start: int, end: int) -> None:
        """Recompute the free chunks of every MAX_ORDER-aligned window meeting [start, end)
        from the frames' states (after a vectorised change of many frames).  Chunks that are
        unchanged keep their place in the lists; chunks that went away are removed and new
        ones are appended in address order -- what freeing the frames one by one in address
        order with a scrub gives (a dying domain's memory; the scrubber is taken to have
        cleaned them where they lie).  Beyond :attr:`PER_FRAME_LIMIT` frames, offlining free
        frames and onlining offlined ones use it too: the same chunks, not Xen's list order."""
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
                fd = self.dirty.get(c[0])
                self._remove(*c)
                self.reserve_offlined(c[0], c[1], [m], first_dirty=fd)
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
            "dirty": [[h, fd] for h, fd in self.dirty.items()],
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
        h.dirty = {int(a): int(b) for a, b in st.get("dirty", [])}
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
            "dirty": np.array(list(self.dirty.items()), dtype=np.int64).reshape(-1, 2),
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
        if "dirty" in a:
            h.dirty = {int(x): int(y) for x, y in np.asarray(a["dirty"]).reshape(-1, 2).tolist()}
        return h
