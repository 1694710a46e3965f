"""The buddy heap under random sequences of allocations, frees, offlines, onlines, machine
checks and domain destruction, checked after every step against a reference model of the
frame states (xen-semantics.md 1.2, 1.5-1.8) and against the buddy invariants:

* chunks are aligned, disjoint, inside the frame table, and hold only free frames;
* every free frame is in a chunk and ``free_pages`` equals the number of free frames;
* chunks are maximal (canonical buddy merging: no chunk's parent block is entirely free);
* every list entry is a chunk head of that list's zone and order, listed once;
* offlined frames are on exactly the right list (broken or offlined), with the documented
  quirk that an offlined frame later marked broken by a machine check stays on the offlined
  list;
* the allocator never hands out a frame that is not free (retired frames in particular).

The model is written from the spec, not from the implementation: it tracks each frame's
state, broken bit, owner and which list it must be on.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from xenpage.abi import mm
from xenpage.abi.xen import DOMID_IO
from xenpage.hypervisor import sysctl
from xenpage.hypervisor.host import Host, HostConfig
from xenpage.hypervisor.quirks import HostCrash, HostHang, Quirks


def FIXED_SPLIT() -> Quirks:
    """The heap of xen-semantics.md 1.8 (maximal aligned pieces), which these tests check
    frame by frame; Xen 4.17's misaligned split: tests/test_split_guard.py."""
    return Quirks(reserve_misaligned=False)
from xenpage.hypervisor.page_alloc import MAX_ORDER, OutOfMemory, zone_of

INUSE, OFFLINING, OFFLINED, FREE = mm.STATE_INUSE, mm.STATE_OFFLINING, mm.STATE_OFFLINED, mm.STATE_FREE
UNTOUCHED = 0x01010101


def check_heap(host: Host) -> None:
    """The buddy invariants, computed independently of the heap's own helpers."""
    ft, heap, n = host.ft, host.heap, host.nframes
    state = ((ft.count_info.copy() & np.uint64(mm.PGC_state)) >> np.uint64(mm.PGC_state_shift)).astype(np.int8)
    free = state == FREE
    heads = np.flatnonzero(ft.buddy_order)
    orders = ft.buddy_order[heads].astype(np.int64) - 1
    covered = np.zeros(n, dtype=np.int32)
    for h, k in zip(heads.tolist(), orders.tolist()):
        size = 1 << k
        assert 0 <= k <= MAX_ORDER
        assert h % size == 0, f"chunk {h:#x} order {k} misaligned"
        assert h + size <= n, f"chunk {h:#x} order {k} beyond the frame table"
        assert free[h:h + size].all(), f"chunk {h:#x} order {k} holds a frame that is not free"
        covered[h:h + size] += 1
        if k < MAX_ORDER:
            p = h & ~((2 << k) - 1)
            if p + (2 << k) <= n and p > 0:
                assert not free[p:p + (2 << k)].all(), \
                    f"chunk {h:#x} order {k} not merged with its free buddy"
    assert (covered <= 1).all(), "chunks overlap"
    assert ((covered == 1) == free).all(), "a free frame is in no chunk"
    nfree = int(free.sum())
    assert heap.free_pages == nfree == int((1 << orders).sum())
    # The lists hold exactly the chunk heads, each once, under its zone and order.
    listed = []
    for (z, o), lst in heap.lists.items():
        for h in lst:
            assert ft.buddy_order[h] == o + 1 and zone_of(h) == z, (h, z, o)
            listed.append(h)
    assert sorted(listed) == heads.tolist()


