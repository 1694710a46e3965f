"""Faults at every step of the in-place exchange: whatever single hypercall fails, the frame
ends EXCHANGED (completed) or ROLLED_BACK (bit-identical) -- or REFUSED when the failure came
before anything was changed -- never half-done.

Faults are real failure paths: :class:`xenpage.toolstack.faults.FaultyHypervisor` wraps the
``SimHypervisor`` and makes the N-th call of a method return an errno (optionally after the
backend did the first items of a batch, as Xen's batches do); nothing inside the simulator is
mocked.  Two sweeps:

* **by step** -- ``exchange_pages``'s ``hook`` arms the wrapper at each step of the exchange
  (loaded, scanned, clearing, cleared, unpinning, unpinned, snapshot, exchanged, copied, p2m,
  repointed): the next ``mmu_update`` / ``memory_exchange`` / ``map_foreign`` /
  ``mmuext_op`` / ``page_types`` after that step fails;
* **by call** -- a clean run lists every call the exchange makes; each is failed in turn
  (also part-way through batches).

After a rollback: ``count_info``, ``type_info``, ``owner1``, ``m2p_plus1``, content, the words
of every page-table/P2M frame, the P2M, the guest's expected content and its grant table are
bit-identical to before; after a success the PTE flags of every re-pointed entry are the
originals, the old frame reads offlined; in both cases the invariant checker is clean and the
guest, resumed, verifies its memory and runs on.

Also: an unreadable grant table never lets a granted frame be exchanged; the world acting
between two steps (dom0 maps the frame, another toolstack onlines it); a restore that keeps
failing is reported FAILED, never as rolled back.
"""

from __future__ import annotations

import pytest

from test_exchange import (KINDS, SMALL, Before, World, assert_exchanged, entries_naming, prepare,
                           new_world, snap_diff, snapshot)
from xenpage.abi import errno as E
from xenpage.abi import sysctl as S
from xenpage.hypervisor import invariants, sysctl
from xenpage.toolstack.exchange import exchange_pages
from xenpage.toolstack.faults import FALLIBLE, Fault, FaultPlan, FaultyHypervisor
from xenpage.toolstack.outcomes import Kind, Reason

STEPS = ("loaded", "scanned", "clearing", "cleared", "unpinning", "unpinned", "snapshot",
         "exchanged", "copied", "p2m", "repointed")
#: steps after which something of the guest may have changed
CHANGING = STEPS[STEPS.index("clearing"):]
METHODS = ("mmu_update", "memory_exchange", "map_foreign", "mmuext_op", "page_types")
#: one of each shape: a data page with one entry, a page with three, a pinned L1 (unpin /
#: re-pin), an L3 with five entries, a P2M frame (P2M list update), a ring dom0 maps (the
#: exchange itself fails)
SWEEP_KINDS = ("kernel-data", "user-shared", "user-l1", "direct-l3", "p2m", "xenstore-ring")


def prepared(kind: str) -> tuple[World, Before]:
    # (the sweep follows one exchange per page: no new frame from Xen's fixed range, which
    # would be exchanged again -- test_exchange.py covers that path)
    w = new_world(SMALL, hold_fixed=True)
    pfn = KINDS[kind][0](w.g)
    b = prepare(w, [pfn])
    return w, b


def check_outcome(w: World, b: Before, o, allow_refused: bool) -> None:
    """The one contract, whatever failed."""
    allowed = {Kind.EXCHANGED, Kind.ROLLED_BACK} | ({Kind.REFUSED} if allow_refused else set())
    if KINDS[SWEEP_KINDS[-1]][0](w.g) in b.pfns:
        allowed.discard(Kind.EXCHANGED)  # a ring dom0 maps is never exchanged
    assert o.kind in allowed, o
    if o.kind == Kind.EXCHANGED:
        assert_exchanged(w, b, [o])
    else:
        assert snap_diff(b.snap, snapshot(w)) == [], o
        assert w.status(b.mfns[0]) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
        assert invariants.check(w.h) == []
    w.resume()
    assert w.g.verify() == []
    w.g.step(60)
    assert w.g.verify() == [] and invariants.check(w.h) == []


