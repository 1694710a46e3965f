"""``xenpage mem-offline``: retire frames end to end (``tools/misc/xen-hptool.c``'s flow, done
the way a Linux PV guest can actually be handled).

1. Mark every frame offline (``XEN_SYSCTL_page_offline_op``, from a dom0 vCPU kept off
   physical CPU 0 -- the Xen 4.17 PoD-lock hang).
2. A free frame is offlined at once; Xen pages, anonymous pages, broken-and-owned pages get
   xen-hptool's answers.
3. Frames left offline-pending and owned by a PV guest are grouped per guest: the guest is
   suspended through xenstore ``control/shutdown`` (what Linux PV guests answer -- they
   publish no suspend event channel), all its frames are exchanged under that one suspend
   with one scan of its page tables, and it is fast-resumed.
4. dom0's frames stay pending (dom0 is never suspended).
5. A translated (HVM/PVH) guest's frames are retired by live-migrating the guest (the
   backend's engine, by default to the same host) or, on request, in place with stock
   hypercalls (decrease_reservation + populate_physmap, :mod:`.hvm_exchange`); PV frames left
   pending because they are granted or mapped elsewhere can fall back to migration
   (:mod:`.retire`).

Output keeps xen-hptool's lines for a frame and adds ``xenpage:`` lines where it is silent.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..abi import sysctl as S
from ..abi import xen as X
from . import hptool, journal, prescan
from .hvm_exchange import JournalError as HvmJournalError
from .hvm_exchange import journal_path as hvm_journal_path
from .hvm_exchange import recover as recover_hvm
from .hypervisor import Hypervisor
from .outcomes import Kind, Outcome, Reason
from .pcpu import SinglePcpuHost, off_pcpu0, restore_recorded
from .report import Report
from .retire import RetireOptions, fallback_pv, recover_unmarked, retire_hvm
from .split_guard import SplitGuard, split_misaligns
from .split_guard import recover as recover_guard

SUSPEND_TIMEOUT = 10.0
POLL = 0.05


@dataclass
class OfflineResult:
    report: Report
    outcomes: list[Outcome]
    timings: dict = field(default_factory=dict)


def suspend_guest(hv: Hypervisor, domid: int, timeout: float = SUSPEND_TIMEOUT) -> tuple[bool, bool, str]:
    """Ask a PV guest to suspend itself through xenstore and wait until Xen reports it shut
    down for suspend.  Returns (suspended, we_did_it, message)."""
    info = hv.domain_info(domid)
    if info is None:
        return False, False, f"no domain {domid}"
    if info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend:
        return True, False, "already suspended"
    if info.shutdown:
        return False, False, f"d{domid} is shut down ({X.SHUTDOWN_NAMES.get(info.shutdown_reason)})"
    path = f"/local/domain/{domid}/control/shutdown"
    rc = hv.xs_write(path, "suspend")
    if rc:
        return False, False, f"cannot write {path} ({rc})"
    deadline = time.monotonic() + timeout
    misses = 0
    while True:
        hv.wait(POLL)
        info = hv.domain_info(domid)
        if info is not None and info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend:
            return True, True, ""
        misses = misses + 1 if info is None else 0  # one failed getdomaininfo is no answer
        if time.monotonic() > deadline or misses >= 3:
            hv.xs_write(path, "")
            info = hv.domain_info(domid)
            if info is not None and info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend:
                return True, True, ""  # it did suspend: carry on (and resume it)
            return False, False, (f"d{domid} did not suspend within {timeout:g} s "
                                  "(no answer to control/shutdown)")


def resume_guest(hv: Hypervisor, domid: int, tries: int = 4) -> int:
    for _ in range(tries):  # a guest must not stay suspended because one call failed
        rc = hv.resume(domid, fast=True)
        if rc == 0:
            break
        info = hv.domain_info(domid)
        if info is not None and not (info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend):
            break
    hv.wait(0)
    return rc


def mem_offline(hv: Hypervisor, mfns, suspend_timeout: float = SUSPEND_TIMEOUT,
                hook=None, journal_dir=None, retire: RetireOptions | None = None,
                split_guard: bool | None = None, each: bool = True, summary: bool = False,
                progress=None) -> OfflineResult:
    """``journal_dir`` (the CLI passes the state directory of :mod:`xenpage.paths`, on
    either backend; None: no journal) holds the write-ahead journal of each exchange, the
    split-guard record and the record of dom0's affinity while pinned; what an interrupted
    run left there is recovered first (:mod:`.journal`, :func:`.pcpu.restore_recorded`).
    ``retire``: how HVM guests' frames are retired and whether PV frames left pending fall
    back to migration (default: migrate HVM guests to the same host).
    ``split_guard``: guard frames against Xen 4.17's misaligned buddy split (default: when
    the backend's Xen has that defect; :mod:`.split_guard`).
    ``each``: xen-hptool's lines for every frame (else, for ranges, one summary line and the
    outcomes of the frames that were not simply offlined; :func:`summary_line`).
    ``summary``: with ``each``, the summary line after the frames' lines as well.
    ``progress(n)``: called as the marking answers n more frames (:mod:`.hptool`).

    The frames are handled as arrays: a Python object is made only for a frame whose answer
    needs more than "offlined" (and, with ``each``, for every frame's lines)."""
    t_start = time.perf_counter()
    jdir = journal_dir
    recovered = None
    lock = journal.acquire(jdir) if jdir is not None else None  # released when it is closed
    affinity_back = _restore_affinity(hv, jdir)
    # what an interrupted run left is finished first; if that fails, nothing else is done:
    # another exchange would start a journal over the one that still holds the guest's pages
    stop = None
    if jdir is not None and hvm_journal_path(jdir).exists():
        try:
            hres = recover_hvm(hv, jdir)  # an interrupted in-place retirement (translated guest)
            if not hres.ok:
                stop = ("an interrupted in-place retirement could not be completed: "
                        + "; ".join(hres.errors))
        except HvmJournalError as e:
            stop = str(e)
    if stop is None and jdir is not None and journal.journal_path(jdir).exists():
        try:
            recovered = journal.recover(hv, jdir)
            if not recovered.ok:
                stop = (f"an interrupted exchange of d{recovered.domid} could not be completed: "
                        + "; ".join(recovered.errors))
        except journal.JournalError as e:  # never guess: touch nothing
            stop = str(e)
    order = hptool.first_occurrences(mfns)
    if stop is not None:
        lock.close()
        report = Report(exit_code=2)
        report.err(f"xenpage: {stop}")
        report.err("xenpage: the journal is kept and the guest left as recovery left it; nothing "
                   "else was done: run 'xenpage recover' once the cause is fixed")
        outs = [Outcome(m, Kind.REFUSED, Reason.RECOVERY_NEEDED, stop, errno=0) for m in order.tolist()]
        report.data = {"command": "mem-offline", "outcomes": [o.to_json() for o in outs],
                       "error": stop}
        return OfflineResult(report, outs, {})
    outcomes: dict[int, Outcome] = {}
    owned: dict[int, list[int]] = {}
    # Xen 4.17 misaligns free buddies split around an offlined frame: guard frames first,
    # then the targets from the highest down (split_guard.py); released at the end
    if split_guard is None:
        split_guard = split_misaligns(hv)
    guard = SplitGuard(hv, jdir) if split_guard else None
    guard_back = _recover_guard(hv, jdir)
    remarked = _recover_unmarked(hv, jdir)
    # a frame a migration frees is offlined under the same guard (retire.py); the caller's
    # log list is shared
    retire = replace(retire if retire is not None else RetireOptions(), guard=guard, state_dir=jdir,
                     split_guard=bool(split_guard))
    pin_error: OSError | None = None
    try:
        if guard is not None:
            with off_pcpu0(hv, record_dir=jdir):
                guard.protect(order)
            journal.crash_point("guarded", hv)
        # range sysctls over consecutive runs (or one-frame calls, highest first, when
        # guarded), dom0 pinned off pCPU 0 once
        rcs, sts = hptool.mark_offline_array(hv, order, highest_first=guard is not None,
                                             record_dir=jdir, progress=progress)
    except OSError as e:  # dom0 could not be kept off pCPU 0: nothing marked
        pin_error = e
        rcs = np.full(order.size, -(e.errno or 1), dtype=np.int32)
        sts = np.full(order.size, S.STATUS_UNTOUCHED, dtype=np.uint32)
    # a frame simply offlined needs no object; every other one gets its Outcome
    plain = (rcs == 0) & (sts == S.PG_OFFLINE_OFFLINED)
    special = np.flatnonzero(~plain)
    for m, rc, st in zip(order[special].tolist(), rcs[special].tolist(), sts[special].tolist()):
        outcomes[m] = _classify(m, rc, st)
        if hptool.is_owned_pending(rc, st):
            owned.setdefault(hptool.owner_of(st), []).append(m)
    timings: dict = {"mark_s": time.perf_counter() - t_start, "guests": {}}
    held = None  # set when a group's journal could not be closed: later PV groups wait
    stopped = None  # set when a state file or memory failed: said on one line, exit 2
    for domid, group in owned.items():
        info = hv.domain_info(domid)
        if info is not None and info.dying:
            # a zombie: nothing to suspend or migrate; Xen offlines the frame when it frees it
            for m in group:
                outcomes[m] = dying(m, domid)
            continue
        if info is not None and info.hvm and 0 < domid < X.DOMID_FIRST_RESERVED:
            # HVM: live migration or in-place exchange (retire.py)
            t0 = time.perf_counter()
            for o in retire_hvm(hv, domid, group, retire, journal_dir=jdir):
                outcomes[o.mfn] = o
            timings.setdefault("hvm", {})[domid] = {"pages": len(group),
                                                    "toolstack_s": time.perf_counter() - t0}
            continue
        if domid == 0 or domid >= X.DOMID_FIRST_RESERVED or info is None or info.hvm:
            for m in group:
                outcomes[m] = _not_exchangeable(m, domid, info)
            continue
        if held is not None:
            for m in group:
                outcomes[m] = Outcome(m, Kind.PENDING, Reason.RECOVERY_NEEDED if jn_kept(jdir)
                                      else Reason.EXCHANGE_FAILED, held, domid=domid)
            continue
        # while the guest still runs: log-dirty on, survey (its P2M, every frame's type) and
        # scan; under the suspend only what it dirtied is looked at again (prescan.py)
        jn = journal.Journal(hv, jdir) if jdir is not None else None
        pre = None
        failure = None
        try:
            ts = time.perf_counter()
            pre = prescan.start(hv, domid, group)
            t0 = time.perf_counter()
            was = bool(info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend)
            if jn:
                jn.begin(domid, group, was)
            ok, ours, msg = suspend_guest(hv, domid, suspend_timeout)
            t1 = time.perf_counter()
            if not ok:
                prescan.stop(pre)
                for m in group:
                    outcomes[m] = Outcome(m, Kind.PENDING, Reason.SUSPEND_FAILED, msg, domid=domid)
                if jn:
                    jn.end()
                continue
            if jn:
                jn.step("suspended")
            step_hook = _hooks(hook, jn.hook if jn else None)
            res = prescan.exchange(pre, group, hook=step_hook)
            t2 = time.perf_counter()
            broken = any(o.kind == Kind.FAILED for o in res)
            # an exchange that could not be completed leaves the guest suspended (its memory
            # is not whole): 'xenpage recover' finishes it from the journal and resumes it
            rrc = resume_guest(hv, domid) if ours and not broken else 0
            if jn and not broken:
                jn.step("resumed")
                if rrc == 0:
                    jn.end()
            t3 = time.perf_counter()
        except MemoryError:
            failure = "out of memory"
        except SystemError as e:  # what numpy and CPython raise when memory runs out in C
            failure = f"out of memory ({type(e).__name__}: {e})"
        except OSError as e:  # a state file (journal, saved host) could not be written
            failure = journal.describe_os_error(e)
        if failure is not None:
            # the frames of the exception are gone (the memory they held is free again):
            # roll back or forward in this process from this run's records
            held = stopped = _salvage(hv, jn, pre, domid, group, failure, outcomes)
            continue
        if jn and jn.path.exists():
            held = (f"the exchange of d{domid} in this run could not be completed (its journal is "
                    "kept for 'xenpage recover'): no other guest is exchanged until it is")
        for o in res:
            outcomes[o.mfn] = o
        timings["guests"][domid] = {"pages": len(group), "survey_s": t0 - ts, "suspend_s": t1 - t0,
                                    "toolstack_s": t2 - t1, "resume_s": t3 - t2,
                                    "suspended_s": (t3 - t0) if ours else None,
                                    "resume_rc": rrc, "prescan": pre.stats}
    for o in fallback_pv(hv, outcomes, retire):  # --fallback=migrate (retire.py)
        outcomes[o.mfn] = o
    if guard is not None:
        guard.release()
        timings["split_guard"] = guard.summary()
    if guard_back:
        timings["split_guard_recovered"] = guard_back
    if remarked:
        timings["unmarked_frames_marked_again"] = remarked
    if affinity_back:
        timings["dom0_affinity_restored"] = {str(v): c for v, c in affinity_back.items()}
    timings["total_s"] = time.perf_counter() - t_start
    report = Report()
    if recovered is not None:
        for line in recovered.lines():
            report.err(line)

    def outcome(i: int, m: int) -> Outcome:
        o = outcomes.get(m)
        return o if o is not None else Outcome(m, Kind.OFFLINED, status=int(sts[i]), detail="offlined",
                                               status_op=S.sysctl_page_offline)

    counts = {"offlined": int(plain.sum())}
    detail: dict[str, dict[str, int]] = {}
    for m in order[special].tolist():
        o = outcomes[m]
        counts[o.kind.value] = counts.get(o.kind.value, 0) + 1
        if o.reason.value:
            d = detail.setdefault(o.kind.value, {})
            d[o.reason.value] = d.get(o.reason.value, 0) + 1
    if each:
        all_outcomes = [outcome(i, m) for i, m in enumerate(order.tolist())]
        for i, (m, o) in enumerate(zip(order.tolist(), all_outcomes)):
            rc, st = int(rcs[i]), int(sts[i])
            if pin_error is not None:
                r = Report(exit_code=1)
                r.out(f"Prepare to offline MEMORY mfn {m:x}")
                r.err(f"xenpage: {pin_error.strerror or pin_error}; mfn {m:x} not offlined")
            else:
                r = hptool.offline_report(m, rc, st)
            report.lines.extend(r.lines)
            _explain(report, m, rc, st, o)
            if not _exit_ok(rc, st, o):
                report.exit_code = 1
        if summary:
            report.out(summary_line(order.size, counts, detail))
        report.data = {"command": "mem-offline", "outcomes": [o.to_json() for o in all_outcomes],
                       "timings": timings}
        if summary:
            report.data["summary"] = {"counts": counts, "reasons": detail}
    else:
        if pin_error is not None:
            report.err(f"xenpage: {pin_error.strerror or pin_error}; nothing offlined")
        for m, rc, st in zip(order[special].tolist(), rcs[special].tolist(), sts[special].tolist()):
            if not _exit_ok(rc, st, outcomes[m]):
                report.exit_code = 1
        report.out(summary_line(order.size, counts, detail))
        all_outcomes = [outcomes[m] for m in order[special].tolist()]
        report.data = {"command": "mem-offline", "frames": int(order.size),
                       "summary": {"counts": counts, "reasons": detail},
                       "offlined_runs": _runs_of(order[plain]),
                       "outcomes": [o.to_json() for o in all_outcomes],
                       "timings": timings}
    if stopped is not None:
        report.err(f"xenpage: {stopped}")
        report.exit_code = 2
        report.data["error"] = stopped
    if lock is not None:
        lock.close()
    return OfflineResult(report, all_outcomes, timings)


def summary_line(n: int, counts: dict[str, int], reasons: dict[str, dict[str, int]]) -> str:
    """One line for a command over many frames: frames per outcome, and why."""
    parts = []
    for kind in [k.value for k in Kind]:
        c = counts.get(kind, 0)
        if not c:
            continue
        why = reasons.get(kind)
        parts.append(f"{c} {kind}" + (" (" + ", ".join(f"{r}: {v}" for r, v in sorted(why.items()))
                                       + ")" if why else ""))
    return (f"xenpage: mem-offline of {n} frame{'s' if n != 1 else ''}: "
            + (", ".join(parts) or "nothing done"))


def _runs_of(mfns: np.ndarray) -> list[list[int]]:
    """``[[first, last], ...]``: the runs of consecutive MFNs of an array, in its order."""
    if mfns.size == 0:
        return []
    cut = np.flatnonzero(np.diff(mfns) != 1) + 1
    return [[int(mfns[a]), int(mfns[b - 1])] for a, b in zip(np.r_[0, cut].tolist(),
                                                           np.r_[cut, mfns.size].tolist())]


def _salvage(hv: Hypervisor, jn, pre, domid: int, group: list[int], failure: str,
             outcomes: dict[int, Outcome]) -> str:
    """A state file could not be written (disk full, quota, I/O error) or memory ran out in
    the middle of the exchange of ``domid``'s ``group``: complete or roll it back now
    (:meth:`.journal.Journal.salvage`), resume the guest, and return the one line that says
    what happened (later guests are not exchanged in this run)."""
    if pre is not None:
        try:
            prescan.stop(pre)
        except (MemoryError, SystemError, OSError):
            pass  # the salvage below still runs; log-dirty left on loses nothing
    if jn is None:
        rec = journal.Recovery(errors=["no journal to recover from"])
    else:
        rec = jn.salvage()
    # what is done for good: groups whose 'done' record is durable, and -- once this recovery
    # is durable too -- the rest it completed
    done = {int(o): (int(g), int(n)) for o, g, _, n in (jn.finished if jn is not None else [])}
    if rec.ok:
        done.update({int(o): (int(g), int(n)) for o, g, _, n in jn.closing})
        done.update({c["mfn"]: (c["gpfn"], c["new_mfn"]) for c in rec.completed})
    for m in group:
        if m in done:
            g, n = done[m]
            outcomes[m] = Outcome(m, Kind.EXCHANGED, Reason.NONE,
                                  f"exchanged: gpfn {g:#x} now at mfn {n:#x}; then {failure}",
                                  domid=domid, gpfn=g, new_mfn=n, extra={"then": failure})
        elif rec.ok:
            outcomes[m] = Outcome(m, Kind.PENDING, Reason.EXCHANGE_FAILED,
                                  f"the exchange was stopped ({failure}) and rolled back: the frame "
                                  "stays offline-pending, the guest's memory as it was", domid=domid)
        else:
            outcomes[m] = Outcome(m, Kind.PENDING, Reason.RECOVERY_NEEDED,
                                  f"the exchange was stopped ({failure}) and is left for "
                                  "'xenpage recover'", domid=domid)
    if rec.ok:
        moved = sum(1 for m in group if m in done)
        return (f"d{domid}'s exchange stopped: {failure}; {moved} frame(s) exchanged and "
                f"{len(group) - moved} rolled back in this process, the guest's memory whole"
                f"{' and the guest resumed' if rec.resumed else ''}; no other guest exchanged "
                "in this run")
    return (f"d{domid}'s exchange stopped: {failure}; it could not be finished in this process "
            f"({'; '.join(rec.errors)}): the journal is kept -- run 'xenpage recover' once there "
            "is space (or memory) again")


def jn_kept(jdir) -> bool:
    """A journal is left in ``jdir`` for 'xenpage recover'."""
    return jdir is not None and journal.journal_path(jdir).exists()


def _restore_affinity(hv: Hypervisor, jdir) -> dict[int, list[int]]:
    """dom0's vCPU affinity a killed mem-offline left pinned off pCPU 0 goes back first."""
    if jdir is None:
        return {}
    try:
        return restore_recorded(hv, jdir)
    except (ValueError, OSError):  # left for 'xenpage recover' to report
        return {}


def _recover_guard(hv: Hypervisor, jdir) -> list[int]:
    """Guard frames a killed mem-offline left offline go back first (split_guard.recover)."""
    if jdir is None:
        return []
    try:
        return recover_guard(hv, jdir)
    except ValueError:  # an unreadable record is left for 'xenpage recover' to report
        return []


def _recover_unmarked(hv: Hypervisor, jdir) -> list[int]:
    """Frames a killed mem-offline left unmarked around a migration are marked again first
    (retire.recover_unmarked)."""
    if jdir is None:
        return []
    try:
        return recover_unmarked(hv, jdir)
    except (ValueError, OSError, SinglePcpuHost):  # left for 'xenpage recover' to report
        return []


def _classify(mfn: int, rc: int, st: int) -> Outcome:
    low = st & S.PG_OFFLINE_STATUS_MASK
    if rc < 0:
        if rc == -1:
            return Outcome(mfn, Kind.REFUSED, Reason.XEN_IMAGE, "a frame of Xen's own image", status=st, status_op=S.sysctl_page_offline, errno=1)
        if st == S.STATUS_UNTOUCHED:
            return Outcome(mfn, Kind.REFUSED, Reason.INVALID_MFN, "no such frame (beyond the frame table or in a hole)",
                           status=st, status_op=S.sysctl_page_offline, errno=-rc)
        return Outcome(mfn, Kind.REFUSED, Reason.NOT_RAM, "not conventional RAM (E820)", status=st, status_op=S.sysctl_page_offline, errno=-rc)
    if low == S.PG_OFFLINE_OFFLINED:
        return Outcome(mfn, Kind.OFFLINED, status=st, status_op=S.sysctl_page_offline, detail="offlined")
    if low == S.PG_OFFLINE_AGAIN:
        return Outcome(mfn, Kind.PENDING, Reason.OWNER_CRASHED,
                       "already broken and still owned: Xen crashed the owner (PG_OFFLINE_AGAIN)", status=st, status_op=S.sysctl_page_offline)
    if low == S.PG_OFFLINE_FAILED:
        return Outcome(mfn, Kind.PENDING, Reason.ANONYMOUS,
                       "an anonymous Xen allocation: Xen reports FAILED but marked it offline-pending; "
                       "it is offlined when Xen frees it", status=st, status_op=S.sysctl_page_offline)
    if st & S.PG_OFFLINE_XENPAGE:
        return Outcome(mfn, Kind.PENDING, Reason.XEN_HEAP,
                       "a Xen-heap page: offline-pending until Xen frees it", status=st, status_op=S.sysctl_page_offline, domid=X.DOMID_XEN)
    return Outcome(mfn, Kind.PENDING, Reason.NONE, "offline-pending", status=st, status_op=S.sysctl_page_offline,
                   domid=hptool.owner_of(st))


def dying(mfn: int, domid: int) -> Outcome:
    """The frame of a dying domain (``XEN_DOMINF_dying``: destroyed, but something -- a
    backend's grant map, a dom0 process's foreign mapping -- still references its pages): it
    stays offline-pending, and Xen's free path offlines it when the last reference goes."""
    return Outcome(mfn, Kind.PENDING, Reason.DYING,
                   f"owner d{domid} is dying; offlined when its last reference goes", domid=domid)


def _not_exchangeable(mfn: int, domid: int, info) -> Outcome:
    if domid == 0:
        return Outcome(mfn, Kind.PENDING, Reason.DOM0,
                       "dom0 is never suspended: the frame stays offline-pending until dom0 frees it",
                       domid=0)
    if domid >= X.DOMID_FIRST_RESERVED:
        return Outcome(mfn, Kind.PENDING, Reason.SYSTEM_DOMAIN,
                       f"owned by a Xen system domain (DOM{domid}): it stays offline-pending", domid=domid)
    if info is None:
        return Outcome(mfn, Kind.PENDING, Reason.NO_DOMAIN, f"owner d{domid} went away", domid=domid)
    return Outcome(mfn, Kind.PENDING, Reason.MIGRATION_NEEDED,
                   f"d{domid} is an HVM guest: its frames are retired by live migration; "
                   "the frame stays offline-pending", domid=domid)


def _exit_ok(rc: int, st: int, o: Outcome) -> bool:
    if rc < 0:
        return False
    low = st & S.PG_OFFLINE_STATUS_MASK
    if low == S.PG_OFFLINE_OFFLINED or low == S.PG_OFFLINE_AGAIN:
        return True
    if low == S.PG_OFFLINE_FAILED or st & S.PG_OFFLINE_XENPAGE:
        return False
    if low == S.PG_OFFLINE_PENDING and st & S.PG_OFFLINE_OWNED:
        return o.kind in (Kind.EXCHANGED, Kind.MIGRATED)
    return True


def _explain(r: Report, mfn: int, rc: int, st: int, o: Outcome) -> None:
    """xen-hptool's lines for the owner handling, then what xen-hptool does not say."""
    if rc < 0 or not hptool.is_owned_pending(rc, st):
        if o.kind == Kind.PENDING and o.reason == Reason.OWNER_CRASHED:
            r.err(f"xenpage: mfn {mfn:x}: {o.detail}")
        elif o.reason in (Reason.ANONYMOUS, Reason.XEN_HEAP):
            r.err(f"xenpage: mfn {mfn:x}: {o.detail}")
        return
    domid = hptool.owner_of(st)
    if o.reason in (Reason.DOM0, Reason.SYSTEM_DOMAIN, Reason.MIGRATION_NEEDED, Reason.NO_DOMAIN,
                    Reason.DYING):
        hptool.suspend_port_failure(r, domid, mfn)
        r.err(f"xenpage: mfn {mfn:x}: {o.detail}")
        return
    if o.reason == Reason.SUSPEND_FAILED:
        r.err(f"Failed to suspend guest {domid} for mfn {mfn:x}")
        r.err(f"xenpage: {o.detail}")
        return
    if o.kind in (Kind.EXCHANGED, Kind.MIGRATED):
        r.out(f"Memory mfn {mfn:x} offlined successfully, this page is DOM{domid} page and being swapped "
              "successfully, current state is [PG_OFFLINE_OFFLINED, PG_OFFLINE_OWNED]")
        if o.kind == Kind.MIGRATED:  # retire.py
            r.out(f"xenpage: mfn {mfn:x}: {o.detail}")
        elif "moved" in o.extra:  # a translated guest's, retired in place (hvm_exchange.py)
            to = f"mfn {o.new_mfn:#x}" if o.new_mfn is not None else "a fresh frame"
            r.out(f"xenpage: d{domid} gfn {o.gpfn:#x} moved from mfn {mfn:#x} to {to} in place "
                  f"(decrease_reservation + populate_physmap, guest paused "
                  f"{o.extra['downtime_s'] * 1e6:.0f} us); old frame offlined")
        elif "then" in o.extra:  # completed after a failed write or memory ran out (_salvage)
            r.out(f"xenpage: d{domid} gpfn {o.gpfn:#x} moved from mfn {mfn:#x} to mfn "
                  f"{o.new_mfn:#x}; old frame offlined")
        else:
            r.out(f"xenpage: d{domid} gpfn {o.gpfn:#x} moved from mfn {mfn:#x} to mfn {o.new_mfn:#x}; "
                  f"{o.ptes} page-table entries re-pointed with their flags; old frame offlined")
        return
    r.err(f"Memory mfn {mfn:x} offlined successfully , this page is DOM{domid} page yet failed to be "
          "exchanged. current state is [PG_OFFLINE_PENDING, PG_OFFLINE_OWNED]")
    r.err(f"xenpage: mfn {mfn:x}: {o.kind.value} ({o.reason.value}): {o.detail}")


def _hooks(*hooks):
    hs = [h for h in hooks if h is not None]
    if not hs:
        return None

    def hook(step, **info):
        for h in hs:
            h(step, **info)
    return hook