class Model:
    """What the spec says each frame's state, broken bit, owner and list are."""

    def __init__(self, host: Host):
        ft = host.ft
        self.state = ft.states(0, host.nframes).astype(np.int8).copy()
        self.broken = (ft.count_info.copy() & np.uint64(mm.PGC_broken)) != 0
        self.owner = ft.owner1.astype(np.int64) - 1
        self.xenheap = (ft.count_info.copy() & np.uint64(mm.PGC_xen_heap)) != 0
        self.count = (ft.count_info.copy() & np.uint64(mm.PGC_count_mask)).astype(np.int64)
        self.lists: dict[int, str] = {}
        valid = host.e820.valid_window(0, host.nframes)
        ram = host.e820.ram_window(0, host.nframes)
        xs, xe = host.xen_image
        self.offlinable = valid & ram
        self.offlinable[xs:xe] = False
        self.xen_image = (xs, xe)

    def offline_word(self, m: int, broken: bool) -> tuple[int, int]:
        """(rc, status) the spec gives for offline_page(m, broken) -- and update the model."""
        xs, xe = self.xen_image
        if xs <= m < xe:
            return -1, 0x7FF20108
        if not self.offlinable[m]:
            return -22, 0x808
        if self.broken[m] and self.owner[m] >= 0:
            return 0, 0x10
        bbit = 0x2000 if broken else 0
        s = self.state[m]
        if broken:
            self.broken[m] = True
        if s in (FREE, OFFLINED):
            if s == FREE:
                self.state[m] = OFFLINED
                self.lists[m] = "broken" if self.broken[m] else "offlined"
            # already offlined: stays on its list (the QUIRK when it now becomes broken)
            return 0, 0x2 | bbit
        self.state[m] = OFFLINING
        if self.owner[m] >= 0 and self.count[m] > 0:
            return 0, 0x1004 | (self.owner[m] << 16) | bbit
        if self.xenheap[m]:
            return 0, 0x7FF20104 | bbit
        return 0, 0x7FF40408 | bbit

    def online_word(self, m: int) -> tuple[int, int]:
        if self.broken[m]:
            return -22, 0x2008
        s = self.state[m]
        if s == OFFLINED:
            del self.lists[m]
            self.state[m] = FREE
            return 0, 0x2
        if s == OFFLINING:
            self.state[m] = INUSE
            return 0, 0x2
        return 0, 0x0

    def freed(self, frames) -> None:
        for m in frames:
            if self.state[m] == OFFLINING:
                self.state[m] = OFFLINED
                self.lists[m] = "broken" if self.broken[m] else "offlined"
            else:
                assert self.state[m] == INUSE and not self.broken[m]
                self.state[m] = FREE
            self.owner[m] = -1
            self.count[m] = 0
            self.xenheap[m] = False

    def allocated(self, head: int, order: int, owner: int = -1) -> None:
        sl = slice(head, head + (1 << order))
        assert (self.state[sl] == FREE).all(), "allocator handed out a frame that is not free"
        self.state[sl] = INUSE
        self.owner[sl] = owner
        self.count[sl] = 1 if owner >= 0 else 0

    def has_free_block(self, order: int) -> bool:
        size = 1 << order
        f = self.state == FREE
        n = (f.size // size) * size
        return bool(f[:n].reshape(-1, size).all(axis=1).any())


class HeapMachine(RuleBasedStateMachine):
    """Random alloc/free/offline/online/machine-check/destroy sequences on a 64 MiB host."""

    @initialize()
    def boot(self):
        self.host = Host.boot(HostConfig(mem_bytes=64 << 20, nr_pcpus=2, quirks=FIXED_SPLIT()), dom0_pages=2048)
        self.t = self._new_domain()
        self.model = Model(self.host)
        self.allocs: list[tuple[int, int, str]] = []  # (head, order, "anon"|"dom")

    def _new_domain(self):
        return self.host.create_domain("t", 0, max_pages=4096)

    # -- choosing frames -------------------------------------------------------------------
    def _pick(self, data) -> int:
        m = self.model
        cats = {
            "free": np.flatnonzero(m.state == FREE),
            "inuse": np.flatnonzero(m.state == INUSE),
            "offlining": np.flatnonzero(m.state == OFFLINING),
            "offlined": np.flatnonzero(m.state == OFFLINED),
            "ours": np.array([h + i for h, k, _ in self.allocs for i in range(1 << k)], dtype=np.int64),
            "special": np.array([0, 0x9F, 0xA0, self.host.xen_image[0], self.host.xen_init[0],
                                 self.host.xenheap_internal[0], self.host.anonymous[-1]]),
        }
        names = [k for k, v in cats.items() if v.size]
        c = cats[data.draw(st.sampled_from(names), label="category")]
        return int(c[data.draw(st.integers(0, c.size - 1), label="index")])

    # -- operations --------------------------------------------------------------------------
    @rule(order=st.integers(0, 3))
    def alloc_anonymous(self, order):
        try:
            head = self.host.heap.alloc(order)
        except OutOfMemory:
            assert not self.model.has_free_block(order)
            return
        assert head % (1 << order) == 0
        self.model.allocated(head, order)
        self.allocs.append((head, order, "anon"))

    @rule(order=st.integers(0, 2))
    def alloc_to_domain(self, order):
        try:
            head = self.host.alloc_domheap_pages(self.t, order)
        except OutOfMemory:
            assert not self.model.has_free_block(order)
            return
        self.model.allocated(head, order, owner=self.t.domid)
        self.allocs.append((head, order, "dom"))

    @precondition(lambda self: self.allocs)
    @rule(data=st.data())
    def free(self, data):
        i = data.draw(st.integers(0, len(self.allocs) - 1), label="alloc")
        head, order, kind = self.allocs.pop(i)
        frames = list(range(head, head + (1 << order)))
        expect_off = [f for f in frames if self.model.state[f] == OFFLINING]
        if kind == "anon":
            got = self.host.heap.free(head, order)
        else:
            got = []
            for f in frames:  # each frame loses its allocation reference
                got += self.host.put_page(f)
        assert sorted(got) == expect_off
        self.model.freed(frames)

    @rule(data=st.data())
    def offline(self, data):
        m = self._pick(data)
        expect = self.model.offline_word(m, broken=False)
        rc, status = sysctl.page_offline_op(self.host, 0, 1, m, m, pcpu=1)
        assert (rc, int(status[0])) == expect, hex(m)

    @rule(data=st.data())
    def machine_check(self, data):
        m = self._pick(data)
        expect = self.model.offline_word(m, broken=True)
        assert sysctl.machine_check_offline(self.host, m) == expect, hex(m)

    @rule(data=st.data())
    def online(self, data):
        m = self._pick(data)
        expect = self.model.online_word(m)
        rc, status = sysctl.page_offline_op(self.host, 0, 2, m, m)
        assert (rc, int(status[0])) == expect, hex(m)

    @rule()
    def destroy_and_recreate_domain(self):
        t = self.t.domid
        frames = np.flatnonzero(self.model.owner == t).tolist()
        self.host.destroy_domain(t)
        self.model.freed(frames)
        self.allocs = [a for a in self.allocs if a[2] != "dom"]
        self.t = self._new_domain()
        si = self.t.xenheap_pages[0]
        # its shared_info: a Xen-heap frame taken from the heap and shared with it
        self.model.allocated(si, 0, owner=self.t.domid)
        self.model.xenheap[si] = True

    # -- invariants --------------------------------------------------------------------------
    @invariant()
    def frames_match_the_model(self):
        if not hasattr(self, "host"):
            return
        ft, m = self.host.ft, self.model
        st_now = ft.states(0, self.host.nframes)
        bad = np.flatnonzero(st_now != m.state)
        assert bad.size == 0, f"mfn {int(bad[0]):#x} state {st_now[bad[0]]}, model {m.state[bad[0]]}"
        assert np.array_equal((ft.count_info.copy() & np.uint64(mm.PGC_broken)) != 0, m.broken)
        assert np.array_equal(ft.owner1.astype(np.int64) - 1, m.owner)

    @invariant()
    def offlined_frames_on_the_right_list(self):
        if not hasattr(self, "host"):
            return
        heap = self.host.heap
        want_off = {f for f, w in self.model.lists.items() if w == "offlined"}
        want_brk = {f for f, w in self.model.lists.items() if w == "broken"}
        assert set(heap.offlined_list) == want_off
        assert set(heap.broken_list) == want_brk
        assert all(self.model.broken[f] for f in want_brk)

    @invariant()
    def buddy_heap_is_canonical(self):
        if hasattr(self, "host"):
            check_heap(self.host)


TestHeapMachine = HeapMachine.TestCase
TestHeapMachine.settings = settings(TestHeapMachine.settings, stateful_step_count=30,
                                    deadline=None,
                                    suppress_health_check=[HealthCheck.too_slow])


# -- vectorised ranges give what frame-by-frame calls give ----------------------------------------

def _prepare(host: Host, seed: int) -> None:
    """Scatter states over the host: some frames offlined, some allocated and pending,
    some broken."""
    rng = np.random.default_rng(seed)
    t = host.create_domain("t", 0, max_pages=4096)
    for _ in range(40):
        host.alloc_domheap_pages(t, int(rng.integers(0, 3)))
    free = np.flatnonzero(host.ft.states(0, host.nframes) == FREE)
    for m in rng.choice(free, 30, replace=False).tolist():
        sysctl.page_offline_op(host, 0, 1, m, m, pcpu=1)
    owned = host.owned_frames(t.domid)
    for m in rng.choice(owned, 10, replace=False).tolist():
        sysctl.page_offline_op(host, 0, 1, m, m, pcpu=1)
    for m in rng.choice(np.concatenate([free, owned]), 8, replace=False).tolist():
        sysctl.machine_check_offline(host, m)


@settings(deadline=None)
@given(seed=st.integers(0, 2**16), cmd=st.sampled_from([1, 2, 3]),
       start_frac=st.floats(0, 1), length=st.integers(1, 300))
def test_range_equals_frame_by_frame(seed, cmd, start_frac, length):
    base = Host.boot(HostConfig(mem_bytes=64 << 20, nr_pcpus=2, quirks=FIXED_SPLIT()), dom0_pages=2048)
    _prepare(base, seed)
    start = int(start_frac * (base.nframes - 1))
    end = min(start + length - 1, base.nframes + 4)
    vec, seq = base, copy.deepcopy(base)
    rc, st_vec = sysctl.page_offline_op(vec, 0, cmd, start, end, pcpu=1)
    words, rc_seq = [], 0
    for m in range(start, end + 1):
        r, w = sysctl.page_offline_op(seq, 0, cmd, m, m, pcpu=1)
        words.append(int(w[0]))
        if r:
            rc_seq = r
            break
    words += [UNTOUCHED] * (end - start + 1 - len(words))
    assert rc == rc_seq
    assert st_vec.tolist() == words
    for f in vec.ft.FIELDS:
        assert np.array_equal(getattr(vec.ft, f), getattr(seq.ft, f)), f
    assert vec.heap.chunks() == seq.heap.chunks()
    assert set(vec.heap.offlined_list) == set(seq.heap.offlined_list)
    assert set(vec.heap.broken_list) == set(seq.heap.broken_list)
    check_heap(vec)


# -- list order: what Xen's FIFO page lists do ------------------------------------------------------

def test_free_list_order_follows_xen(small_host):
    h = small_host()
    heap = h.heap
    # allocation takes the head of the smallest non-empty list of the highest zone; a split
    # puts the lower halves at the head of their lists and hands out the highest frame
    def smallest():
        z = max(k[0] for k, v in heap.lists.items() if v)
        return z, min(k[1] for k, v in heap.lists.items() if v and k[0] == z)
    xs, xe = h.xen_image
    # use up the small chunks of the highest zone (first those of Xen's freed init region,
    # at the heads: it was freed last, unscrubbed)
    while smallest()[1] < 3 or xs <= next(iter(heap.lists[smallest()])) < xe:
        heap.alloc(0)
    z, j = z_o = smallest()
    head = next(iter(heap.lists[z_o]))
    got = heap.alloc(0)
    assert got == head + (1 << j) - 1
    for i in range(j):
        piece = head + (1 << j) - (2 << i)
        assert next(iter(heap.lists[(zone_of(piece), i)])) == piece
    # freeing merges it back; a running domain's frame is not scrubbed, so the merged chunk
    # goes to the head (page_list_add_scrub) and is the next one handed out
    heap.free(got, 0)
    assert next(iter(heap.lists[z_o])) == head and head not in heap.dirty
    # one to be scrubbed (a dying domain's, or one with no owner) goes to the tail
    got = heap.alloc(0)
    assert got == head + (1 << j) - 1
    heap.free(got, 0, scrub=True)
    assert list(heap.lists[z_o])[-1] == head and heap.dirty[head] == (1 << j) - 1
    # ... and an allocation above order 0 passes over a dirty head once before taking it
    heap.free(heap.alloc(0), 0)
    # an offlined frame onlined again merges back the same way (free_heap_pages, no scrub)
    m = head + 5
    sysctl.page_offline_op(h, 0, 1, m, m)
    assert m in heap.offlined_list
    sysctl.page_offline_op(h, 0, 2, m, m)
    assert m not in heap.offlined_list and head in heap.lists[z_o]
    check_heap(h)


def test_big_range_keeps_untouched_chunks_in_place(small_host):
    h = small_host()
    free = np.flatnonzero(h.ft.states(0, h.nframes) == FREE)
    xs, xe = h.xen_image
    free = free[(free < xs) | (free >= xe)]
    # the 200 lowest free frames: more than Heap.PER_FRAME_LIMIT, so the vectorised path
    lo, hi = int(free[0]), int(free[199])
    before = h.heap.list_order()
    untouched = {hd for z, o, heads in before for hd in heads if hd + (1 << o) <= lo or hd > hi}
    rc, status = sysctl.page_offline_op(h, 0, 1, lo, hi)
    assert rc == 0
    after = h.heap.list_order()
    for z, o, heads in before:
        still = [x for x in heads if x in untouched]
        now = next((hs for zz, oo, hs in after if (zz, oo) == (z, o)), [])
        assert [x for x in now if x in untouched] == still
    rc, status = sysctl.page_offline_op(h, 0, 2, lo, hi)
    assert rc == 0
    check_heap(h)
    assert sorted(h.heap.chunks()) == sorted((hd, o) for z, o, hs in before for hd in hs)


@pytest.mark.parametrize("mem_mib", [64, 128])
def test_boot_heap_is_canonical(small_host, mem_mib):
    h = small_host(mem_mib=mem_mib, dom0_pages=4096)
    check_heap(h)
    assert h.heap.free_pages > 0 and not h.heap.offlined_list and not h.heap.broken_list
    assert all(h.ft.owner(m) == DOMID_IO for m in range(0x100))


# -- many order-0 allocations at once: the same as one call after another ----------------------

def _heap_state(h: Host):
    ft, heap = h.ft, h.heap
    return ([a.copy() for a in (ft.count_info, ft.type_info, ft.owner1, ft.m2p_plus1, ft.buddy_order)],
            heap.list_order(), dict(heap.dirty), heap.free_pages,
            {z: n for z, n in heap.zone_pages.items() if n}, heap.misaligned,
            list(heap.offlined_list), list(heap.broken_list))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(st.tuples(st.sampled_from(["alloc", "free", "free_scrub", "offline", "online", "scrub"]),
                              st.integers(0, 5), st.integers(0, 1 << 20)), max_size=40),
       k=st.one_of(st.integers(1, 600), st.just(20000)), misaligned=st.booleans(),
       zone_hi=st.one_of(st.none(), st.integers(1, 15)))
