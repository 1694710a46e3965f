"""The simulator's migration engine: a model of pre-copy live migration as ``xl migrate``
does it with Xen 4.17's libxenguest (``tools/libs/guest/xg_sr_save.c`` /
``xg_sr_restore.c``, driven by libxl), over the simulated hosts' save/restore calls
(:class:`SaveRestoreHypervisor`, what libxc uses on both ends).  The toolstack never runs it:
it calls ``hv.live_migrate`` (``Hypervisor`` protocol), which on the simulator runs this
model (engine ``"sim"``) and on real Xen runs libxl (engine ``"libxl"``).

Save side (``send_domain_memory_live``):

1. log-dirty on (``XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY``; if that fails, OFF then ENABLE);
2. the pre-copy loop with ``simple_precopy_policy``: round 1 sends every pfn, each later
   round the pfns the guest dirtied during the previous one (``SHADOW_OP_CLEAN``), while the
   guest keeps running; the loop stops once fewer than 50 pages were dirty or 5 rounds have
   run -- so a guest that dirties memory faster than the link can carry is stopped and copied
   after the fifth round whatever happens;
3. suspend (an HVM guest without PV drivers: ``xc_domain_shutdown(SHUTDOWN_suspend)``),
   a final CLEAN, and the pages dirtied since the last one go while it is stopped;
4. the HVM context, HVM params and the device model's state, then END.

Pages go in PAGE_DATA records of at most 1024 pfns, each pfn with its page type
(``getpageframeinfo3``); pages of type BROKEN (their frame was hit by a machine check), XTAB
(nothing mapped) or XALLOC carry no data and are never copied -- the restorer does not even
populate them, so a gfn lost to a broken frame stays a hole in the new guest, and travels as
such (XTAB) in every later migration.

Restore side (``process_page_data``): the new domain is created empty and paused; each pfn
with data is populated at 4 KiB (``XENMEM_populate_physmap``; a restored guest loses its
superpages) and its page copied in.  After END: the HVM context, then libxl renames both
domains, unpauses the new one and destroys the old one -- whose offline-pending frames are
then freed and become offlined.  Destination may be another host or the same one.

Time is simulated with a :class:`Link` (bandwidth, latency): while a batch is on the wire
the source guest runs (``hv.wait``) and dirties pages at its own rate.  The downtime runs from
the suspend to the unpause on the destination: suspending, the last round, the context
records, the latency of the last byte, libxl's ready/go handshake and the destination's
resume (:class:`MigrationCosts`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import numpy as np

from ...abi import domctl as D
from ...abi import errno as E
from ...abi import hvm as H
from ...abi import xen as X
from ...toolstack.hypervisor import MigrationHypervisor, MigrationReport


class SaveRestoreHypervisor(MigrationHypervisor, Protocol):
    """The calls libxc's save/restore makes on each end, beyond the toolstack's protocol."""

    def shutdown_domain(self, domid: int, reason: int) -> int:
        """``xc_domain_shutdown`` (``SCHEDOP_remote_shutdown``): how libxl suspends an HVM
        guest without PV drivers (reason ``SHUTDOWN_suspend``)."""
        ...

    def maximum_gpfn(self, domid: int) -> int:
        """``XENMEM_maximum_gpfn``: the highest gfn in the guest's physmap (-errno)."""
        ...

    def logdirty_control(self, domid: int, op: int, pages: int = 0, mode: int = 0): ...

    def domain_create(self, name: str, hvm: bool, max_pages: int, vcpus: int = 1
                      ) -> tuple[int, int]: ...

    def set_domain_name(self, domid: int, name: str) -> int: ...

    def hvm_getcontext(self, domid: int) -> tuple[int, object]: ...

    def hvm_setcontext(self, domid: int, ctx: object) -> int: ...

    def vcpu_getcontext(self, domid: int) -> tuple[int, object]: ...

    def vcpu_setcontext(self, domid: int, ctx: object) -> int: ...

NO_DATA_TYPES = (D.XEN_DOMCTL_PFINFO_XTAB, D.XEN_DOMCTL_PFINFO_BROKEN, D.XEN_DOMCTL_PFINFO_XALLOC)
PAGE_BYTES = 4096


@dataclass(frozen=True)
class Link:
    """A network path between the two toolstacks."""

    bandwidth_bps: float = 1e9
    latency_s: float = 100e-6
    name: str = "1 Gbit/s LAN"

    def seconds(self, nbytes: int) -> float:
        return nbytes * 8.0 / self.bandwidth_bps

    @property
    def pages_per_second(self) -> float:
        return self.bandwidth_bps / 8.0 / PAGE_BYTES


