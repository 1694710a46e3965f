"""A frame retired by live migration on a Xen whose buddy split misaligns (4.17): the old
domain's destruction must not free it pending.

``relinquish_memory`` frees a dying domain's pages one by one; a pending frame freed after
free neighbours is offlined inside their merged buddy, and 4.17's ``reserve_offlined_page``
leaves misaligned chunks (later merged over frames in use: pages handed out twice).  In the
lab, guests crashed (triple faults) after such migrations and unguarded in-place steps
(tests_xen/README.md).  ``mem-offline`` takes the pending mark off before migrating and
offlines the freed frame under its guard frames; a failed migration marks it pending again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from hvmtools import hvm_host
from xenpage.abi import mm
from xenpage.abi import sysctl as S
from xenpage.backends.sim import SimHypervisor, build_host, host_path
from xenpage.hypervisor.host import Host
from xenpage.hypervisor import invariants
from xenpage.toolstack import hptool
from xenpage.toolstack.offline import mem_offline
from xenpage.toolstack.outcomes import Kind, Reason

HVM = 2  # the default host's HVM guest


def worst_case_host():
    """The default host with Xen 4.17's misaligned split and a dying domain's pending frames
    freed after their neighbours (the worst order ``relinquish_memory`` can take)."""
    h = build_host()
    h.quirks.relinquish_pending_last = True
    return h


def offlined(h) -> set[int]:
    st = h.ft.states()
    return set(np.flatnonzero(st == mm.STATE_OFFLINED).tolist())


def status(hv, m: int) -> int:
    return int(hv.page_offline_op(S.sysctl_query_page_offline, m, m)[1][0])


def test_the_frame_is_offlined_after_the_old_domain_is_gone_and_the_heap_stays_aligned():
    for gfn in (3, 511, 512, 1000, 20000):
        h = worst_case_host()
        hv = SimHypervisor(h)
        m = int(h.p2m[HVM][gfn])
        before = offlined(h)
        r = mem_offline(hv, [m])
        o = r.outcomes[0]
        assert o.kind == Kind.MIGRATED and o.detail.endswith("old frame offlined"), o
        assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED
        assert offlined(h) - before == {m}            # every guard frame given back
        assert h.heap.misaligned == 0 and invariants.check(h) == [], gfn
        assert HVM not in h.domains


def test_without_the_guard_the_destruction_misaligns_the_heap():
    """What the guard prevents: the frame left pending while the old domain is destroyed
    (``--no-split-guard``, meant for a Xen with the 2026 fix) on the 4.17 model."""
    h = worst_case_host()
    hv = SimHypervisor(h)
    m = int(h.p2m[HVM][1000])
    r = mem_offline(hv, [m], split_guard=False)
    assert r.outcomes[0].kind == Kind.MIGRATED
    assert h.heap.misaligned > 0
    assert any("misaligned" in p for p in invariants.check(h))


def test_a_failed_migration_leaves_the_frame_pending_as_it_was():
    h, hv, g = hvm_host(guest_mib=40, mem_mib=64, dom0_mib=8)   # no room for a second copy
    h.quirks.relinquish_pending_last = True
    m = g.mfn(10)
    before = offlined(h)
    r = mem_offline(hv, [m])
    o = r.outcomes[0]
    assert o.kind == Kind.PENDING and o.reason == Reason.MIGRATION_NEEDED, o
    assert "no room" in o.detail
    assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    _, rc2, mark = hptool.mem_offline_mark(hv, m)      # asked again: still the guest's, pending
    assert rc2 == 0 and hptool.is_owned_pending(rc2, mark) and hptool.owner_of(mark) == 1
    assert offlined(h) == before and g.running()
    hv.wait(0.05)
    assert g.verify() == [] and invariants.check(h) == []


# -- a mem-offline killed around the migration ------------------------------------------------

CRASHRUN = Path(__file__).resolve().with_name("crashrun.py")


def _crash_run(state, *args, crash: str):
    env = dict(os.environ, XENPAGE_STATE_DIR=str(state), XENPAGE_BACKEND="sim")
    return subprocess.run([sys.executable, str(CRASHRUN), "--crash-at", crash, "--", "--backend", "sim",
                           *[str(a) for a in args]], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.parametrize("point,migrated", [("migrating", False), ("migrated", True)])
def test_killed_around_the_migration_then_recover_marks_the_frame_again(cli_state, xenpage_cli,
                                                                         point, migrated):
    """Killed with the frame unmarked -- before the migration (the guest still has it) or
    after (it is free) -- ``xenpage recover`` marks it again from the record: pending, owned
    by the guest, or offlined; no guard frame left offline, the heap aligned."""
    h = Host.load(host_path(cli_state))
    h.quirks.relinquish_pending_last = True
    h.save(host_path(cli_state))
    m = int(h.p2m[HVM][1000])
    before = offlined(h)
    r = _crash_run(cli_state, "mem-offline", f"{m:x}", crash=point)
    assert r.returncode == -signal.SIGKILL, r.stderr
    h = Host.load(host_path(cli_state))
    assert (HVM not in h.domains) == migrated
    hv = SimHypervisor(h)
    assert status(hv, m) & (S.PG_OFFLINE_STATUS_OFFLINED | S.PG_OFFLINE_STATUS_OFFLINE_PENDING) == 0
    rec = xenpage_cli(cli_state, "recover", "--json")
    assert rec.returncode == 0, rec.stderr
    assert json.loads(rec.stdout)["frames_marked_again"] == [m]
    h = Host.load(host_path(cli_state))
    hv = SimHypervisor(h)
    want = S.PG_OFFLINE_STATUS_OFFLINED if migrated else S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    assert status(hv, m) == want
    assert offlined(h) - before == ({m} if migrated else set())
    assert h.heap.misaligned == 0 and invariants.check(h) == []
    # and once more: nothing recorded, nothing to do
    rec = xenpage_cli(cli_state, "recover", "--json")
    assert rec.returncode == 0 and json.loads(rec.stdout)["frames_marked_again"] == []
