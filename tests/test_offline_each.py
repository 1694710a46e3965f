"""``page_offline_each``: the sysctl once per frame, vectorised in the simulator, must leave
the host exactly as the one-frame calls do one by one (statuses, errnos, every frame-table
field, every heap list in its order, the offlined list in its order, domain states)."""

from __future__ import annotations

import copy

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpage.abi import mm
from xenpage.abi import sysctl as S
from xenpage.hypervisor import invariants, offline, sysctl

import dataclasses

from xenpage.hypervisor.quirks import Quirks

from simworld import SMALL, small_host

_HOST, _HV = small_host()
#: the same host with Xen 4.17's misaligned split (the default of every other host)
_HOST417, _ = small_host(dataclasses.replace(SMALL, quirks=Quirks()))
_Q = S.sysctl_query_page_offline


def _snapshot(host):
    ft = host.ft
    return ({f: getattr(ft, f).copy() for f in ft.FIELDS}, host.heap.list_order(),
            list(host.heap.offlined_list), list(host.heap.broken_list), host.heap.misaligned,
            host.heap.free_pages, {d: (x.shutdown_code, x.pod_lock) for d, x in host.domains.items()})


def _same(a, b):
    fa, *ra = a
    fb, *rb = b
    for f in fa:
        assert np.array_equal(fa[f], fb[f]), f
    assert ra == rb


def _by_one(host, cmd, mfns):
    out = [sysctl.page_offline_op(host, 0, cmd, m, m, pcpu=1) for m in mfns]
    return (np.array([r for r, _ in out], dtype=np.int32),
            np.array([int(s[0]) if s is not None else S.STATUS_UNTOUCHED for _, s in out], dtype=np.uint32))


def _check(mfns, cmd=S.sysctl_page_offline, host=None):
    host = host or _HOST
    a, b = copy.deepcopy(host), copy.deepcopy(host)
    ra, sa = _by_one(a, cmd, mfns)
    rb, sb = sysctl.page_offline_each(b, 0, cmd, np.array(mfns, dtype=np.int64), pcpu=1)
    assert np.array_equal(ra, rb) and np.array_equal(sa, sb)
    _same(_snapshot(a), _snapshot(b))
    if not host.quirks.reserve_misaligned:  # 4.17's split misaligns by itself (both ways)
        assert invariants.check(b) == []
    return b


def _free_runs(host):
    st = host.ft.states(0, host.nframes)
    free = np.flatnonzero(st == mm.STATE_FREE)
    return free


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_descending_runs_match_one_by_one(data):
    free = _free_runs(_HOST)
    top = int(data.draw(st.sampled_from(free.tolist())))
    n = data.draw(st.integers(1, 1500))
    run = list(range(top, max(top - n, 0), -1))
    extra = data.draw(st.lists(st.integers(0, _HOST.nframes + 0x20000), max_size=8))
    mfns = run + [m for m in extra if m not in set(run)]
    _check(mfns, host=data.draw(st.sampled_from([_HOST, _HOST417])))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mfns=st.lists(st.integers(0, 0x8000 + 0x10000), min_size=1, max_size=400, unique=True))
def test_any_frames_any_order_match_one_by_one(mfns):
    _check(mfns)
    _check(mfns, _Q)
    _check(mfns, S.sysctl_page_online)


def test_a_whole_buddy_from_its_end_is_vectorised_and_exact():
    """The fast path is taken (no call per frame) and agrees with Xen's calls one by one."""
    heap = _HOST.heap
    h, k = max(heap.chunks(), key=lambda c: c[1])
    run = list(range(h + (1 << k) - 1, h + (1 << k) // 3, -1))
    assert offline._last_of_buddies(_HOST, np.array(run, dtype=np.int64)) is not None
    b = _check(run)
    rc, st_ = sysctl.page_offline_each(b, 0, _Q, np.array(run))
    assert (rc == 0).all() and (st_ == S.PG_OFFLINE_STATUS_OFFLINED).all()
    # ascending within a buddy is not vectorised: each frame would split the buddy around it
    assert offline._last_of_buddies(_HOST, np.array(run[::-1], dtype=np.int64)) is None
    _check(run[::-1])
    _check(run[::-1], host=_HOST417)
    _check(run, host=_HOST417)