GIGABIT = Link()
#: ``xl migrate`` to the same host (through ssh on loopback: cipher-bound, not wire-bound)
LOOPBACK = Link(4e9, 10e-6, "loopback (same host)")


@dataclass(frozen=True)
class MigrationCosts:
    """Fixed costs of the stop-and-copy phase, beyond the pages (assumptions, stated):

    * ``suspend_s``: libxl stops the device model, saves its state and suspends the guest;
    * ``emulator_state_bytes``: the device model's state record (QEMU's devices; VGA memory
      is guest memory and travels as pages);
    * ``restore_s``: the destination loads the HVM context and the device model's state and
      unpauses the guest (a device model already started; libxl 4.17 launches QEMU after the
      stream, which adds its start-up time);
    * ``handshake_rtts``: xl's "ready" / "go" exchange before the destination unpauses."""

    suspend_s: float = 0.005
    emulator_state_bytes: int = 64 * 1024
    restore_s: float = 0.030
    handshake_rtts: int = 1


@dataclass
class Round:
    """One call of ``send_dirty_pages``: ``live`` rounds run beside the guest, the last one
    (stop-and-copy) while it is suspended."""

    index: int
    live: bool
    pfns: int = 0
    pages: int = 0
    broken: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: pages the guest dirtied meanwhile (the next CLEAN's ``dirty_count``); None if not read
    dirty_after: int | None = None


@dataclass
class MigrationResult:
    rc: int
    error: str = ""
    src_domid: int = -1
    dst_domid: int = -1
    same_host: bool = True
    link: str = ""
    rounds: list[Round] = field(default_factory=list)
    stop_reason: str = ""
    total_s: float = 0.0
    downtime_s: float = 0.0
    downtime_parts: dict = field(default_factory=dict)
    pages_sent: int = 0
    bytes_sent: int = 0
    broken_pfns: list[int] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.rc == 0

    @property
    def live_rounds(self) -> int:
        return sum(1 for r in self.rounds if r.live)

    def to_json(self) -> dict:
        d = asdict(self)
        d["rounds"] = [asdict(r) for r in self.rounds]
        return d

    def report(self) -> MigrationReport:
        """The engine-neutral report ``live_migrate`` answers with."""
        log = [f"link {self.link}"] + [
            f"round {r.index} ({'live' if r.live else 'stop-and-copy'}): {r.pages} pages"
            + (f", {r.broken} broken" if r.broken else "")
            + (f", {r.dirty_after} dirtied meanwhile" if r.dirty_after is not None else "")
            for r in self.rounds]
        if self.broken_pfns:
            log.append(f"broken pfns not sent: {', '.join(hex(p) for p in self.broken_pfns[:8])}")
        return MigrationReport(
            ok=self.ok, rc=self.rc, error=self.error,
            new_domid=self.dst_domid if self.ok else None, same_host=self.same_host,
            rounds=len(self.rounds), live_rounds=self.live_rounds, pages_sent=self.pages_sent,
            downtime_s=self.downtime_s if self.ok else None, total_s=self.total_s,
            stop_reason=self.stop_reason or None, engine="sim", log=log)


class MigrationError(Exception):
    def __init__(self, rc: int, msg: str):
        super().__init__(msg)
        self.rc = rc


def simple_precopy_policy(iteration: int, dirty_count: int) -> int:
    """xg_sr_save.c: stop and copy once fewer than 50 pages are dirty or 5 rounds ran."""
    if (0 <= dirty_count < H.SPP_TARGET_DIRTY_COUNT) or iteration >= H.SPP_MAX_ITERATIONS:
        return H.XGS_POLICY_STOP_AND_COPY
    return H.XGS_POLICY_CONTINUE_PRECOPY


class _Restore:
    """The receiving side (``xg_sr_restore.c``) on the destination's toolstack."""

    def __init__(self, dst: SaveRestoreHypervisor, domid: int, p2m_size: int):
        self.dst, self.domid = dst, domid
        self.populated = np.zeros(max(p2m_size, 1), dtype=bool)
        self.broken: set[int] = set()

    def page_data(self, pfns: np.ndarray, types: np.ndarray, data) -> None:
        """``process_page_data``: populate the pfns that need a frame, copy the data in."""
        pop = ~np.isin(types, (D.XEN_DOMCTL_PFINFO_XTAB, D.XEN_DOMCTL_PFINFO_BROKEN))
        has = ~np.isin(types, NO_DATA_TYPES)
        self.broken.update(pfns[types == D.XEN_DOMCTL_PFINFO_BROKEN].tolist())
        need = pfns[pop & ~self.populated[pfns]]
        if need.size:
            rc, _ = self.dst.populate_physmap(self.domid, need)
            if rc != need.size:
                raise MigrationError(rc if rc < 0 else -E.ENOMEM,
                                     f"populating {need.size} pfns of d{self.domid} failed ({rc})")
            self.populated[need] = True
        if has.any():
            rc = self.dst.write_pages(self.domid, pfns[has], data)
            if rc:
                raise MigrationError(rc, f"writing pages into d{self.domid} failed ({E.name(rc)})")


class _Stream:
    """Bytes on the link, in simulated time: while a record is on the wire the source's
    guests run (and the destination's clock moves with it)."""

    def __init__(self, src, dst, link: Link):
        self.src, self.dst, self.link = src, dst, link
        self.t = 0.0
        self.bytes = 0

    def send(self, nbytes: int) -> float:
        dt = self.link.seconds(nbytes)
        self.bytes += nbytes
        self.elapse(dt)
        return dt

    def elapse(self, dt: float) -> None:
        if dt <= 0:
            return
        self.t += dt
        self.src.wait(dt)
        if self.dst is not self.src:
            self.dst.wait(dt)



def create_incoming(dst, info, same: bool, hvm: bool, res, pvh: bool = False) -> int | None:
    """Check the destination has room for the guest and create the domain the stream
    restores into (libxl's ``<name>--incoming``).  Returns its domid, or None with
    ``res.rc``/``res.error`` set."""
    free = dst.physinfo().free_pages
    if free < info.tot_pages:
        res.rc = -E.ENOMEM
        res.error = (f"no room for d{info.domid} on the {'same' if same else 'destination'} host: "
                     f"it needs {info.tot_pages} pages, {free} are free")
        return None
    kw = {"pvh": True} if pvh else {}  # xl sends the guest's config (type = "pvh") first
    rc, new = dst.domain_create(f"{info.name}--incoming", hvm, info.max_pages, info.nr_vcpus, **kw)
    if rc:
        res.rc, res.error = rc, f"creating the incoming domain failed ({E.name(rc)})"
        return None
    res.dst_domid = new
    return new

def start(src, domid: int, dst, link: Link | None, costs: MigrationCosts | None, hook):
    """What HVM and PV migration begin with: the destination (default: the same host), the
    link (loopback to the same host, 1 Gbit/s otherwise), costs, hook, the result and the
    guest's info (None, with ``res`` saying -ESRCH, when there is no such domain)."""
    same = dst is None or dst is src
    dst = src if dst is None else dst
    link = link or (LOOPBACK if same else GIGABIT)
    costs = costs or MigrationCosts()
    hook = hook or (lambda step, **kw: None)
    res = MigrationResult(rc=0, src_domid=domid, same_host=same, link=link.name)
    info = src.domain_info(domid)
    if info is None:
        res.rc, res.error = -E.ESRCH, f"no domain {domid}"
    return same, dst, link, costs, hook, res, info


def final_dirty(src, domid: int, n: int, res: MigrationResult) -> np.ndarray:
    """The last ``XEN_DOMCTL_SHADOW_OP_CLEAN`` (LOGDIRTY_FINAL) on the suspended guest: the
    pfns dirtied since the last live round."""
    rc, bm, st = src.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_CLEAN, n,
                                      H.XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL)
    if rc:
        raise MigrationError(rc, f"reading the dirty bitmap failed ({E.name(rc)})")
    if res.rounds:
        res.rounds[-1].dirty_after = st.dirty_count
    return np.flatnonzero(bm)


