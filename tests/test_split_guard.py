"""Xen 4.17's misaligned re-split of a free buddy around an offlined frame
(``reserve_offlined_page``; quirk ``reserve_misaligned``) and xenpage's guard against it
(toolstack/split_guard.py).

The split itself is checked against the layouts in the upstream fixes' own descriptions;
then: a raw offline (what xen-hptool issues) of a free frame inside a large buddy leaves
chunks not aligned to their order, while ``xenpage mem-offline`` of the same frames -- free
frames, runs, and a PV guest's frame whose buddy is free when the exchange frees it -- leaves
every chunk aligned, answers as stock does, and gives its guard frames back."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpage.abi import mm
from xenpage.abi import sysctl as S
from xenpage.hypervisor import invariants
from xenpage.hypervisor.page_alloc import canonical_chunks, split_417
from simworld import small_host
from xenpage.toolstack.offline import mem_offline
from xenpage.toolstack.split_guard import guard_frames


def _mask(n, offl):
    m = np.zeros(n, dtype=bool)
    m[list(offl)] = True
    return m


def test_split_417_matches_upstreams_description():
    # 5cb7ff13ee: an order-2 buddy with its page 1 offlined comes back as three single pages
    assert split_417(_mask(4, [1]), 0, 2) == [(0, 0), (2, 0), (3, 0)]
    # 71c6a62317: pieces grow from an unaligned start -- an order-2 piece at frame 2
    assert split_417(_mask(8, [1]), 0, 3) == [(0, 0), (2, 2), (6, 0), (7, 0)]
    # the last frame offlined: every piece grows from the aligned head and stays aligned
    assert split_417(_mask(8, [7]), 0, 3) == [(0, 2), (4, 1), (6, 0)]
    # the fixed split is the maximal aligned sub-buddies
    assert canonical_chunks(~_mask(8, [1]), 0, 3) == [(0, 0), (2, 1), (4, 2)]


@given(st.integers(1, 10), st.data())
def test_split_417_covers_exactly_the_free_frames(order, data):
    n = 1 << order
    offl = data.draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=4))
    pieces = split_417(_mask(n, offl), 0, order)
    cover = np.zeros(n, dtype=int)
    for h, k in pieces:
        cover[h:h + (1 << k)] += 1
    assert (cover == (~_mask(n, offl)).astype(int)).all()


def _host(quirk=True):
    host, hv = small_host()
    host.quirks.reserve_misaligned = quirk
    return host, hv


def _big_chunk(host, order=8):
    return next((h, k) for h, k in host.heap.chunks() if k >= order)


def test_raw_offline_of_a_free_frame_misaligns_the_heap():
    """What stock xen-hptool does on 4.17: the pieces after the frame are misaligned."""
    host, hv = _host()
    hv.set_vcpu_affinity(0, 0, [1])
    h, k = _big_chunk(host)
    rc, st_ = hv.page_offline_op(S.sysctl_page_offline, h + 1, h + 1)
    assert rc == 0 and int(st_[0]) == S.PG_OFFLINE_OFFLINED
    assert host.heap.misaligned > 0
    assert any("misaligned" in p for p in invariants.check(host))
    # the same offline on a fixed Xen keeps the heap sound
    host, hv = _host(quirk=False)
    hv.set_vcpu_affinity(0, 0, [1])
    hv.page_offline_op(S.sysctl_page_offline, h + 1, h + 1)
    assert host.heap.misaligned == 0 and invariants.check(host) == []


def test_mem_offline_of_free_frames_keeps_every_chunk_aligned():
    host, hv = _host()
    h, k = _big_chunk(host)
    targets = [h + 1, h + 5, h + 9, h + 10, h + 11, h + 100]
    stock = _host(quirk=False)
    stock[1].set_vcpu_affinity(0, 0, [1])
    want = [int(stock[1].page_offline_op(S.sysctl_page_offline, m, m)[1][0]) for m in targets]
    r = mem_offline(hv, targets)
    assert [o.status for o in r.outcomes] == want == [S.PG_OFFLINE_OFFLINED] * len(targets)
    assert r.report.exit_code == 0
    assert host.heap.misaligned == 0 and invariants.check(host) == []
    # exactly the targets are offlined: every guard frame went back to the heap
    assert sorted(host.heap.offlined_list) == sorted(targets)
    g = r.timings["split_guard"]
    assert g["guard_frames_probed"] > 0
    # and the free memory is what offlining just the targets leaves
    assert host.heap.free_pages == stock[0].heap.free_pages


def test_a_range_is_offlined_from_the_top():
    host, hv = _host()
    h, k = _big_chunk(host, 9)
    targets = list(range(h + 3, h + 40))
    r = mem_offline(hv, targets)
    assert all(o.kind.value == "offlined" for o in r.outcomes)
    assert host.heap.misaligned == 0 and invariants.check(host) == []


def _free_block_around_a_guest_frame(host, hv):
    """An aligned block of 8 frames, all kernel pages of PV guest 1: the seven above its
    first frame x are retired (exchanged) and onlined again, so that they are free and x
    sits at the head of a free order-3 buddy.  Three lone frames elsewhere are retired and
    onlined first: they are at the head of the order-0 free list, so the allocations of the
    next exchange take them and not the block's frames."""
    g = host.guests[1]
    mine = {g.mfn(p) for p in g.kernel_only_pages()}
    blocks = sorted({m & ~7 for m in mine if all((m & ~7) + i in mine for i in range(8))})
    base = blocks[0]
    decoys = [b + 1 for b in blocks[2:5]]
    x = base
    others = list(range(base + 1, base + 8))
    r = mem_offline(hv, decoys + others, split_guard=False)
    assert all(o.kind.value == "exchanged" for o in r.outcomes)
    # onlined frames go to the heads of the lists (online_page frees them unscrubbed):
    # the block's first, the decoys last, so that the decoys head the order-0 list
    for m in others + decoys:
        assert hv.page_offline_op(S.sysctl_page_online, m, m)[0] == 0
    assert all(host.ft.state(m) == mm.STATE_FREE for m in others)
    return g, x, base


