"""``hard`` on real Xen never fakes a machine check (``xenpage.ras.actions.PolicyHard``):
the frame is retired by every means the toolstack has and kept as broken by policy.  The
toolstack is backend-neutral, so the action runs here on the simulated host -- which never
sees a machine check from it (no record appears, Xen's ``PGC_broken`` is never set), while
the simulator's own ``hard`` keeps modelling Xen's machine-check path."""

from __future__ import annotations

import simworld
from xenpage.abi import sysctl as S
from xenpage.backends.sim import SimHypervisor, build_host
from xenpage.backends.sim import ras as sim_ras
from xenpage.ras.actions import BROKEN_BY_POLICY, PolicyHard
from xenpage.ras.service import RetireService, query
from xenpage.ras.store import Store
from xenpage.ras.thresholds import Action, Policy, Rate

PV = 0x3F100     # a frame of the PV guest domu1 on the default host
DOM0 = 0x40B88   # a frame of dom0
FREE = 0x4E8     # a free frame


def _service(hard):
    hv = SimHypervisor(build_host())
    p = Policy(page=Rate(1, 86400), page_action=Action.HARD)
    store = Store()
    return hv, store, RetireService(store, p, hard=hard)


def _ce(hv, mfn, t=1.7e9):
    return sim_ras.SimMachineCheck(hv).inject(mfn, time=t).record


def test_policy_hard_exchanges_a_pv_frame_and_never_marks_it_broken():
    hv, store, svc = _service(PolicyHard())
    svc.process(hv, [_ce(hv, PV)])
    f = store.frame(PV)
    assert f.state == "retired" and f.action == "hard" and f.outcome == BROKEN_BY_POLICY
    assert f.xen_state == "offlined" and not f.broken
    assert "broken by policy" in f.detail and "exchanged" in f.detail
    rc, st = query(hv, PV)
    assert rc == 0 and st & S.PG_OFFLINE_STATUS_OFFLINED and not st & S.PG_OFFLINE_STATUS_BROKEN
    assert simworld.problems(hv.host) == []      # the guest kept running, memory intact
    assert not any("domain_crash" in line for line in hv.host.log)
    assert not any(d.shutdown_code for d in hv.host.domains.values())
    assert store.boot_option().value == f"{PV:#x}"


def test_policy_hard_on_free_and_dom0_frames():
    hv, store, svc = _service(PolicyHard())
    svc.process(hv, [_ce(hv, FREE), _ce(hv, DOM0, 1.7e9 + 1)])
    free, d0 = store.frame(FREE), store.frame(DOM0)
    assert free.state == "retired" and free.xen_state == "offlined" and not free.broken
    assert d0.state == "pending" and d0.xen_state == "offlining" and d0.domid == 0
    assert "until its owner d0 frees it" in d0.detail
    assert simworld.problems(hv.host) == []


def test_simulator_hard_still_models_xens_machine_check_path():
    hv, store, svc = _service(sim_ras.hard_offline)
    svc.process(hv, [_ce(hv, FREE), _ce(hv, PV, 1.7e9 + 1)])
    f = store.frame(FREE)
    assert f.state == "retired" and f.broken and f.xen_state == "offlined+broken"
    assert any("domain_crash" in line for line in hv.host.log)   # Xen crashes a PV owner


def test_the_service_on_real_xen_is_given_policy_hard():
    """``xenpage retired --backend xen`` wires ``hard`` to :class:`PolicyHard` (with the
    policy's HVM method), the simulator to its model of Xen's machine-check path."""
    from xenpage.cli import commands  # noqa: F401  (the command tree, in its import order)
    from xenpage.cli.ras import _hard_action
    hard = _hard_action("xen", Policy(hvm="exchange"))
    assert isinstance(hard, PolicyHard) and hard.hvm == "exchange"
    assert _hard_action("sim", Policy()) is sim_ras.hard_offline
