"""In-place exchange of an HVM guest's offline-pending frames, without migrating it --
beyond the seed, which could only migrate (and beyond Xen 4.17, which has no interface for
it: this uses xenpage's own ``XEN_DOMCTL_xenpage_exchange_gfn``, see
:mod:`xenpage.hypervisor.p2m_exchange`).

For a batch of frames of one guest:

1. checks: the guest exists, is HVM and alive; each frame is offline-pending; the M2P names
   a gfn whose p2m entry names the frame back (``hvm_p2m``, also xenpage's extension);
2. pause the guest (all its vCPUs descheduled: nothing can touch the page while it moves);
3. per frame, the hypervisor pauses nothing more, checks again, allocates the new frame and
   any EPT tables a superpage split needs, then copies the page, swaps the p2m entry,
   flushes the EPT and frees the old frame (which the allocator then offlines) -- all or
   nothing: an error leaves that frame exactly as it was (a frame the device model or
   another domain maps: -EBUSY, it stays pending);
4. unpause (always; retried), and confirm each old frame is offlined.

The guest is stopped for microseconds (a pause, a 4 KiB copy, one or two table splits, an
EPT flush, an unpause) instead of the hundreds of milliseconds of a migration's downtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..abi import errno as E
from ..abi import hvm as H
from ..abi import sysctl as S
from ..abi import xen as X
from .hypervisor import MigrationHypervisor
from .outcomes import Kind, Outcome, Reason, not_pending

UNPAUSE_RETRIES = 3


@dataclass
class HvmExchangeResult:
    outcomes: list[Outcome]
    #: simulated (or real) time the guest was paused
    downtime_s: float = 0.0
    paused: bool = False
    wall_s: float = 0.0
    stats: dict = field(default_factory=dict)


def _status(hv, mfn: int) -> int:
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    return -1 if rc or st is None else int(st[0])


def exchange_hvm_pages(hv: MigrationHypervisor, domid: int, mfns: list[int],
                       hook=None) -> HvmExchangeResult:
    """Exchange each of ``mfns`` (offline-pending frames of HVM guest ``domid``) in place.
    ``hook(step, **info)`` runs between steps (fault injection)."""
    hook = hook or (lambda step, **kw: None)
    wall0 = time.perf_counter()
    mfns = [int(m) for m in mfns]
    info = hv.domain_info(domid)

    def all_(kind, reason, detail, **kw):
        return HvmExchangeResult([Outcome(m, kind, reason, detail, domid=domid, **kw) for m in mfns])

    if info is None:
        return all_(Kind.REFUSED, Reason.NO_DOMAIN, f"no domain {domid}")
    if not info.hvm:
        return all_(Kind.REFUSED, Reason.NONE, f"d{domid} is a PV guest (use the PV exchange)")
    if info.dying:
        return all_(Kind.REFUSED, Reason.NO_DOMAIN, f"d{domid} is dying")
    out: dict[int, Outcome] = {}
    cand: list[tuple[int, int, int, int]] = []  # (mfn, gfn, p2m type, order)
    m2p = hv.m2p(np.array(mfns, dtype=np.int64))
    for mfn, g in zip(mfns, m2p.tolist()):
        st = _status(hv, mfn)
        refusal = not_pending(mfn, st, domid)
        if refusal is not None:
            out[mfn] = refusal
            continue
        rc, pm, pt, po = (-E.EINVAL, None, None, None) if g == X.INVALID_M2P_ENTRY \
            else hv.hvm_p2m(domid, [g])
        if rc or int(pm[0]) != mfn:
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.M2P_MISMATCH,
                               f"M2P names gfn {g:#x}, whose p2m entry does not name this frame",
                               domid=domid, status=st, errno=-rc if rc else 0)
            continue
        t = int(pt[0])
        if t == H.p2m_ram_broken or st & S.PG_OFFLINE_STATUS_BROKEN:
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.BROKEN,
                               "the frame is broken (machine check): its content is lost, the guest "
                               "was told; it is offlined when the guest frees it or migrates",
                               domid=domid, gpfn=g, status=st)
            continue
        if t not in H.P2M_WRITABLE:
            out[mfn] = Outcome(mfn, Kind.REFUSED, Reason.M2P_MISMATCH,
                               f"gfn {g:#x} is {H.P2M_TYPE_NAMES.get(t, t)}, not guest RAM",
                               domid=domid, gpfn=g, status=st)
            continue
        cand.append((mfn, g, t, int(po[0])))
    res = HvmExchangeResult([])
    if cand:
        hook("checked", cand=cand)
        t0 = hv.now()
        rc = hv.pause(domid)
        if rc:
            for mfn, g, t, o in cand:
                out[mfn] = Outcome(mfn, Kind.PENDING, Reason.SUSPEND_FAILED,
                                   f"pausing d{domid} failed ({E.name(rc)})", domid=domid, gpfn=g, errno=-rc)
            cand = []
        else:
            res.paused = True
        try:
            for mfn, g, t, o in cand:
                hook("before-exchange", mfn=mfn, gfn=g)
                rc, new = hv.hvm_exchange_gfn(domid, g, mfn)
                if rc == -E.EBUSY:
                    out[mfn] = Outcome(mfn, Kind.PENDING, Reason.REFERENCED,
                                       "mapped by the device model or another domain (the frame holds "
                                       "more than its allocation reference): it stays pending",
                                       domid=domid, gpfn=g, errno=-rc)
                elif rc:
                    out[mfn] = Outcome(mfn, Kind.ROLLED_BACK, Reason.EXCHANGE_FAILED,
                                       f"the p2m exchange failed ({E.name(rc)}); nothing changed",
                                       domid=domid, gpfn=g, errno=-rc)
                else:
                    out[mfn] = Outcome(mfn, Kind.EXCHANGED, Reason.NONE,
                                       f"exchanged in place: gfn {g:#x} now at mfn {new:#x}",
                                       domid=domid, gpfn=g, new_mfn=new,
                                       extra={"order_before": o, "p2m_type": H.P2M_TYPE_NAMES.get(t, t)})
                hook("after-exchange", mfn=mfn, rc=rc)
        finally:
            if res.paused:
                for _ in range(UNPAUSE_RETRIES):
                    if hv.unpause(domid) == 0:
                        break
                else:
                    res.stats["unpause_failed"] = True
                res.downtime_s = hv.now() - t0
    for mfn, o in out.items():
        if o.kind == Kind.EXCHANGED:
            st = _status(hv, mfn)
            o.status = st
            o.extra["offlined"] = st >= 0 and bool(st & S.PG_OFFLINE_STATUS_OFFLINED)
            o.extra["downtime_s"] = res.downtime_s
            if res.stats.get("unpause_failed"):
                o.kind, o.reason = Kind.FAILED, Reason.RESTORE_FAILED
                o.detail += f"; but d{domid} could not be unpaused"
    res.outcomes = [out[m] for m in mfns]
    res.wall_s = time.perf_counter() - wall0
    return res