@pytest.mark.parametrize("guarded", [True, False])
def test_exchange_next_to_a_free_buddy(guarded):
    """XENMEM_exchange frees the old frame next to free ones: free_heap_pages merges them,
    then reserve_offlined_page splits the merged buddy around it.  Guarded, the buddy ends
    at the frame and stays aligned; unguarded, Xen 4.17 misaligns it."""
    host, hv = _host(quirk=False)
    g, x, base = _free_block_around_a_guest_frame(host, hv)
    host.quirks.reserve_misaligned = True
    r = mem_offline(hv, [x], split_guard=guarded)
    assert r.outcomes[0].kind.value == "exchanged", r.outcomes[0]
    host.run_guests(0)
    assert g.verify() == []
    assert host.ft.state(x) == mm.STATE_OFFLINED
    if guarded:
        assert host.heap.misaligned == 0 and invariants.check(host) == []
        assert r.timings["split_guard"]["guard_frames_probed"] >= 2
    else:
        assert host.heap.misaligned > 0
        assert host.heap.chunk_of(base + 2) == (base + 1, 2)  # order 2 from an odd frame


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 255), min_size=1, max_size=12, unique=True))
def test_any_free_frames_offlined_by_xenpage_leave_an_aligned_heap(offsets):
    host, hv = _host()
    h, k = _big_chunk(host)
    targets = [h + o for o in offsets]
    r = mem_offline(hv, targets)
    assert all(o.kind.value == "offlined" for o in r.outcomes)
    assert host.heap.misaligned == 0 and invariants.check(host) == []
    assert sorted(host.heap.offlined_list) == sorted(targets)


def test_guard_frames_are_the_block_ends_highest_first():
    assert guard_frames([0x100], 0x1000)[:4] == [0xFFF, 0x7FF, 0x3FF, 0x1FF]
    assert guard_frames([0x100], 0x1000)[-1] == 0x101
    assert guard_frames([0x101], 0x1000)[-1] == 0x103       # 0x101 ends its order-1 block
    assert 0x103 not in guard_frames([0x101, 0x103], 0x1000)  # a target is never a guard
    assert guard_frames([5], 0x1000, skip=np.array([7])) == [0xFFF, 0x7FF, 0x3FF, 0x1FF, 0xFF, 0x7F, 0x3F, 0x1F, 0xF]


def test_cli_guards_by_default_and_no_split_guard_skips_it(tmp_path):
    """The command: guarded on a 4.17-split host (aligned heap); ``--no-split-guard`` offlines
    as stock does (misaligned)."""
    from click.testing import CliRunner

    from xenpage.backends.sim import host_path
    from xenpage.cli.main import cli
    from xenpage.hypervisor.host import Host
    for flag, misaligned in (([], False), (["--no-split-guard"], True)):
        state = tmp_path / ("a" if not flag else "b")
        host, _ = _host()
        h, k = _big_chunk(host)
        host.save(host_path(state))
        r = CliRunner().invoke(cli, ["--state-dir", str(state), "--backend", "sim", "mem-offline",
                                     f"{h + 1:x}", *flag])
        assert r.exit_code == 0, r.output
        assert f"Memory mfn {h + 1:x} offlined successfully, current state is [PG_OFFLINE_OFFLINED]" in r.output
        host = Host.load(host_path(state))
        assert (host.heap.misaligned > 0) == misaligned