def clean_run(kind: str) -> tuple[list[tuple[str, int]], list, object]:
    """(steps with the number of calls made before each, the calls, the outcome)."""
    w, b = prepared(kind)
    fh = FaultyHypervisor(w.hv)
    steps: list[tuple[str, int]] = []
    (o,) = exchange_pages(fh, 1, b.mfns, hook=lambda step, **kw: steps.append((step, len(fh.calls))))
    return steps, fh.calls, o


# -- by step: the hook arms the fault ------------------------------------------------------------------

ERRNO = {"mmu_update": E.EINVAL, "memory_exchange": E.ENOMEM, "map_foreign": E.EFAULT,
         "mmuext_op": E.EINVAL, "page_types": E.EFAULT}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", SWEEP_KINDS)
def test_a_fault_after_each_step(kind, method):
    steps, calls, clean = clean_run(kind)
    names = [s for s, _ in steps]
    assert [s for s in STEPS if s in names] == [s for s in names if s in STEPS]  # known order
    assert clean.kind == KINDS[kind][1]
    ran = 0
    for step, ncalls in steps:
        if step not in STEPS or not any(m == method for _, m, _ in calls[ncalls:]):
            continue  # no call of that method after this step: nothing to fail
        w, b = prepared(kind)
        fh = FaultyHypervisor(w.hv)
        armed = []

        def hook(s, fh=fh, step=step, armed=armed, **kw):
            if s == step and not armed:
                armed.append(s)
                fh.plan.faults.append(Fault(fh.per_method.get(method, 0) + 1, method, ERRNO[method]))

        (o,) = exchange_pages(fh, 1, b.mfns, hook=hook)
        assert armed == [step] and fh.injected, step
        check_outcome(w, b, o, allow_refused=step not in CHANGING)
        ran += 1
    if method in ("mmu_update", "memory_exchange", "map_foreign"):
        assert ran


@pytest.mark.parametrize("kind", ["user-shared", "direct-l3"])
def test_clearing_fails_part_way(kind):
    """Xen stops an mmu_update batch at the first failing request: the entries already
    cleared are put back."""
    _, _, clean = clean_run(kind)
    for k in range(1, clean.ptes):
        w, b = prepared(kind)
        fh = FaultyHypervisor(w.hv, FaultPlan.fail_at(1, "mmu_update", E.EBUSY, partial=k))
        (o,) = exchange_pages(fh, 1, b.mfns)
        assert (o.kind, o.reason) == (Kind.ROLLED_BACK, Reason.CLEAR_FAILED), o
        assert f"after {k} of {clean.ptes}" in o.detail
        check_outcome(w, b, o, allow_refused=False)


@pytest.mark.parametrize("kind", ["user-shared", "direct-l3", "user-l1"])
def test_re_pointing_fails_part_way(kind):
    """After XENMEM_exchange there is no way back: a batch of re-points failing part-way is
    completed by the retry."""
    w, b = prepared(kind)
    fh = FaultyHypervisor(w.hv)
    (o,) = exchange_pages(fh, 1, b.mfns)
    n = [nth for _, m, nth in fh.calls if m == "mmu_update"][-1]  # the re-point
    w, b = prepared(kind)
    fh = FaultyHypervisor(w.hv, FaultPlan.fail_at(n, "mmu_update", E.EINVAL, partial=1))
    (o,) = exchange_pages(fh, 1, b.mfns)
    assert fh.injected and o.kind == Kind.EXCHANGED
    check_outcome(w, b, o, allow_refused=False)


# -- by call: every call of a clean run fails in turn ------------------------------------------------------

