"""A year in seconds: field-like memory errors replayed against a simulated host's guests,
through the service, on simulated time.

One error trace (:class:`xenpage.backends.sim.field.FieldModel`, fixed seed) is replayed under
each policy on a fresh copy of the same host.  An error whose frame Xen has offlined by then
is *avoided* (nothing uses the frame, nothing reads the bad cell); any other error is
delivered: a corrected one to the service as the record dom0's mcelog would log, an
uncorrected one first through Xen's machine-check handler (which crashes a PV owner; the
guest is then restarted, as ``on_crash=restart`` would) and then to the service.

Reported beside published figures:

* Hwang, Stefanovici, Schroeder, "Cosmic Rays Don't Strike Twice", ASPLOS 2012: retiring a
  page after its first error would avoid up to ~96% of errors (Google/IBM field data);
* Meza, Wu, Kumar, Mutlu, "Revisiting Memory Errors in Large-Scale Production Data
  Centers", DSN 2015: page offlining deployed in production cut the memory error rate by 67%
  (pages that could not be offlined -- in use by the kernel and the like -- are the gap).

The simulated host's counterpart of the gap: dom0's frames are never exchanged (dom0 is not
suspended), and an HVM guest's frames wait for a live migration that a full host has no room
for (``+hvm-exchange``: the in-place retirement with stock hypercalls retires them
without one) -- so their errors keep coming.
"""

from __future__ import annotations

import time as _time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ...abi import mm
from ...abi.xen import SHUTDOWN_crash
from ...ras.service import Log, RetireService
from ...ras.store import Store
from ...ras.thresholds import Policy

#: 2024-01-01 00:00:00 UTC: the simulated year starts here
EPOCH = 1704067200.0
DAY = 86400.0

HWANG_2012 = {"figure": 0.96, "what": "errors avoided by retiring a page after its first error "
              "(upper bound, field data)", "cite": "Hwang et al., ASPLOS 2012"}
MEZA_2015 = {"figure": 0.67, "what": "reduction of the memory error rate by page offlining "
             "in production", "cite": "Meza et al., DSN 2015"}

DEFAULT_POLICIES = ("off", "first-error", "first-error+hvm-exchange", "mcelog", "rasdaemon", "row")


class SimClock:
    def __init__(self, t: float = EPOCH):
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class YearResult:
    name: str
    policy: dict
    days: float
    errors: int = 0
    uncorrected: int = 0
    seen: int = 0
    seen_uncorrected: int = 0
    avoided: int = 0
    avoided_uncorrected: int = 0
    frames_with_errors: int = 0
    retired: int = 0
    pending: int = 0
    failed: int = 0
    pending_by_reason: dict = field(default_factory=dict)
    #: errors delivered, by who had the frame then: dom0, pv, hvm, xen, free
    seen_by_owner: dict = field(default_factory=dict)
    guest_crashes: int = 0
    restart_failures: list = field(default_factory=list)
    vmces: int = 0
    suspended_s: float = 0.0
    suspends: int = 0
    downtime_s: float = 0.0
    migrations: int = 0
    soft_actions: int = 0
    hard_actions: int = 0
    wall_s: float = 0.0
    timeline: dict = field(default_factory=dict)
    boot_option: str = ""

    @property
    def avoided_fraction(self) -> float:
        return self.avoided / self.errors if self.errors else 0.0

    @property
    def memory_lost_kib(self) -> int:
        return 4 * self.retired

    def to_json(self) -> dict:
        d = dict(self.__dict__)
        d["avoided_fraction"] = self.avoided_fraction
        d["memory_lost_kib"] = self.memory_lost_kib
        return d


def year_host_spec():
    """The host of the year: 2 GiB, dom0 384 MiB, two Linux-like PV guests and an HVM guest."""
    from .hypervisor import DefaultHostSpec
    return DefaultHostSpec(mem_mib=2048, dom0_mib=384,
                           pv_guests=(("web", 512), ("db", 512)), hvm_guests=(("win", 384),), pvh_guests=())