def finish(res: MigrationResult, stream: "_Stream", link: Link, costs: MigrationCosts,
           t_down: float, final_s: float, ctx_s: float, broken, wall0: float) -> MigrationResult:
    """The figures of a migration that reached the new guest's unpause."""
    res.downtime_s = stream.t - t_down
    res.downtime_parts = {"suspend_s": costs.suspend_s, "last_round_s": final_s,
                          "context_s": ctx_s, "latency_s": link.latency_s * (1 + 2 * costs.handshake_rtts),
                          "restore_s": costs.restore_s}
    res.total_s = stream.t
    res.bytes_sent = stream.bytes
    res.pages_sent = sum(r.pages for r in res.rounds)
    res.broken_pfns = sorted(broken)
    res.wall_s = time.perf_counter() - wall0
    return res


def migrate(src: SaveRestoreHypervisor, domid: int, dst: SaveRestoreHypervisor | None = None,
            link: Link | None = None, costs: MigrationCosts | None = None,
            policy: Callable[[int, int], int] = simple_precopy_policy,
            hook: Callable | None = None) -> MigrationResult:
    """Live-migrate HVM guest ``domid`` from ``src`` to ``dst`` (default: the same host).
    ``hook(step, **info)`` is called between steps (tests inject faults there)."""
    wall0 = time.perf_counter()
    same, dst, link, costs, hook, res, info = start(src, domid, dst, link, costs, hook)
    if info is None:
        return res
    if not info.hvm:
        res.rc, res.error = -E.EOPNOTSUPP, f"d{domid} is a PV guest (see migrate_pv)"
        return res
    if info.shutdown or info.dying:
        res.rc, res.error = -E.EINVAL, f"d{domid} is not running"
        return res
    top = src.maximum_gpfn(domid)
    if top < 0:
        res.rc, res.error = (top if top < 0 else -E.EINVAL), f"d{domid} has no memory map"
        return res
    p2m_size = top + 1
    pvh = src.xs_read(f"/libxl/{domid}/type") == "pvh"
    new = create_incoming(dst, info, same, True, res, pvh=pvh)
    if new is None:
        return res
    stream = _Stream(src, dst, link)
    restore = _Restore(dst, new, p2m_size)
    suspended = False
    try:
        hook("created", new=new)
        _enable_logdirty(src, domid)
        hook("logdirty")
        stream.send(2 * H.REC_HEADER_BYTES + 64)  # image + domain headers, static data
        send_memory_live(src, domid, p2m_size, res, policy,
                         lambda pfns, live: _send_dirty_pages(src, domid, pfns, stream, restore, res,
                                                              live=live, hook=hook))
        # -- stop and copy ---------------------------------------------------------------
        t_down = stream.t
        rc = src.shutdown_domain(domid, X.SHUTDOWN_suspend)
        if rc:
            raise MigrationError(rc, f"suspending d{domid} failed ({E.name(rc)})")
        suspended = True
        stream.elapse(costs.suspend_s)
        i = src.domain_info(domid)
        if i is None or not (i.shutdown and i.shutdown_reason == X.SHUTDOWN_suspend):
            raise MigrationError(-E.EINVAL, f"d{domid} has not been suspended")
        hook("suspended")
        final = final_dirty(src, domid, p2m_size, res)
        t_final = stream.t
        _send_dirty_pages(src, domid, final, stream, restore, res, live=False, hook=hook)
        final_s = stream.t - t_final
        # end of checkpoint: HVM context, params, then libxl's device-model record, END
        rc, ctx = src.hvm_getcontext(domid)
        if rc:
            raise MigrationError(rc, f"reading d{domid}'s HVM context failed ({E.name(rc)})")
        t_ctx = stream.t
        stream.send(H.REC_HEADER_BYTES + int(getattr(ctx, "nbytes", 0)))
        stream.send(H.REC_HEADER_BYTES + 16 * 8)                  # HVM_PARAMS
        if not pvh:  # libxl's EMULATOR_CONTEXT record: a PVH guest has no device model
            stream.send(H.REC_HEADER_BYTES + costs.emulator_state_bytes)
        stream.send(H.REC_HEADER_BYTES)                           # END
        ctx_s = stream.t - t_ctx
        stream.elapse(link.latency_s)                             # the last byte arrives
        hook("stream-end")
        rc = dst.hvm_setcontext(new, ctx)
        if rc:
            raise MigrationError(rc, f"loading the HVM context into d{new} failed ({E.name(rc)})")
        hand_over(src, domid, dst, new, info.name, stream, link, costs, hook)
    except MigrationError as e:
        _abort(src, dst, domid, new, suspended, info.name)
        res.rc, res.error = e.rc, str(e)
        res.wall_s = time.perf_counter() - wall0
        return res
    # the point of no return is behind us: the new guest runs; the old one goes
    rc = src.destroy(domid)
    hook("destroyed", rc=rc)
    return finish(res, stream, link, costs, t_down, final_s, ctx_s, restore.broken, wall0)