@pytest.mark.parametrize("surveyed", [False, True], ids=["", "surveyed"])
@pytest.mark.parametrize("kind", ["kernel-data", "user-l1", "p2m"])
def test_every_call_fails_in_turn(kind, surveyed):
    """``surveyed``: with a survey taken before the suspend (as mem-offline does); a failure
    while refreshing it falls back to a full view."""
    from xenpage.toolstack.exchange import load_guest

    def prepared_(kind):
        w, b = prepared(kind)
        return w, b, (load_guest(w.hv, 1)[0] if surveyed else None)

    w, b, sv = prepared_(kind)
    fh = FaultyHypervisor(w.hv)
    steps: list[tuple[str, int]] = []
    exchange_pages(fh, 1, b.mfns, hook=lambda s, **kw: steps.append((s, len(fh.calls))), survey=sv)
    first_change = dict(steps)["clearing"]  # calls up to here only read
    calls = [c for c in fh.calls if c[1] in FALLIBLE]
    assert {"mmu_update", "memory_exchange", "map_foreign", "page_offline_op", "grant_entries"} \
        <= {m for _, m, _ in calls}
    for seq, method, nth in calls:
        w, b, sv = prepared_(kind)
        fh = FaultyHypervisor(w.hv, FaultPlan.fail_at(nth, method))
        (o,) = exchange_pages(fh, 1, b.mfns, survey=sv)
        assert fh.injected == [(seq, method, nth, fh.injected[0][3])], (seq, method)
        check_outcome(w, b, o, allow_refused=seq <= first_change)