def pristine_host(spec=None):
    """A freshly booted simulated host of ``spec`` (copy it: ``copy.deepcopy``)."""
    from . import ras as sim_ras
    return sim_ras.boot(spec or year_host_spec())


def make_trace(spec=None, seed: int = 1, days: float = 365.0, params=None, host=None):
    """The error trace of a year for a host of ``spec``."""
    from . import field as F
    host = host or pristine_host(spec)
    p = replace(params or F.FieldParams(), days=days)
    return F.FieldModel(host, params=p, seed=seed).generate()


def run_year(policy: Policy, name: str = "", trace=None, spec=None, seed: int = 1,
             days: float = 365.0, log: Log | None = None, params=None, host=None) -> YearResult:
    """Replay ``trace`` (or a new one) under ``policy`` on ``host`` (a fresh simulated host
    of ``spec`` by default; it is changed)."""
    from . import ras as sim_ras
    from .hypervisor import SimHypervisor
    spec = spec or year_host_spec()
    if host is None:
        host = pristine_host(spec)
    if trace is None:
        trace = make_trace(spec, seed, days, params, host=host)
    t_wall = _time.perf_counter()
    hv = SimHypervisor(host)
    geometry = trace.geometry
    mc = sim_ras.SimMachineCheck(hv, geometry)
    clock = SimClock(EPOCH)
    store = Store(":memory:")

    def expand(unit: str, rec) -> list[int]:
        loc_row = rec.row if unit == "row" else None
        if loc_row is None:
            return []
        return [geometry.encode(rec.socketid, rec.channel, rec.rank, rec.bankgroup,
                                rec.dram_bank, rec.row, f) for f in range(geometry.row_frames)]

    svc = RetireService(store, policy, clock=clock, hard=sim_ras.hard_offline,
                        log=log or Log(stream=False), expand=expand)
    res = YearResult(name or policy.origin.get("preset", "policy"), policy.to_json(), trace.seconds / DAY)
    res.errors, res.uncorrected = len(trace), int(trace.uc.sum())
    res.frames_with_errors = int(np.unique(trace.mfn).size) if len(trace) else 0
    ndays = int(np.ceil(trace.seconds / DAY))
    tl = {k: np.zeros(ndays + 1) for k in ("retired_kib", "pending", "avoided", "seen",
                                           "avoided_uc", "errors")}
    state_of, offl = host.ft.state, mm.STATE_OFFLINED
    day = 0
    ts, ms, offs, ucs = trace.t.tolist(), trace.mfn.tolist(), trace.offset.tolist(), trace.uc.tolist()

    def sample(d: int) -> None:
        tl["retired_kib"][d] = 4 * len(svc._retired)
        tl["pending"][d] = svc.store.counts()["frames"]["pending"]
        tl["avoided"][d], tl["seen"][d] = res.avoided, res.seen
        tl["avoided_uc"][d], tl["errors"][d] = res.avoided_uncorrected, res.avoided + res.seen

    for i in range(len(ts)):
        t = EPOCH + ts[i]
        while t >= EPOCH + (day + 1) * DAY:
            day += 1
            clock.t = EPOCH + day * DAY
            svc.process(hv, [])
            _restart_crashed(host, res)
            sample(day)
        clock.t = t
        mfn, uc = ms[i], ucs[i]
        if state_of(mfn) == offl:
            res.avoided += 1
            res.avoided_uncorrected += uc
            continue
        res.seen += 1
        who = _owner_kind(host, mfn)
        res.seen_by_owner[who] = res.seen_by_owner.get(who, 0) + 1
        inj = mc.inject(mfn, uncorrected=bool(uc), time=t, offset=offs[i])
        if uc:
            res.seen_uncorrected += 1
            if inj.xen.effect == "vmce":
                res.vmces += 1
        svc.process(hv, [inj.record])
        _restart_crashed(host, res)
    while day < ndays:
        day += 1
        clock.t = EPOCH + day * DAY
        svc.process(hv, [])
        _restart_crashed(host, res)
        sample(day)
    c = store.counts()["frames"]
    res.retired, res.pending, res.failed = c["retired"], c["pending"], c["failed"]
    for f in store.frames(("pending",)):
        res.pending_by_reason[f.outcome or "?"] = res.pending_by_reason.get(f.outcome or "?", 0) + 1
    res.suspended_s, res.suspends = svc.stats.suspended_s, svc.stats.suspends
    res.downtime_s, res.migrations = svc.stats.downtime_s, svc.stats.migrations
    res.soft_actions = svc.stats.actions.get("soft", 0)
    res.hard_actions = svc.stats.actions.get("hard", 0)
    res.timeline = {k: v.tolist() for k, v in tl.items()}
    res.boot_option = store.boot_option().text
    res.wall_s = _time.perf_counter() - t_wall
    store.close()
    return res