def hand_over(src, domid: int, dst, new: int, name: str, stream: "_Stream", link: Link,
              costs: MigrationCosts, hook) -> None:
    """The end of a restore, PV or HVM alike: xl's "ready"/"go" handshake, the old domain
    renamed ``NAME--migratedaway`` and the new one given the name, then the new one unpaused."""
    stream.elapse(2 * link.latency_s * costs.handshake_rtts)  # xl: "ready", "go"
    src.set_domain_name(domid, f"{name}--migratedaway")
    dst.set_domain_name(new, name)
    stream.elapse(costs.restore_s)
    hook("before-unpause")
    rc = dst.unpause(new)
    if rc:
        raise MigrationError(rc, f"unpausing d{new} failed ({E.name(rc)})")


def _enable_logdirty(src, domid: int) -> None:
    """``enable_logdirty``: the juggling needed when log-dirty is already on for VRAM."""
    rc, _, _ = src.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
    if rc:
        src.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_OFF)
        rc, _, _ = src.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
        if rc:
            raise MigrationError(rc, f"enabling log-dirty on d{domid} failed ({E.name(rc)})")


def send_memory_live(src, domid: int, n: int, res: MigrationResult, policy,
                     send: Callable[[np.ndarray, bool], None]) -> None:
    """``send_memory_live``, step for step, for any guest: ``send(pfns, live)`` writes a
    round (HVM or PV pages).  The policy is asked before and after each round; a STOP
    decision at the top still sends that round's pages live; ABORT fails the migration."""
    bitmap = np.arange(n, dtype=np.int64)   # bitmap_set: every pfn
    shadow_dirty = n                        # xc_shadow_op_stats_t stats = {0, p2m_size}
    iteration, dirty_count = 0, n
    x = 0
    while True:
        decision = policy(iteration, dirty_count)
        x += 1
        if shadow_dirty > 0 and decision != H.XGS_POLICY_ABORT:
            send(bitmap, True)
        if decision != H.XGS_POLICY_CONTINUE_PRECOPY:
            break
        iteration = x
        dirty_count = -1
        decision = policy(iteration, dirty_count)
        if decision != H.XGS_POLICY_CONTINUE_PRECOPY:
            break
        rc, bm, st = src.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_CLEAN, n)
        if rc:
            raise MigrationError(rc, f"reading the dirty bitmap failed ({E.name(rc)})")
        dirty_count = shadow_dirty = st.dirty_count
        if res.rounds:
            res.rounds[-1].dirty_after = st.dirty_count
        bitmap = np.flatnonzero(bm)
    if decision == H.XGS_POLICY_ABORT:
        raise MigrationError(-E.EINTR, "precopy aborted")
    res.stop_reason = (f"fewer than {H.SPP_TARGET_DIRTY_COUNT} pages dirty"
                       if 0 <= dirty_count < H.SPP_TARGET_DIRTY_COUNT
                       else f"{H.SPP_MAX_ITERATIONS} rounds")


