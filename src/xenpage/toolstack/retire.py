"""Retiring the frames ``mem-offline`` cannot exchange in place the PV way: a translated
(HVM or PVH) guest's -- by live migration (default) or in place with stock hypercalls
(:mod:`.hvm_exchange`) -- and, on request, a PV guest's frames left pending because they are
granted or mapped elsewhere (``--fallback=migrate``).

Migration is the backend's engine, through ``hv.live_migrate`` (libxl's ``xl migrate`` on
real Xen; on the simulator its model of libxc's save/restore): it moves all of the guest's
memory to fresh frames and destroys the old domain, whose offline-pending frames are then
freed and offlined.  The destination is the same host unless one is configured.

On a Xen that misaligns free buddies split around an offlined frame (every 4.17 release:
:mod:`.split_guard`) a pending frame must not be freed by the old domain's destruction:
``relinquish_memory`` frees the domain's pages one by one, and a pending frame whose
neighbours were freed before it is offlined inside a merged free buddy
(``free_heap_pages`` -> ``reserve_offlined_page``), the split that leaves misaligned chunks;
a later merge then builds a "free" chunk over frames in use and Xen hands other guests'
pages out twice.  So the pending mark is taken off first (``online_page`` of an in-use
frame: plain in use again), the guest migrated, and the frame -- free now -- offlined with
its guard frames (:class:`.split_guard.SplitGuard`); a failed migration marks it pending
again.  A broken frame (a machine check's) cannot be onlined and stays pending.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .. import statefiles
from ..abi import sysctl as S
from .guest_type import domain_type
from .hvm_exchange import exchange_hvm_pages
from .hypervisor import CAP_HVM_INPLACE, CAP_MIGRATE
from .journal import crash_point
from .outcomes import Kind, Outcome, Reason
from .pcpu import off_pcpu0
from .split_guard import SplitGuard, split_misaligns

HVM_METHODS = ("migrate", "exchange", "none")
FALLBACKS = (None, "migrate")


@dataclass
class RetireOptions:
    #: how a translated (HVM/PVH) guest's offline-pending frames are retired
    hvm: str = "migrate"
    #: ``"migrate"``: a guest whose frames stay pending (granted / referenced elsewhere) is
    #: live-migrated instead
    fallback: str | None = None
    #: the destination host's toolstack view (a backend); None: the same host
    destination: object | None = None
    #: filled in: what each migration / exchange did (for reports and benchmarks)
    log: list = field(default_factory=list)
    #: mem-offline's open guard frames (:class:`.split_guard.SplitGuard`) and state directory:
    #: a frame freed by a migration is offlined under them
    guard: SplitGuard | None = None
    state_dir: object | None = None
    #: whether frames are kept from being freed pending (mem-offline's ``--no-split-guard``
    #: says no); None: when the backend's Xen misaligns (:func:`.split_guard.split_misaligns`)
    split_guard: bool | None = None


def _status(hv, mfn: int) -> int:
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    return -1 if rc or st is None else int(st[0])


def can_migrate(hv) -> bool:
    return CAP_MIGRATE in hv.capabilities


def can_exchange_in_place(hv) -> bool:
    return CAP_HVM_INPLACE in hv.capabilities


def _summary(r) -> str:
    where = "the same host" if r.same_host else "the destination host"
    parts = [f"live-migrated d{{}} to d{r.new_domid} on {where} ({r.engine})"]
    if r.rounds is not None:
        parts.append(f"{r.rounds} rounds ({r.live_rounds} live"
                     + (f", stopped after {r.stop_reason})" if r.stop_reason else ")"))
    if r.pages_sent is not None:
        parts.append(f"{r.pages_sent} pages sent")
    if r.downtime_s is not None:
        parts.append(f"downtime {r.downtime_s * 1e3:.1f} ms")
    parts.append(f"total {r.total_s:.2f} s")
    return ", ".join(parts)


def migrate_for(hv, domid: int, mfns: list[int], opts: RetireOptions, why: str,
                prev: dict[int, Outcome] | None = None, method: str = "migrate") -> list[Outcome]:
    """Live-migrate ``domid`` (``hv.live_migrate``) so that its frames ``mfns`` are freed;
    one outcome per frame (``prev``: what each frame's outcome was before, kept on failure).
    With a misaligning Xen the frames are not pending while the old domain is destroyed (see
    the module doc)."""
    guarded = opts.split_guard if opts.split_guard is not None else split_misaligns(hv)
    unmarked = _unmark(hv, mfns, opts.state_dir) if guarded else []
    crash_point("migrating", hv)
    r = hv.live_migrate(domid, opts.destination)
    if unmarked:
        crash_point("migrated", hv)
        _remark(hv, unmarked, opts, freed=r.ok)
        _drop_record(opts.state_dir)
    opts.log.append({"domid": domid, "method": method, "mfns": list(mfns), "why": why,
                     "result": r.to_json()})
    where = "the same host" if r.same_host else "the destination host"
    out = []
    summary = {"new_domid": r.new_domid, "same_host": r.same_host, "rounds": r.rounds,
               "live_rounds": r.live_rounds, "pages_sent": r.pages_sent,
               "downtime_s": r.downtime_s, "total_s": r.total_s, "stop_reason": r.stop_reason,
               "engine": r.engine}
    for m in mfns:
        p = (prev or {}).get(m)
        if not r.ok:
            if p is not None:
                out.append(Outcome(m, p.kind, p.reason, f"{p.detail}; live migration failed: {r.error}",
                                   domid=domid, gpfn=p.gpfn, errno=-r.rc))
            else:
                out.append(Outcome(m, Kind.PENDING, Reason.MIGRATION_NEEDED,
                                   f"{why}; live migration to {where} failed: {r.error}; the frame "
                                   "stays offline-pending", domid=domid, errno=-r.rc))
            continue
        st = _status(hv, m)
        done = st >= 0 and bool(st & S.PG_OFFLINE_STATUS_OFFLINED)
        detail = (f"{p.detail}; so " if p is not None else "") + _summary(r).format(domid) + "; " \
            + ("old frame offlined" if done else "old frame not offlined yet")
        reason = Reason.NONE if done else (p.reason if p is not None else Reason.REFERENCED)
        out.append(Outcome(m, Kind.MIGRATED if done else Kind.PENDING, reason, detail, domid=domid,
                           gpfn=p.gpfn if p is not None else None, status=st, extra=dict(summary)))
    return out


#: In the state directory while a migration runs with frames whose pending mark was taken
#: off: those frames, so that ``xenpage recover`` (or the next ``mem-offline``) marks them
#: again if this process dies before it does (:func:`recover_unmarked`).
UNMARKED_RECORD = "migrate-unmarked.json"


def _unmark(hv, mfns: list[int], state_dir=None) -> list[int]:
    """Take the pending mark off the frames (``online_page``: an offlining frame in use
    becomes plainly in use; a broken one cannot be onlined and is left), recording them
    first (fsynced) when there is a state directory.  Returns the frames unmarked."""
    todo = []
    for m in mfns:
        st = _status(hv, m)
        if st >= 0 and st & S.PG_OFFLINE_STATUS_OFFLINE_PENDING and not st & S.PG_OFFLINE_STATUS_BROKEN:
            todo.append(m)
    if todo and state_dir is not None:
        statefiles.state_dir(state_dir)
        statefiles.write_frames(Path(state_dir) / UNMARKED_RECORD, todo)
    return [m for m in todo if hv.page_offline_op(S.sysctl_page_online, m, m)[0] == 0]


def _drop_record(state_dir) -> None:
    if state_dir is not None:
        statefiles.remove_durably(Path(state_dir) / UNMARKED_RECORD)


def recover_unmarked(hv, state_dir) -> list[int]:
    """After a ``mem-offline`` killed while a migration ran with frames unmarked: each
    recorded frame that is neither offlined nor pending now is marked offline again -- under
    guard frames, dom0 off pCPU 0 -- (pending if its guest still has it, offlined if the
    migration freed it); then the record goes.  Returns the frames marked."""
    path = Path(state_dir) / UNMARKED_RECORD
    frames = statefiles.read_frames(path, "record of unmarked frames", "nothing marked")
    if frames is None:
        return []
    done = S.PG_OFFLINE_STATUS_OFFLINED | S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    todo = [m for m in frames if (st := _status(hv, m)) >= 0 and not st & done]
    if todo:
        _remark(hv, todo, RetireOptions(), freed=True)
    statefiles.remove_durably(path)
    return todo


def _remark(hv, mfns: list[int], opts: RetireOptions, freed: bool) -> None:
    """Mark the frames offline again, dom0 off pCPU 0, the highest first: after a migration
    (``freed``) under guard frames -- each is free now (or, in :func:`recover_unmarked`,
    maybe still its guest's: pending then); after a failed one each is the guest's again and
    becomes pending, as it was."""
    guard = opts.guard
    own = guard is None and freed
    if own:
        guard = SplitGuard(hv)
    try:
        with off_pcpu0(hv, record_dir=opts.state_dir):
            if freed:
                guard.protect(mfns)
            for m in sorted(mfns, reverse=True):
                hv.page_offline_op(S.sysctl_page_offline, m, m)
    finally:
        if own:
            guard.release()


def retire_hvm(hv, domid: int, mfns: list[int], opts: RetireOptions | None,
               journal_dir=None) -> list[Outcome]:
    """The translated-guest branch of ``mem-offline``'s owner loop."""
    opts = opts or RetireOptions()
    info = hv.domain_info(domid)
    kind = domain_type(hv, info).upper() if info is not None else "HVM"
    if opts.hvm == "none":
        return [Outcome(m, Kind.PENDING, Reason.MIGRATION_NEEDED,
                        f"d{domid} is an {kind} guest: its frames are retired by live migration; "
                        "the frame stays offline-pending", domid=domid) for m in mfns]
    if opts.hvm == "exchange" and can_exchange_in_place(hv):
        r = exchange_hvm_pages(hv, domid, mfns, journal_dir=journal_dir)
        opts.log.append({"domid": domid, "method": "exchange", "mfns": list(mfns),
                         "downtime_s": r.downtime_s, "type": r.stats.get("type")})
        outs = {o.mfn: o for o in r.outcomes}
        left = [o.mfn for o in r.outcomes if o.kind == Kind.PENDING
                and o.reason in (Reason.REFERENCED, Reason.GRANTED, Reason.NO_HEADROOM)]
        if left and opts.fallback == "migrate" and can_migrate(hv):
            for o in migrate_for(hv, domid, left, opts, "its frames cannot be retired in place",
                                 prev=outs):
                outs[o.mfn] = o
        return [outs[m] for m in mfns]
    if not can_migrate(hv):
        how = "migrate it" if opts.hvm == "migrate" else "retire its frames in place"
        return [Outcome(m, Kind.PENDING, Reason.MIGRATION_NEEDED,
                        f"d{domid} is an {kind} guest and the {hv.kind} backend cannot "
                        f"{how} (use xl migrate); the frame stays offline-pending", domid=domid)
                for m in mfns]
    return migrate_for(hv, domid, mfns, opts, f"d{domid} is an {kind} guest")


#: PV outcomes that a migration can still retire
FALLBACK_REASONS = (Reason.GRANTED, Reason.REFERENCED)


def fallback_pv(hv, outcomes: dict[int, Outcome], opts: RetireOptions | None) -> list[Outcome]:
    """``--fallback=migrate``: PV frames left pending because they are granted or referenced
    elsewhere are retired by live-migrating their guest (one migration per guest)."""
    if opts is None or opts.fallback != "migrate" or not can_migrate(hv):
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
        out += migrate_for(hv, domid, mfns, opts, f"d{domid}'s frames stay pending", prev=outcomes,
                           method="migrate-pv")
    return out
