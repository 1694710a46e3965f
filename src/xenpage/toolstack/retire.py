"""Retiring the frames ``mem-offline`` cannot exchange in place the PV way: an HVM guest's
(live migration by default, or xenpage's in-place HVM exchange) and, on request, a PV
guest's frames left pending because they are granted or mapped elsewhere
(``--fallback=migrate``).

Migrating a guest moves all of its memory to fresh frames and destroys the old domain; its
offline-pending frames are then freed and Xen offlines them.  The destination is the same
host unless one is configured -- and the same host only when it has room for a second copy
of the guest while both exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..abi import sysctl as S
from .hvm_exchange import exchange_hvm_pages
from .hypervisor import CAP_MIGRATE
from .migrate import Link, MigrationCosts, migrate
from .outcomes import Kind, Outcome, Reason

HVM_METHODS = ("migrate", "exchange", "none")
FALLBACKS = (None, "migrate")


@dataclass
class RetireOptions:
    #: how an HVM guest's offline-pending frames are retired
    hvm: str = "migrate"
    #: ``"migrate"``: a PV guest whose frames stay pending (granted / referenced elsewhere)
    #: is live-migrated instead
    fallback: str | None = None
    #: the destination host's toolstack view (a MigrationHypervisor); None: the same host
    destination: object | None = None
    link: Link | None = None
    costs: MigrationCosts | None = None
    #: filled in: what each migration / exchange did (for reports and benchmarks)
    log: list = field(default_factory=list)


def _status(hv, mfn: int) -> int:
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    return -1 if rc or st is None else int(st[0])


def migrate_for(hv, domid: int, mfns: list[int], opts: RetireOptions, why: str) -> list[Outcome]:
    """Live-migrate ``domid`` so that its frames ``mfns`` are freed; one outcome per frame."""
    dst = opts.destination
    res = migrate(hv, domid, dst, link=opts.link, costs=opts.costs)
    opts.log.append({"domid": domid, "method": "migrate", "mfns": list(mfns), "why": why,
                     "result": res.to_json()})
    where = "the same host" if res.same_host else "the destination host"
    if not res.ok:
        reason = Reason.MIGRATION_NEEDED
        return [Outcome(m, Kind.PENDING, reason,
                        f"{why}; live migration to {where} failed: {res.error}; the frame stays "
                        "offline-pending", domid=domid, errno=-res.rc) for m in mfns]
    out = []
    summary = {"new_domid": res.dst_domid, "same_host": res.same_host, "rounds": len(res.rounds),
               "live_rounds": res.live_rounds, "pages_sent": res.pages_sent,
               "downtime_s": res.downtime_s, "total_s": res.total_s, "stop_reason": res.stop_reason,
               "link": res.link, "broken_pfns": res.broken_pfns}
    for m in mfns:
        st = _status(hv, m)
        done = st >= 0 and bool(st & S.PG_OFFLINE_STATUS_OFFLINED)
        detail = (f"live-migrated d{domid} to d{res.dst_domid} on {where}: {len(res.rounds)} rounds "
                  f"({res.live_rounds} live, stopped after {res.stop_reason}), {res.pages_sent} pages sent, "
                  f"downtime {res.downtime_s * 1e3:.1f} ms, total {res.total_s:.2f} s (simulated); "
                  + ("old frame offlined" if done else "old frame not offlined yet"))
        out.append(Outcome(m, Kind.MIGRATED if done else Kind.PENDING,
                           Reason.NONE if done else Reason.REFERENCED, detail, domid=domid,
                           status=st, extra=dict(summary)))
    return out


def _can_migrate(hv) -> bool:
    return CAP_MIGRATE in hv.capabilities


def retire_hvm(hv, domid: int, mfns: list[int], opts: RetireOptions | None) -> list[Outcome]:
    """The HVM branch of ``mem-offline``'s owner loop."""
    opts = opts or RetireOptions()
    if opts.hvm != "none" and not _can_migrate(hv):
        return [Outcome(m, Kind.PENDING, Reason.MIGRATION_NEEDED,
                        f"d{domid} is an HVM guest and the {hv.kind} backend cannot "
                        "migrate it or exchange its frames here (use xl migrate); the frame stays "
                        "offline-pending", domid=domid) for m in mfns]
    if opts.hvm == "none":
        return [Outcome(m, Kind.PENDING, Reason.MIGRATION_NEEDED,
                        f"d{domid} is an HVM guest: its frames are retired by live migration; "
                        "the frame stays offline-pending", domid=domid) for m in mfns]
    if opts.hvm == "exchange":
        r = exchange_hvm_pages(hv, domid, mfns)
        opts.log.append({"domid": domid, "method": "exchange", "mfns": list(mfns),
                         "downtime_s": r.downtime_s})
        outs = {o.mfn: o for o in r.outcomes}
        left = [o.mfn for o in r.outcomes if o.kind == Kind.PENDING and o.reason == Reason.REFERENCED]
        if left and opts.fallback == "migrate":
            for o in migrate_for(hv, domid, left, opts, "mapped by the device model or another domain"):
                outs[o.mfn] = o
        return [outs[m] for m in mfns]
    return migrate_for(hv, domid, mfns, opts, f"d{domid} is an HVM guest")


#: PV outcomes that a migration can still retire
FALLBACK_REASONS = (Reason.GRANTED, Reason.REFERENCED)


def fallback_pv(hv, outcomes: dict[int, Outcome], opts: RetireOptions | None) -> list[Outcome]:
    """``--fallback=migrate``: PV frames left pending because they are granted or referenced
    elsewhere are retired by live-migrating their guest (one migration per guest)."""
    if opts is None or opts.fallback != "migrate" or not _can_migrate(hv):
        return []
    per: dict[int, list[int]] = {}
    for m, o in outcomes.items():
        if o.kind in (Kind.PENDING, Kind.ROLLED_BACK) and o.reason in FALLBACK_REASONS \
                and o.domid is not None and 0 < o.domid:
            per.setdefault(o.domid, []).append(m)
    out: list[Outcome] = []
    for domid, mfns in per.items():
        info = hv.domain_info(domid)
        if info is None or info.hvm:
            continue
        from .migrate_pv import migrate_pv
        res = migrate_pv(hv, domid, opts.destination, link=opts.link, costs=opts.costs)
        opts.log.append({"domid": domid, "method": "migrate-pv", "mfns": list(mfns),
                         "result": res.to_json()})
        for m in mfns:
            prev = outcomes[m]
            if not res.ok:
                out.append(Outcome(m, prev.kind, prev.reason,
                                   f"{prev.detail}; live migration failed: {res.error}",
                                   domid=domid, gpfn=prev.gpfn, errno=-res.rc))
                continue
            st = _status(hv, m)
            done = st >= 0 and bool(st & S.PG_OFFLINE_STATUS_OFFLINED)
            out.append(Outcome(m, Kind.MIGRATED if done else Kind.PENDING,
                               Reason.NONE if done else prev.reason,
                               f"{prev.detail}; so d{domid} was live-migrated to d{res.dst_domid}: "
                               f"downtime {res.downtime_s * 1e3:.1f} ms, total {res.total_s:.2f} s "
                               f"(simulated); " + ("old frame offlined" if done else "old frame still pending"),
                               domid=domid, gpfn=prev.gpfn, status=st,
                               extra={"new_domid": res.dst_domid, "downtime_s": res.downtime_s,
                                      "total_s": res.total_s, "rounds": len(res.rounds)}))
    return out