def _send_dirty_pages(src, domid: int, pfns: np.ndarray, stream: _Stream, restore: _Restore,
                      res: MigrationResult, live: bool, hook) -> None:
    """``send_dirty_pages``: the pfns in batches of ``MAX_BATCH_SIZE`` (``write_batch``)."""
    r = Round(len(res.rounds) + 1, live)
    res.rounds.append(r)
    t0 = stream.t
    for s in range(0, pfns.size, H.MAX_BATCH_SIZE):
        batch = pfns[s:s + H.MAX_BATCH_SIZE]
        rc, types = src.page_types(domid, batch)
        if rc:
            raise MigrationError(rc, f"getpageframeinfo3 failed ({E.name(rc)})")
        types = np.asarray(types, dtype=np.uint32)
        has = ~np.isin(types, NO_DATA_TYPES)
        data = None
        if has.any():
            rc, data = src.read_pages(domid, batch[has])
            if rc:
                raise MigrationError(rc, f"mapping {int(has.sum())} pages of d{domid} failed "
                                         f"({E.name(rc)})")
        write_batch(stream, restore, r, batch, types, data, int(has.sum()))
        hook("batch", round=r.index, live=live)
    r.seconds = stream.t - t0


def write_batch(stream: _Stream, restore, r: Round, batch: np.ndarray, types: np.ndarray, data,
                k: int) -> None:
    """``write_batch``'s PAGE_DATA record: a header, a pfn+type per pfn, ``k`` pages of data;
    the restore side takes it in; the round counts it."""
    nbytes = (H.REC_HEADER_BYTES + H.PAGE_DATA_HEADER_BYTES
              + H.PAGE_DATA_PFN_BYTES * batch.size + PAGE_BYTES * k)
    restore.page_data(batch, types, data)
    r.pfns += int(batch.size)
    r.pages += k
    r.broken += int((types == D.XEN_DOMCTL_PFINFO_BROKEN).sum())
    r.bytes += nbytes
    stream.send(nbytes)


def _abort(src, dst, domid: int, new: int, suspended: bool, name: str) -> None:
    """Give everything back: the incoming domain goes, log-dirty off, the guest resumed."""
    if new >= 0 and dst.domain_info(new) is not None:
        dst.destroy(new)
    if src.domain_info(domid) is not None:
        src.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_OFF)
        src.set_domain_name(domid, name)
        if suspended:
            src.resume(domid, fast=True)