def _owner_kind(host, mfn: int) -> str:
    o = int(host.ft.owner1[mfn])
    if not o:
        xs, xe = host.xen_image
        return "xen" if xs <= mfn < xe or mfn in host.anonymous else "free"
    d = host.domains.get(o - 1)
    if d is None or d.is_system:
        return "xen"
    return "dom0" if d.domid == 0 else ("hvm" if d.hvm else "pv")


def _restart_crashed(host, res: YearResult) -> None:
    from . import ras as sim_ras
    for d in list(host.guest_domains()):
        if d.domid and d.is_shutting_down and d.shutdown_code == SHUTDOWN_crash:
            res.guest_crashes += 1
            try:
                sim_ras.restart_domain(host, d.domid, seed=res.guest_crashes + 100)
            except Exception as e:  # e.g. no memory left for it: the guest stays down
                res.restart_failures.append(f"{d.name}: {type(e).__name__}: {e}")


def oracle_first_error(traces) -> float:
    """The Hwang-style bound on these traces: the share of errors that are not the first on
    their frame (every frame retired at its first error, whoever owns it)."""
    traces = traces if isinstance(traces, (list, tuple)) else [traces]
    n = sum(len(t) for t in traces)
    firsts = sum(int(np.unique(t.mfn).size) for t in traces)
    return (n - firsts) / n if n else 0.0


_SUM = ("errors", "uncorrected", "seen", "seen_uncorrected", "avoided", "avoided_uncorrected",
        "frames_with_errors", "retired", "pending", "failed", "guest_crashes", "vmces",
        "suspended_s", "suspends", "downtime_s", "migrations", "soft_actions", "hard_actions", "wall_s")


def _aggregate(name: str, rs: list[YearResult]) -> YearResult:
    agg = YearResult(name, rs[0].policy, rs[0].days)
    for r in rs:
        for k in _SUM:
            setattr(agg, k, getattr(agg, k) + getattr(r, k))
        for k, v in r.pending_by_reason.items():
            agg.pending_by_reason[k] = agg.pending_by_reason.get(k, 0) + v
        agg.restart_failures += r.restart_failures
        for k, v in r.seen_by_owner.items():
            agg.seen_by_owner[k] = agg.seen_by_owner.get(k, 0) + v
        for k, v in r.timeline.items():
            a = agg.timeline.setdefault(k, [0.0] * len(v))
            for i, x in enumerate(v[:len(a)]):
                a[i] += x
    agg.boot_option = rs[-1].boot_option
    return agg