def test_alloc_frames_is_alloc_one_after_another(ops, k, misaligned, zone_hi):
    """:meth:`Heap.alloc_frames` (the batched exchange's allocations) hands out the frames k
    calls of ``alloc(0)`` hand out, in their order, and leaves the free lists (their order
    and dirty chunks), the counters and every frame as they leave them -- on heaps made by
    random allocations, frees to the head and to the tail, offlines (with Xen 4.17's
    misaligned re-split or without), onlines and scrubs, with or without a highest zone (the
    exchange's address bits); running out (fewer frames) and a
    crash on a frame that is not free come at the same frame."""
    h = Host.boot(HostConfig(mem_bytes=64 << 20, nr_pcpus=2,
                             quirks=Quirks() if misaligned else FIXED_SPLIT()), dom0_pages=2048)
    heap = h.heap
    allocs: list[tuple[int, int]] = []
    for op, order, pick in ops:
        try:
            if op == "alloc":
                allocs.append((heap.alloc(order % 4), order % 4))
            elif op in ("free", "free_scrub") and allocs:
                head, o = allocs.pop(pick % len(allocs))
                heap.free(head, o, scrub=op == "free_scrub")
            elif op == "offline":
                m = pick % h.nframes
                sysctl.page_offline_op(h, 0, 1, m, m)
            elif op == "online":
                m = pick % h.nframes
                sysctl.page_offline_op(h, 0, 2, m, m)
            elif op == "scrub":
                heap.scrub()
        except (OutOfMemory, HostCrash, HostHang):
            return  # a heap Xen would not have gone on with
    a, b = copy.deepcopy(h), copy.deepcopy(h)
    one: list[int] = []
    err_a = None
    try:
        for _ in range(k):
            one.append(a.heap.alloc(0, zone_hi=zone_hi))
    except OutOfMemory:
        pass
    except HostCrash as e:
        err_a = str(e)
    err_b = None
    try:
        many = b.heap.alloc_frames(k, zone_hi)
    except HostCrash as e:
        err_b, many = str(e), None
    assert err_a == err_b
    if err_a is None:
        assert many == one
    sa, sb = _heap_state(a), _heap_state(b)
    for x, y in zip(sa[0], sb[0]):
        np.testing.assert_array_equal(x, y)
    assert sa[1:] == sb[1:]
