"""The page-retirement service on a simulated host: thresholds to actions through the
toolstack, Xen's states before and after, uncorrected errors, retries with backoff, the
global off switch, soft-then-hard, replay after a reboot (with and without badpage=),
persistence across restarts."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from xenpage.abi import mm
from xenpage.abi import sysctl as S
from xenpage.abi.xen import SHUTDOWN_crash
from xenpage.backends.sim import ras as sim_ras
from xenpage.backends.sim import DefaultHostSpec, SimHypervisor, build_host
from xenpage.hypervisor import invariants
from xenpage.ras.service import Log, RetireService, parse_badpage_value, xen_state
from xenpage.ras.store import Store
from xenpage.ras.thresholds import Action, Policy, Rate

SPEC = DefaultHostSpec(mem_mib=256, dom0_mib=64, pv_guests=(("pv1", 16),), hvm_guests=(("hvm1", 16),), pvh_guests=())
T0 = 1_700_000_000.0


class Clock:
    def __init__(self, t=T0):
        self.t = t

    def __call__(self):
        return self.t


class World:
    """A host, its hypervisor view, an error injector and a service."""

    def __init__(self, policy=None, store=None, host=None, log_json=False):
        self.host = host or build_host(SPEC)
        self.hv = SimHypervisor(self.host)
        self.mc = sim_ras.SimMachineCheck(self.hv)
        self.clock = Clock()
        self.store = store or Store()
        self.out = io.StringIO()
        self.log = Log(stream=self.out, as_json=log_json, journal=False, clock=self.clock)
        self.policy = policy or Policy()
        self.svc = self.service()

    def service(self):
        g = self.mc.geometry

        def expand(unit, rec):
            return [g.encode(rec.socketid, rec.channel, rec.rank, rec.bankgroup, rec.dram_bank,
                             rec.row, f) for f in range(g.row_frames)]
        return RetireService(self.store, self.policy, clock=self.clock, hard=sim_ras.hard_offline,
                             log=self.log, expand=expand)

    def ce(self, mfn, n=1, dt=60.0):
        for _ in range(n):
            self.clock.t += dt
            self.svc.process(self.hv, [self.mc.inject(mfn, time=self.clock.t).record])

    def uc(self, mfn):
        self.clock.t += 60
        inj = self.mc.inject(mfn, uncorrected=True, time=self.clock.t)
        self.svc.process(self.hv, [inj.record])
        return inj

    def state(self, mfn):
        f = self.store.frame(mfn)
        return (f.state, f.xen_state) if f else None

    def xen(self, mfn):
        rc, st = self.hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
        return xen_state(rc, int(st[0]))

    def lines(self):
        return self.out.getvalue().splitlines()

    def healthy(self):
        assert invariants.check(self.host) == []
        for g in self.host.guests.values():
            assert g.verify() == []


def frames(host):
    st_ = (host.ft.count_info.copy() >> np.uint64(mm.PGC_state_shift)) & np.uint64(3)
    g = host.guests[1]
    return {"free": int(np.flatnonzero(st_ == np.uint64(mm.STATE_FREE))[700]),
            "pv": g.mfn(g.user_pages("shared")[0]), "pv2": g.mfn(g.user_pages("private")[1]),
            "granted": g.mfn(g.granted[0]["pfn"]),
            "dom0": int(host.owned_frames(0)[400]), "hvm": int(host.owned_frames(2)[30]),
            "xen": host.xen_image[0] + 9}


@pytest.fixture
def w():
    return World()


def test_threshold_retires_by_owner(w):
    f = frames(w.host)
    for k in ("pv", "dom0", "hvm", "free", "xen"):
        w.ce(f[k])
        assert w.store.frame(f[k]) is None               # 1 error: below 2 / 24h
        w.ce(f[k])
    assert w.state(f["pv"]) == ("retired", "offlined")   # exchanged in place
    assert w.state(f["free"]) == ("retired", "offlined")
    assert w.state(f["dom0"]) == ("pending", "offlining")
    assert w.state(f["hvm"]) == ("retired", "offlined")       # the guest was live-migrated
    assert w.state(f["xen"])[0] == "failed"
    assert w.store.frame(f["pv"]).outcome == "exchanged" and w.store.frame(f["pv"]).domid == 1
    assert w.store.frame(f["dom0"]).outcome == "dom0"
    assert w.store.frame(f["hvm"]).outcome == "migrated" and w.svc.stats.migrations == 1
    assert w.store.frame(f["xen"]).outcome == "xen-image"
    text = "\n".join(w.lines())
    assert f"transition mfn={f['pv']:#x} xen=online->offlined state=new->retired action=soft " \
           "outcome=exchanged" in text
    assert f"mfn={f['dom0']:#x} xen=online->offlining state=new->pending" in text
    assert f"mfn={f['hvm']:#x} xen=online->offlined state=new->retired action=soft outcome=migrated" in text
    assert w.svc.stats.suspends == 1 and w.svc.stats.suspended_s > 0
    w.healthy()
    assert w.store.boot_option().value.count(",") == 3   # retired and pending, not failed


@pytest.mark.parametrize("method,state,outcome", [
    ("none", ("pending", "offlining"), "migration-needed"),
    ("exchange", ("retired", "offlined"), "exchanged"),
    ("migrate", ("retired", "offlined"), "migrated"),
])
def test_hvm_methods(method, state, outcome):
    w = World(Policy(hvm=method))
    m = frames(w.host)["hvm"]
    w.ce(m, 2)
    assert w.state(m) == state and w.store.frame(m).outcome == outcome
    assert (w.svc.stats.migrations == 1) == (method != "none")
    if method == "exchange":
        assert w.svc.stats.downtime_s < 0.01 and 2 in w.host.domains   # same guest, paused briefly
    w.healthy()


def test_policy_reaches_the_toolstack():
    from xenpage.toolstack.offline import mem_offline
    seen = []

    def spy(hv, mfns, **kw):
        seen.append(kw["retire"])
        return mem_offline(hv, mfns, **kw)
    w = World(Policy(fallback="migrate", hvm="exchange"))
    w.svc.offline = spy
    m = frames(w.host)["granted"]
    w.ce(m, 2)
    assert (seen[0].hvm, seen[0].fallback) == ("exchange", "migrate")
    # whatever the PV fallback could do, the frame is retired or still pending, never lost
    assert w.store.frame(m).state in ("retired", "pending")
    assert invariants.check(w.host) == []


def test_errors_on_retired_frames_are_counted_not_acted_on(w):
    m = frames(w.host)["free"]
    w.ce(m, 2)
    n = w.svc.stats.actions["soft"]
    w.ce(m, 5)
    assert w.svc.stats.on_retired == 5 and w.svc.stats.actions["soft"] == n
    assert w.store.frame(m).errors == 7


def test_leak_keeps_slow_errors_below_threshold(w):
    m = frames(w.host)["free"]
    w.ce(m, 5, dt=2 * 86400)          # one every two days: 2 / 24h never overflows
    assert w.store.frame(m) is None


def test_uncorrected_error_on_a_pv_frame(w):
    m = frames(w.host)["pv2"]
    inj = w.uc(m)
    assert inj.xen.effect == "crashed" and w.host.domains[1].shutdown_code == SHUTDOWN_crash
    f = w.store.frame(m)
    assert (f.state, f.xen_state, f.action, f.outcome, f.broken) == (
        "pending", "offlining+broken", "hard", "xen-mce", True)
    # more errors and retries never offline it again (PG_OFFLINE_AGAIN would crash the owner)
    w.ce(m, 3)
    for _ in range(5):
        w.clock.t += 86400
        w.svc.process(w.hv, [])
    assert not any("PG_OFFLINE_AGAIN" in l for l in w.host.log)
    assert w.store.frame(m).state == "pending"
    # the toolstack destroys the crashed guest: the frame is freed, Xen offlines it
    w.host.destroy_domain(1)
    w.clock.t += 2 * 86400
    w.svc.process(w.hv, [])
    assert w.state(m) == ("retired", "offlined+broken")
    assert invariants.check(w.host) == []


def test_uncorrected_on_hvm_and_free(w):
    f = frames(w.host)
    assert w.uc(f["hvm"]).xen.effect == "vmce"
    assert w.state(f["hvm"]) == ("pending", "offlining+broken")
    assert w.uc(f["free"]).xen.effect == "offlined"
    assert w.state(f["free"]) == ("retired", "offlined+broken")


def test_account_only(w):
    w.policy.page_action = Action.ACCOUNT
    m = frames(w.host)["free"]
    w.ce(m, 2)
    assert w.state(m) == ("accounted", "") and w.xen(m) == "online"
    assert w.store.boot_option().text == ""


def test_global_off_switch(w):
    m = frames(w.host)["free"]
    w.store.set_switch(False)
    w.ce(m, 3)
    assert w.store.frame(m) is None and w.xen(m) == "online"
    assert w.svc.stats.corrected == 3 and w.store.counts()["events"]["ce"] == 3
    assert w.svc.acct.buckets == {} and w.svc.acct.pages.buckets() == {}
    assert w.svc.acct.pages.events(m) == (3, 0)  # the events are counted, switch or not
    w.store.set_switch(True)
    w.ce(m, 2)
    assert w.state(m) == ("retired", "offlined")


def test_policy_off_switch():
    wo = World(Policy(enabled=False))
    m = frames(wo.host)["free"]
    wo.ce(m, 3)
    wo.uc(frames(wo.host)["dom0"])
    assert wo.store.frames() == [] and not wo.svc.enabled


def test_hard_crashes_a_pv_owner():
    w = World(Policy(page_action=Action.HARD))
    m = frames(w.host)["pv"]
    w.ce(m, 2)
    f = w.store.frame(m)
    assert (f.state, f.xen_state, f.outcome) == ("pending", "offlining+broken", "policy: hard")
    assert w.host.domains[1].shutdown_code == SHUTDOWN_crash


def test_soft_then_hard_escalates_after_soft_attempts():
    w = World(Policy(page_action=Action.SOFT_THEN_HARD, soft_attempts=3, retry_initial=60))
    m = frames(w.host)["granted"]
    w.ce(m, 2)
    assert w.store.frame(m).outcome == "granted" and w.store.frame(m).attempts == 1
    for _ in range(2):
        w.clock.t += 10 ** 5
        w.svc.process(w.hv, [])
    f = w.store.frame(m)
    assert f.outcome.startswith("soft-then-hard") and f.xen_state == "offlining+broken"
    assert w.host.domains[1].shutdown_code == SHUTDOWN_crash


def test_soft_then_hard_waits_on_dom0():
    w = World(Policy(page_action=Action.SOFT_THEN_HARD, soft_attempts=1))
    m = frames(w.host)["dom0"]
    w.ce(m, 2)
    w.clock.t += 10 ** 6
    w.svc.process(w.hv, [])
    assert w.state(m) == ("pending", "offlining")        # dom0 is never hard-offlined
    assert w.svc.stats.actions.get("hard", 0) == 0


def test_retry_backoff(w):
    w.policy.retry_initial, w.policy.retry_max = 60, 500
    m = frames(w.host)["granted"]
    w.ce(m, 2)
    f = w.store.frame(m)
    assert f.next_retry == w.clock.t + 60
    gaps = []
    for _ in range(5):
        w.clock.t = w.store.frame(m).next_retry
        w.svc.process(w.hv, [])
        gaps.append(w.store.frame(m).next_retry - w.clock.t)
    assert gaps == [120, 240, 480, 500, 500]


def test_granted_frame_retired_once_the_grant_ends(w):
    from xenpage.hypervisor import grant_table
    m = frames(w.host)["granted"]
    w.ce(m, 2)
    assert w.state(m) == ("pending", "offlining") and w.store.frame(m).outcome == "granted"
    g = w.host.guests[1]
    ref = next(x["ref"] for x in g.granted if g.mfn(x["pfn"]) == m)
    grant_table.write_entry(w.host, 1, ref, 0, 0, 0)      # the guest ends its grant
    w.clock.t = w.store.frame(m).next_retry
    w.svc.process(w.hv, [])
    assert w.state(m) == ("retired", "offlined") and w.store.frame(m).outcome == "exchanged"
    assert invariants.check(w.host) == []


def test_row_policy_retires_the_whole_row():
    w = World(Policy(page_action=Action.OFF, row_action=Action.SOFT, row=Rate(2, 86400),
                     unit_scope="all"))
    m = frames(w.host)["free"]
    loc = w.mc.geometry.decode(m << 12)
    row = w.mc.geometry.row_mfns(loc)
    w.ce(m, 2)
    for r in row:
        assert w.state(r) == ("retired", "offlined")
    assert len(row) == 2 and w.store.frame([r for r in row if r != m][0]).errors == 0


def test_max_retired(w):
    w.policy.max_retired = 1
    f = frames(w.host)
    w.ce(f["free"], 2)
    w.ce(f["free"] + 2, 2)
    assert w.state(f["free"])[0] == "retired" and w.state(f["free"] + 2)[0] == "accounted"


def test_counts_survive_a_restart(tmp_path):
    store = Store(tmp_path / "r.db")
    w = World(store=store)
    m = frames(w.host)["free"]
    w.ce(m, 1)
    store.close()
    w.store = Store(tmp_path / "r.db")
    w.svc = w.service()
    w.ce(m, 1)
    assert w.state(m) == ("retired", "offlined")


def test_replay_after_reboot_without_badpage(w):
    f = frames(w.host)
    w.ce(f["pv"], 2)
    w.ce(f["free"], 2)
    w.uc(f["pv2"])                       # broken, owner crashed
    w.host = sim_ras.reboot(w.host)      # Xen forgets everything
    w.hv = SimHypervisor(w.host)
    w.mc = sim_ras.SimMachineCheck(w.hv)
    w.svc = w.service()
    assert w.xen(f["pv"]) == "online"
    out = w.svc.replay(w.hv)
    assert out["retired_again"] == 2 and out["pending"] == 1
    for k in ("pv", "free"):
        assert w.xen(f[k]) == "offlined" and w.state(f[k])[0] == "retired"
    # the broken frame is another guest's memory now: replayed soft, never hard
    assert w.svc.stats.actions.get("hard", 0) == 0
    assert not any(d.is_shutting_down for d in w.host.guest_domains())
    assert w.xen(f["pv2"]) == "offlined"
    w.healthy()


def test_replay_after_reboot_with_badpage(w):
    f = frames(w.host)
    for k in ("pv", "dom0", "free"):
        w.ce(f[k], 2)
    opt = w.store.boot_option()
    assert parse_badpage_value(opt.value) == {f["pv"], f["dom0"], f["free"]}
    w.host = sim_ras.reboot(w.host, opt.value)
    w.store.record_boot_option(opt.value)                           # as 'host reboot' does
    w.hv = SimHypervisor(w.host)
    w.svc = w.service()
    decisions = w.store.db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0]
    out = w.svc.replay(w.hv)
    # Xen's command line names them (XENVER_commandline): withheld from the heap since boot,
    # unowned and reported online; the replay offlines nothing (that would only make them
    # offline-pending) -- dom0's frame, pending before, is now out of everybody's reach
    assert out == {"checked": 3, "still_offlined": 0, "withheld": 3, "retired_again": 0, "pending": 0}
    assert w.store.db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == decisions
    for k in ("pv", "dom0", "free"):
        fr = w.store.frame(f[k])
        assert fr.state == "retired"
        assert w.host.ft.owner(f[k]) is None and w.xen(f[k]) == "online"
    assert "badpage" in w.store.frame(f["dom0"]).detail
    assert w.svc.stats.suspends == 0                                # nothing to exchange
    w.healthy()


def test_replay_when_still_offlined_does_nothing(w):
    m = frames(w.host)["free"]
    w.ce(m, 2)
    out = w.svc.replay(w.hv)
    assert out == {"checked": 1, "still_offlined": 1, "withheld": 0, "retired_again": 0, "pending": 0}


def test_action_exception_is_logged_and_retried(w):
    m = frames(w.host)["free"]

    def boom(hv, mfns, **kw):
        raise RuntimeError("backend went away")
    w.svc.offline = boom
    w.ce(m, 2)
    assert w.store.frame(m).state == "pending" and w.svc.stats.errors == 1
    assert any("action-failed" in l and "backend went away" in l for l in w.lines())
    from xenpage.toolstack.offline import mem_offline
    w.svc.offline = mem_offline
    w.clock.t += 10 ** 5
    w.svc.process(w.hv, [])
    assert w.state(m) == ("retired", "offlined")


def test_single_pcpu_host_is_not_forced(w):
    host = build_host(DefaultHostSpec(mem_mib=256, dom0_mib=64, pv_guests=(("pv1", 16),),
                                      hvm_guests=(), pvh_guests=(), nr_pcpus=1))
    w2 = World(host=host)
    m = frames_pv(host)
    w2.ce(m, 2)
    assert w2.store.frame(m).state == "pending" and w2.svc.stats.errors == 1
    assert w2.host.domains[1].pod_lock != "corrupt"


def frames_pv(host):
    g = host.guests[1]
    return g.mfn(g.user_pages("private")[0])


def test_json_log_lines():
    w = World(log_json=True)
    m = frames(w.host)["free"]
    w.ce(m, 2)
    recs = [json.loads(l) for l in w.lines()]
    tr = [r for r in recs if r["event"] == "transition"]
    assert tr and tr[0]["xen"] == "online->offlined" and tr[0]["mfn"] == f"{m:#x}"
    assert tr[0]["time"] == w.clock.t
    assert any(r["event"] == "threshold" for r in recs)


def test_journal_priorities():
    out = io.StringIO()
    log = Log(stream=out, journal=True)
    log("transition", "notice", mfn="0x10")
    log("action-failed", "error", mfn="0x10")
    assert out.getvalue().splitlines() == ["<5>xenpage-retired: transition mfn=0x10",
                                           "<3>xenpage-retired: action-failed mfn=0x10"]