def test_a_batch_with_every_call_failing_in_turn():
    """Four data pages, a ring dom0 maps, a pinned L1 and a granted buffer in one batch; each
    call fails in turn (batches part-way): every frame ends exchanged, pending, refused or
    rolled back; entries naming a frame that did not move are bit-identical again."""
    def setup():
        w = new_world(SMALL)
        g = w.g
        pfns = g.kernel_only_pages()[40:43] + [g.user_pages("shared")[2], g.daemon_maps[0]["pfn"],
                                               g.procs[2].ul1[0], g.granted[0]["pfn"]]
        b = prepare(w, pfns)
        return w, b

    w, b = setup()
    fh = FaultyHypervisor(w.hv)
    clean = exchange_pages(fh, 1, b.mfns)
    assert [o.kind for o in clean] == [Kind.EXCHANGED] * 4 + [Kind.ROLLED_BACK, Kind.EXCHANGED, Kind.PENDING]
    plans = []
    for seq, method, nth in fh.calls:
        if method in FALLIBLE:
            plans.append(FaultPlan.fail_at(nth, method))
            if method in ("mmu_update", "memory_exchange"):
                plans.append(FaultPlan.fail_at(nth, method, partial=2))
    for plan in plans:
        w, b = setup()
        fh = FaultyHypervisor(w.hv, plan)
        outs = exchange_pages(fh, 1, b.mfns)
        assert {o.kind for o in outs} <= {Kind.EXCHANGED, Kind.PENDING, Kind.REFUSED, Kind.ROLLED_BACK}, \
            (plan, outs)
        assert outs[4].kind != Kind.EXCHANGED and outs[6].kind != Kind.EXCHANGED
        assert invariants.check(w.h) == []
        moved = [(pf, m, o) for pf, m, o in zip(b.pfns, b.mfns, outs) if o.kind == Kind.EXCHANGED]
        if moved:
            sub = Before([x[0] for x in moved], [x[1] for x in moved], b.refs, b.content, b.types,
                         b.vas, b.view, b.snap)
            assert_exchanged(w, sub, [x[2] for x in moved], check_view=False)
        stay = [m for m, o in zip(b.mfns, outs) if o.kind != Kind.EXCHANGED]
        now = entries_naming(w.h, 1, stay)
        moved_tables = {x[1]: x[2].new_mfn for x in moved}
        for m in stay:
            assert w.status(m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
            assert sorted((moved_tables.get(t, t), i, v) for t, i, v, _ in b.refs[m]) == \
                sorted((t, i, v) for t, i, v, _ in now[m]), plan
        if not moved:
            assert snap_diff(b.snap, snapshot(w)) == [], plan
        w.resume()
        assert w.g.verify() == [], plan
        w.g.step(40)
        assert w.g.verify() == []


# -- the grant check cannot be skipped ---------------------------------------------------------------------------

def test_an_unreadable_grant_table_never_lets_a_granted_page_be_exchanged():
    """Regression: a failed grant-table read used to count as "no grants", so a granted
    buffer was exchanged and its grant named an offlined frame."""
    w = new_world(SMALL)
    g = w.g
    pfns = [g.granted[0]["pfn"], g.rings[1]["pfn"], g.kernel_only_pages()[50]]
    b = prepare(w, pfns)
    s = snapshot(w)
    fh = FaultyHypervisor(w.hv, FaultPlan.fail_at(1, "grant_entries", E.EFAULT))
    outs = exchange_pages(fh, 1, b.mfns)
    assert [(o.kind, o.reason) for o in outs] == [(Kind.REFUSED, Reason.GRANTED)] * 3
    assert all("grant table" in o.detail and o.errno == E.EFAULT for o in outs)
    assert snap_diff(s, snapshot(w)) == []
    # with the grant table readable again, the ungranted page goes, the granted ones stay
    outs = exchange_pages(w.hv, 1, b.mfns)
    assert [(o.kind, o.reason) for o in outs] == [(Kind.PENDING, Reason.GRANTED)] * 2 + [(Kind.EXCHANGED, Reason.NONE)]
    w.resume()
    assert g.verify() == [] and invariants.check(w.h) == []


# -- the world acts between two steps -----------------------------------------------------------------------------

def test_dom0_maps_the_frame_just_before_the_exchange():
    """steal_page refuses a frame with an extra reference: everything is put back; once dom0
    unmaps it, the host is bit-identical to before."""
    w, b = prepared("kernel-data")
    m = b.mfns[0]
    handles = []

    def hook(step, **kw):
        if step == "snapshot":
            rc, hd = w.h.hypercalls(0).foreign_map(1, [m], False)
            assert rc == 0
            handles.append(hd)

    (o,) = exchange_pages(w.hv, 1, b.mfns, hook=hook)
    assert (o.kind, o.reason, o.errno) == (Kind.ROLLED_BACK, Reason.REFERENCED, E.EINVAL)
    assert invariants.check(w.h) == []
    assert w.h.hypercalls(0).foreign_unmap(handles[0]) == 0
    assert snap_diff(b.snap, snapshot(w)) == []
    w.resume()
    assert w.g.verify() == []


def test_the_guest_grants_the_frame_after_the_grant_check():
    """A grant mapped by dom0 after the check (the guest should be suspended; a buggy or
    hostile one is not): the exchange cannot steal the frame and rolls back."""
    from simworld import guest_grants_and_dom0_maps
    w, b = prepared("kernel-data")
    act = guest_grants_and_dom0_maps(1, b.mfns[0], ref=300)
    (o,) = exchange_pages(w.hv, 1, b.mfns, hook=lambda s, **kw: act(w.hv) if s == "cleared" else None)
    assert (o.kind, o.reason) == (Kind.ROLLED_BACK, Reason.REFERENCED)
    assert invariants.check(w.h) == []
    assert w.status(b.mfns[0]) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    w.resume()
    assert w.g.verify() == []


def test_another_toolstack_onlines_the_frame_mid_exchange():
    """The frame is no longer offline-pending when XENMEM_exchange frees it: it goes back to
    the heap (not offlined), the guest's page still moved and is whole."""
    w, b = prepared("user-private")
    m = b.mfns[0]

    def hook(step, **kw):
        if step == "cleared":
            rc, stt = sysctl.page_offline_op(w.h, 0, S.sysctl_page_online, m, m, pcpu=1)
            assert rc == 0

    (o,) = exchange_pages(w.hv, 1, b.mfns, hook=hook)
    assert o.kind == Kind.EXCHANGED and not o.extra["offlined"]
    assert w.status(m) == 0  # free and online
    assert invariants.check(w.h) == []
    w.resume()
    assert w.g.verify() == []


# -- a restore that keeps failing is not reported as rolled back ----------------------------------------------------

def test_a_restore_that_keeps_failing_is_reported_failed():
    w, b = prepared("user-shared")
    plan = FaultPlan([Fault(1, "mmu_update", E.EINVAL, partial=2)] +
                     [Fault(n, "mmu_update", E.EINVAL) for n in range(2, 40)])
    (o,) = exchange_pages(FaultyHypervisor(w.hv, plan), 1, b.mfns)
    assert (o.kind, o.reason) == (Kind.FAILED, Reason.RESTORE_FAILED)
    # the two cleared entries are indeed still cleared: FAILED is the truth
    assert snap_diff(b.snap, snapshot(w)) != []
    assert invariants.check(w.h) == []  # consistent, though the guest lost two mappings


def test_a_failed_exchange_hypercall_keeps_the_rest_of_the_batch():
    """XENMEM_exchange fails part-way through a data batch: the frames before the failure are
    exchanged, the failing one is rolled back, the rest are exchanged by the next call."""
    w = new_world(SMALL)
    pfns = w.g.kernel_only_pages()[60:66]
    b = prepare(w, pfns)
    fh = FaultyHypervisor(w.hv, FaultPlan.fail_at(1, "memory_exchange", E.ENOMEM, partial=2))
    outs = exchange_pages(fh, 1, b.mfns)
    assert [o.kind for o in outs] == [Kind.EXCHANGED] * 2 + [Kind.ROLLED_BACK] + [Kind.EXCHANGED] * 3
    assert outs[2].reason == Reason.EXCHANGE_FAILED and outs[2].errno == E.ENOMEM
    keep = [0, 1, 3, 4, 5]
    sub = Before([b.pfns[i] for i in keep], [b.mfns[i] for i in keep], b.refs, b.content, b.types,
                 b.vas, b.view, b.snap)
    assert_exchanged(w, sub, [outs[i] for i in keep])
    m = b.mfns[2]
    assert w.status(m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    assert [(t, i, v) for t, i, v, _ in entries_naming(w.h, 1, [m])[m]] == [(t, i, v) for t, i, v, _ in b.refs[m]]
    w.resume()
    assert w.g.verify() == []


@pytest.mark.parametrize("kind", ["user-l1", "direct-l3", "user-shared"])
def test_a_fault_during_the_rollback_itself_is_retried(kind):
    """XENMEM_exchange fails, then the first restore batch and the first re-pin fail too: the
    rollback reads what is there and tries again -- still bit-identical."""
    w, b = prepared(kind)
    fh = FaultyHypervisor(w.hv)
    exchange_pages(fh, 1, b.mfns)
    n_mmu = fh.per_method.get("mmu_update", 0)
    w, b = prepared(kind)
    plan = FaultPlan([Fault(1, "memory_exchange", E.ENOMEM),
                      Fault(2, "mmu_update", E.EINVAL, partial=1),  # the first restore, part-way
                      Fault(2, "mmuext_op", E.EINVAL)])             # the first re-pin
    fh = FaultyHypervisor(w.hv, plan)
    (o,) = exchange_pages(fh, 1, b.mfns)
    assert (o.kind, o.reason) == (Kind.ROLLED_BACK, Reason.EXCHANGE_FAILED), o
    assert n_mmu >= 2 and {m for _, m, _, _ in fh.injected} >= {"memory_exchange", "mmu_update"}
    check_outcome(w, b, o, allow_refused=False)
