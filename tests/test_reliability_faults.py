"""Fault injection over mem-offline: every hypercall the toolstack issues can fail (whole, or
part-way for batches), and the world can act between any two of them.  For every fail point
the outcome of each frame is complete (exchanged, the guest's memory the same) or rolled
back bit-identical, and says which; the host stays consistent and no guest stays suspended.
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import pytest

from simworld import (dom0_maps, guest_destroyed, guest_grants_and_dom0_maps, images,
                             other_toolstack_onlines, problems, small_host)
from xenpage.toolstack.faults import (FALLIBLE, MUTATING, Action, FaultPlan, FaultyHypervisor)
from xenpage.toolstack.offline import mem_offline
from xenpage.toolstack.outcomes import Kind

CI = bool(os.environ.get("CI"))
BATCHES = ("mmu_update", "mmuext_op", "memory_exchange", "page_offline_each")


def targets(host) -> list[int]:
    """Frames of every kind: shared/private/read-only user pages, a kernel-only page, a
    pinned user L1, a pinned direct-map L1, an L2, a P2M frame, a granted buffer, a granted
    and mapped ring (both stay pending), and a page of the second guest."""
    g, g2 = host.guests[1], host.guests[2]
    pf = [g.user_pages("shared")[0], g.user_pages("private")[0], g.user_pages("ro")[0],
          g.kernel_only_pages()[0], g.procs[0].ul1[0], g.tables["direct_l1"][1], g.procs[1].ul2,
          g.tables["p2m"][0], g.granted[0]["pfn"], g.rings[0]["pfn"]]
    return [g.mfn(p) for p in pf] + [g2.mfn(g2.user_pages("private")[3])]


def few_targets(host) -> list[int]:
    """Four data pages and a pinned L1: two exchange groups."""
    return targets(host)[:5]


_CALLS = {}


def baseline_calls(which=targets):
    if which not in _CALLS:
        host, hv = small_host()
        fh = FaultyHypervisor(hv)
        r = mem_offline(fh, which(host))
        assert all(o.kind in (Kind.EXCHANGED, Kind.PENDING) for o in r.outcomes)
        _CALLS[which] = fh.calls
    return _CALLS[which]


def run_with(plan_for, which=targets):
    host, hv = small_host()
    T = which(host)
    before = images(host)
    fh = FaultyHypervisor(hv, plan_for(T))
    r = mem_offline(fh, T)
    host.run_guests(0)
    return host, before, r, fh


def check_outcome(host, before, r, same=lambda a, b: a.same_memory(b)):
    """Complete or rolled back bit-identical, and says which."""
    assert problems(host) == []
    after = images(host)
    for d, img in before.items():
        if d not in host.domains:
            continue
        assert not host.domains[d].is_shutting_down, f"d{d} left suspended"
        assert same(after[d], img), f"d{d}'s memory changed"
    kinds = Counter()
    for o in r.outcomes:
        assert o.kind != Kind.FAILED, o
        kinds[o.kind.value] += 1
        d = o.domid
        if d is None or d not in before or d not in host.domains or o.gpfn is None:
            continue
        old_p2m = np.frombuffer(before[d].p2m, dtype=np.int64)
        new_p2m = host.pv_p2m(d).astype(np.int64)
        if o.kind == Kind.EXCHANGED:
            assert new_p2m[o.gpfn] == o.new_mfn != o.mfn
            if o.extra.get("offlined"):
                # offlined -- unless the world onlined it again, and then an allocation
                # may already have handed it out (an onlined frame heads the free lists)
                assert host.ft.owner(o.mfn) is None or host.ft.m2p(o.mfn) != o.gpfn
        else:
            assert new_p2m[o.gpfn] == old_p2m[o.gpfn] == o.mfn, o  # still in place
    if not kinds.get("exchanged"):
        # nothing exchanged: every guest bit-identical (frames, types, counts, P2M)
        for d, img in before.items():
            if d in host.domains:
                assert images(host)[d].physical == img.physical
    return kinds


def _points(methods):
    calls = baseline_calls()
    return [(seq, m) for seq, m, _ in calls if m in methods]


@pytest.mark.parametrize("method", FALLIBLE)
def test_every_call_fails(method):
    """Fail each call of ``method`` in turn (and, for batches, part-way through)."""
    pts = _points((method,))
    if not pts:
        pytest.skip(f"mem-offline issues no {method}")
    seen = Counter()
    for seq, _ in pts:
        for partial in ((0, 1) if method in BATCHES else (0,)):
            host, before, r, fh = run_with(lambda T: FaultPlan.fail_at(seq, partial=partial))
            assert fh.injected, (seq, method)
            seen.update(check_outcome(host, before, r))
    assert seen


WORLD = {
    "dom0 maps the frame": lambda T: dom0_maps(1, T[0]),
    "guest grants it, a backend maps it": lambda T: guest_grants_and_dom0_maps(1, T[3]),
    "another toolstack onlines it": lambda T: other_toolstack_onlines(T[0]),
    "the guest is destroyed": lambda T: guest_destroyed(1),
}


@pytest.mark.parametrize("what", list(WORLD))
def test_the_world_acts_between_two_calls(what):
    calls = baseline_calls(few_targets)
    pts = [seq for seq, m, _ in calls if CI or m in MUTATING]
    seen = Counter()
    for seq in pts:
        host, before, r, fh = run_with(lambda T: FaultPlan(actions=[Action(seq, WORLD[what](T))]),
                                       few_targets)
        assert fh.acted
        if what == "the guest is destroyed":
            before.pop(1, None)
        seen.update(check_outcome(host, before, r, same=lambda a, b: a.same_content(b)))
    assert seen["exchanged"]
    if what != "another toolstack onlines it":
        assert seen["rolled-back"] or seen["offlined"] or seen["pending"]


def test_fault_plan_is_deterministic():
    a = run_with(lambda T: FaultPlan.fail_at(40))[2]
    b = run_with(lambda T: FaultPlan.fail_at(40))[2]
    assert [o.to_json() | {"extra": None} for o in a.outcomes] == \
        [o.to_json() | {"extra": None} for o in b.outcomes]


def test_guarded_offline_survives_each_one_frame_call_failing():
    """With the split guard (one-frame calls, highest first, by ``page_offline_each``): the
    guard's query or the offline of any frame failing part-way through the array leaves
    nothing half done -- every guest whole, every guard frame given back, the heap sound."""
    from xenpage.abi import mm

    def which(host):
        free = np.flatnonzero(host.ft.states(0, host.nframes) == mm.STATE_FREE)
        return few_targets(host) + [int(free[len(free) // 2]), int(free[len(free) // 2] + 1)]

    host, hv = small_host()
    fh = FaultyHypervisor(hv)
    mem_offline(fh, which(host), split_guard=True)
    pts = [n for _, m, n in fh.calls if m == "page_offline_each"]
    assert len(pts) >= 2  # the guard's query, then the marking
    seen = Counter()
    for nth in pts:
        for partial in (0, 1):
            host, hv = small_host()
            T = which(host)
            before = images(host)
            fh = FaultyHypervisor(hv, FaultPlan.fail_at(nth, "page_offline_each", partial=partial))
            r = mem_offline(fh, T, split_guard=True)
            host.run_guests(0)
            assert fh.injected
            seen.update(check_outcome(host, before, r))
            # no guard frame left offline: every offlined frame is a target
            offl = set(host.heap.offlined_list)
            assert offl <= set(T), sorted(offl - set(T))
    assert seen