def compare(policies=DEFAULT_POLICIES, seeds=(1,), days: float = 365.0, spec=None,
            params=None, progress=None) -> dict:
    """Each named policy over the same host-years (one error trace per seed, the same host
    booted afresh for every run); results summed over the host-years."""
    import copy
    spec = spec or year_host_spec()
    pristine = pristine_host(spec)
    traces = [make_trace(spec, s, days, params, host=pristine) for s in seeds]
    results, per_host = [], []
    for name in policies:
        pol = Policy.named(name) if isinstance(name, str) else name
        label = name if isinstance(name, str) else pol.origin.get("preset", "custom")
        rs = []
        for s, tr in zip(seeds, traces):
            r = run_year(pol, label, trace=tr, spec=spec, host=copy.deepcopy(pristine))
            rs.append(r)
            per_host.append({"policy": label, "seed": s, **{k: getattr(r, k) for k in _SUM},
                             "avoided_fraction": r.avoided_fraction})
            if progress:
                progress(label, s, r)
        results.append(_aggregate(label, rs))
    faults = [f for t in traces for f in t.faults]
    modes: dict[str, int] = {}
    for f in faults:
        modes[f.mode] = modes.get(f.mode, 0) + 1
    summary = {"hosts": len(traces), "errors": sum(len(t) for t in traces),
               "uncorrected": int(sum(int(t.uc.sum()) for t in traces)),
               "frames": sum(int(np.unique(t.mfn).size) for t in traces),
               "faults": len(faults), "fault_modes": modes,
               "faulty_dimms": sum(len({f.dimm for f in t.faults}) for t in traces)}
    return {"seeds": list(seeds), "days": days, "spec": _spec_json(spec), "trace": summary,
            "oracle_first_error": oracle_first_error(traces),
            "published": {"hwang2012": HWANG_2012, "meza2015": MEZA_2015},
            "results": [r.to_json() for r in results], "per_host": per_host}


def _why_not_avoided(first: dict, tr: dict) -> str:
    """Which frames the first-error policy's remaining errors fell on, and why those frames
    stay in use (a host-year whose errors all fall on them shows 0% avoided)."""
    own = first["seen_by_owner"]
    why = {"dom0": "dom0's (never exchanged: dom0 is not suspended)",
           "hvm": "the HVM guest's (a live migration needs room this host does not have; "
                  "+hvm-exchange retires them in place)",
           "xen": "Xen's own (cannot be offlined)",
           "pv": "PV guests' (errors before or at each frame's first)",
           "free": "free frames' (each frame's first error)"}
    parts = [f"{n} on {why.get(k, k)}" for k, n in sorted(own.items(), key=lambda kv: -kv[1])]
    hint = (" Few host-years vary widely (a year's errors often come from one or two faulty "
            "DIMMs): `xenpage fleet study` gives the distribution over a fleet."
            if tr["hosts"] < 20 else "")
    return "Errors first-error did not avoid: " + ("; ".join(parts) or "none") + "." + hint


def _spec_json(spec) -> dict:
    return {"mem_mib": spec.mem_mib, "dom0_mib": spec.dom0_mib, "pv": list(spec.pv_guests),
            "hvm": list(spec.hvm_guests), "pcpus": spec.nr_pcpus}


def plot(report: dict, path: str | Path) -> Path:
    """Retired memory and avoided errors over the year, one line per policy (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    rs = report["results"]
    peak = max((max(r["timeline"]["retired_kib"] or [0]) for r in rs), default=0)
    unit, div = ("MiB", 1024.0) if peak >= 1024 else ("KiB", 1.0)
    styles = ("-", "--", "-.", ":")
    markers = ("o", "s", "^", "v", "D", "x", "P")
    # policies whose curves are identical share one line and one legend entry (a year on a
    # host whose errors fall on frames no policy can retire leaves several policies at 0)
    for ax, key, lab in ((a1, "retired_kib", None), (a2, "avoided", "avoided")):
        groups: dict[tuple, list] = {}
        for r in rs:
            groups.setdefault(tuple(r["timeline"][key]), []).append(r)
        for gi, (curve, grp) in enumerate(groups.items()):
            i = rs.index(grp[0])
            y = np.array(curve) / (div if key == "retired_kib" else 1.0)
            names = " = ".join(r["name"] for r in grp)
            if lab:
                names += " (" + ", ".join(f"{100 * r['avoided_fraction']:.0f}%" for r in grp[:1]) \
                    + " avoided)"
            ax.plot(np.arange(len(y)), y, label=names, ls=styles[i % len(styles)],
                    marker=markers[i % len(markers)], markevery=max(1, len(y) // 12), ms=4)
    if report["results"]:
        tl = report["results"][0]["timeline"]
        a2.plot(np.arange(len(tl["errors"])), tl["errors"], "k:", label="all errors")
    a1.set_ylabel(f"retired memory ({unit})")
    tr = report["trace"]
    a1.set_title(f"{tr['hosts']} simulated host-years: {tr['errors']} memory errors on "
                 f"{tr['frames']} frames ({tr['uncorrected']} uncorrected)")
    a1.legend(loc="upper left", fontsize=8)
    a2.set_ylabel("errors avoided (cumulative)")
    a2.set_xlabel("day")
    a2.legend(loc="upper left", fontsize=8)
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown(report: dict) -> str:
    """The year as a Markdown table beside the published figures."""
    rs = report["results"]
    tr = report["trace"]
    sp = report["spec"]
    lines = [
        f"{tr['hosts']} host-years of a {sp['mem_mib']} MiB host (dom0 {sp['dom0_mib']} MiB, PV "
        + ", ".join(f"{n} {m} MiB" for n, m in sp["pv"]) + ", HVM "
        + ", ".join(f"{n} {m} MiB" for n, m in sp["hvm"]) + f"): {tr['errors']} errors "
        f"({tr['uncorrected']} uncorrected) on {tr['frames']} frames, from {tr['faults']} faults "
        f"on {tr['faulty_dimms']} DIMMs ("
        + ", ".join(f"{k} {v}" for k, v in sorted(tr["fault_modes"].items())) + ").",
        "",
        "| policy | errors seen (whose frame) | avoided | UE seen | UE avoided | frames retired | "
        "memory lost | pending (why) | guest crashes | vMCEs | PV suspended (n) | HVM downtime (n) "
        "| wall |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rs:
        why = ", ".join(f"{k} {v}" for k, v in sorted(r["pending_by_reason"].items())) or "-"
        owners = ", ".join(f"{k} {v}" for k, v in sorted(r["seen_by_owner"].items(),
                                                           key=lambda kv: -kv[1]))
        lines.append(
            f"| {r['name']} | {r['seen']} ({owners}) | {r['avoided']} ({100 * r['avoided_fraction']:.1f}%) | "
            f"{r['seen_uncorrected']} | {r['avoided_uncorrected']} | {r['retired']} | "
            f"{r['memory_lost_kib']} KiB | {r['pending']} ({why}) | {r['guest_crashes']} | "
            f"{r['vmces']} | {r['suspended_s'] * 1000:.0f} ms ({r['suspends']}) | "
            f"{r['downtime_s'] * 1000:.0f} ms ({r['migrations']}) | {r['wall_s']:.1f} s |")
    first = next((r for r in rs if r["name"] == "first-error"), None)
    lines += ["",
              f"Published: retire-after-first-error avoids up to ~{HWANG_2012['figure']:.0%} of errors "
              f"({HWANG_2012['cite']}); page offlining cut the error rate by "
              f"{MEZA_2015['figure']:.0%} in production ({MEZA_2015['cite']}).",
              f"This trace's bound for retire-after-first-error (every frame retirable): "
              f"{report['oracle_first_error']:.1%}."]
    if first:
        why = ", ".join(f"{k} {v}" for k, v in sorted(first["pending_by_reason"].items())) or "none"
        lines.append(f"xenpage, first-error on the simulated host: {first['avoided_fraction']:.1%} "
                     f"avoided; frames left offline-pending at the end: {why}.")
        lines.append(_why_not_avoided(first, tr))
    lines.append("PV suspended: wall-clock time the simulator kept PV guests suspended for "
                 "exchanges; HVM downtime: the toolstack's modelled pause of live migrations / "
                 "in-place HVM exchanges.")
    return "\n".join(lines) + "\n"
