"""The page-retirement service's commands:

* ``retired``          the service, in the foreground (systemd-friendly): follows
                       machine-check logs, retires frames, retries, replays at start
* ``retire --from F``  one pass over a log (or ``-``: stdin), then exit
* ``badpages``         retired, pending and failed frames with reasons;
                       ``--boot-option``: Xen's ``badpage=``; ``badpages clear``: forget
                       frames after a DIMM swap
* ``retire-switch``    the global off switch (persistent)

The simulator's side of it (``mce-inject``, ``year``, ``host reboot``) is in :mod:`.sim`.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from pathlib import Path

import click

from ..errors import HostFileError
from ..paths import CONFIG_NAME, XEN_MCE_DEVICE
from .main import Ctx, cli
from .output import emit, fail

SIM_LOG_NAME = "mcelog"
XEN_LOG = "/var/log/mcelog"
#: dom0's machine-check device (the xen-mcelog driver): the service's default source on Xen
XEN_DEVICE = str(XEN_MCE_DEVICE)


def _state_dir(obj: Ctx) -> Path:
    """The backend's state directory (:mod:`xenpage.paths`): the retired-page list, the
    switch and the log positions the service, ``badpages`` and ``retire-switch`` share."""
    return obj.paths.state_dir


def _store(obj: Ctx):
    from ..ras.store import Store, StoreError
    try:
        store = Store.in_state_dir(_state_dir(obj))
    except StoreError as e:
        fail(f"{e}", 2)
    # closed when the command ends (its WAL checkpointed then, not whenever it is collected)
    click.get_current_context().call_on_close(store.close)
    return store


def _backend(obj: Ctx) -> str:
    return obj.kind


def _policy(obj: Ctx, config: str | None, preset: str | None):
    from ..ras.thresholds import ThresholdError, load_policy
    path = config
    if path is None:
        p = obj.paths.config
        path = str(p) if p.exists() else None
    try:
        return load_policy(path, env=dict(os.environ), preset=preset)
    except (ThresholdError, OSError) as e:
        fail(f"{e}", 2)


def _hard_action(kind: str, policy, journal_dir=None):
    """The simulator models Xen's own machine-check path; real Xen never gets a faked one:
    ``hard`` retires the frame by policy (:class:`xenpage.ras.actions.PolicyHard`)."""
    if kind == "sim":
        from ..backends.sim.ras import hard_offline
        return hard_offline
    from ..ras.actions import PolicyHard
    return PolicyHard(hvm=policy.hvm, journal_dir=journal_dir)


class _RowFrames:
    """Every frame of a DRAM row, from the simulated machine's address map (``unit-scope =
    all``); on real Xen the map is unknown and only the frames seen with errors count."""

    def __init__(self):
        self.geometry = None

    def __call__(self, unit: str, rec) -> list[int]:
        g = self.geometry
        if g is None or unit != "row" or rec.row is None:
            return []
        return [g.encode(rec.socketid, rec.channel, rec.rank, rec.bankgroup, rec.dram_bank,
                         rec.row, f) for f in range(g.row_frames)]


def _default_sources(obj: Ctx, kind: str) -> list[str]:
    if kind == "sim":
        return [str(_state_dir(obj) / SIM_LOG_NAME)]
    return [XEN_DEVICE]


class _Stop:
    def __init__(self):
        self.flag = False

    def __call__(self, *_):
        self.flag = True


def _make_service(obj: Ctx, store, policy, log, kind: str, rows: _RowFrames):
    from ..ras.service import RetireService
    return RetireService(store, policy, hard=_hard_action(kind, policy, obj.paths.journal_dir), log=log, expand=rows,
                         journal_dir=obj.paths.journal_dir)


def _is_device(name: str) -> bool:
    import stat
    try:
        return stat.S_ISCHR(os.stat(name).st_mode)
    except OSError:
        return name == XEN_DEVICE


def check_sources(names) -> None:
    """Named ``--from`` sources that cannot be a machine-check log are refused before
    anything is read or recorded (exit 1): a missing file (a typo would otherwise be
    followed for ever), a directory, a binary file (no mcelog text: it holds NUL bytes),
    one that cannot be read (exit 2)."""
    for n in names:
        if n == "-" or _is_device(n):
            continue
        p = Path(n)
        if not p.exists():
            fail(f"{n}: no such file (an mcelog text log, /dev/mcelog or - for stdin); "
                 "nothing done", 1)
        if p.is_dir():
            fail(f"{n}: is a directory, not a machine-check log; nothing done", 1)
        try:
            with open(p, "rb") as fh:
                head = fh.read(1 << 16)
        except OSError as e:
            fail(f"{n}: {e.strerror or e}; nothing done", 2)
        if b"\0" in head:
            fail(f"{n}: a binary file, not an mcelog text log; nothing done", 1)


def _open_sources(names, store, follow: bool):
    """``-``: stdin; a character device (``/dev/mcelog``): read natively, binary
    ``struct mce`` records; anything else: an mcelog-format text log."""
    from ..ras.sources import McelogFile
    out = []
    for n in names:
        if n == "-":
            out.append(_StdinSource(follow))
        elif _is_device(n):
            from ..ras.devmcelog import DevMcelog, DeviceError
            try:
                out.append(DevMcelog(n))
            except DeviceError as e:
                fail(f"{e}; an mcelog text log can be named with --from "
                           f"{XEN_LOG}", 2)
        else:
            out.append(McelogFile(n, store=store, settle=1.0))
    return out


def _device_poller(srcs):
    """A poll object on the device sources (``xen_mce_chrdev_poll``: readable when the
    driver holds records), or None."""
    import select
    fds = [s.fd for s in srcs if isinstance(getattr(s, "fd", None), int)]
    if not fds:
        return None
    p = select.poll()
    for fd in fds:
        p.register(fd, select.POLLIN)
    return p


class _StdinSource:
    """stdin, read by a thread so the service loop never blocks on it."""

    def __init__(self, follow: bool):
        import queue
        import threading
        from ..ras.sources import McelogParser
        self.q: "queue.Queue" = queue.Queue()
        self.eof = False
        self.name = "stdin"
        self.parser = McelogParser("stdin")

        def pump():
            for line in sys.stdin:
                self.q.put(line)
            self.q.put(None)
        self.thread = threading.Thread(target=pump, daemon=True)
        self.thread.start()
        if not follow:
            self.thread.join()

    def read(self, final: bool = False):
        out = []
        while not self.q.empty():
            line = self.q.get()
            if line is None:
                self.eof = True
                out += self.parser.finish()
                break
            out += self.parser.feed(line)
        return out


def _run(obj: Ctx, sources, follow: bool, config, preset, as_json: bool, interval: float,
         verbose: bool, once: bool = False, max_seconds: float | None = None,
         metrics_file: str | None = None) -> dict:
    from ..ras.service import Log, sd_notify, status
    check_sources(sources)  # refused before anything is opened or written
    if not (math.isfinite(interval) and 0 <= interval <= 86400):
        fail(f"--interval {interval!r} is not a number of seconds (0 to 86400)", 1)
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds >= 0):
        fail(f"--max-seconds {max_seconds!r} is not a number of seconds", 1)
    kind = _backend(obj)
    policy = _policy(obj, config, preset)
    log = Log(as_json=as_json, verbose=verbose,
              stream=sys.stdout if not (once and as_json) else False)
    log.keep = once
    for m in policy.messages:
        log("config", "warning", message=m)
    for line in policy.describe():
        log("policy", "info", message=line)
    rows = _RowFrames()
    names = list(sources) or _default_sources(obj, kind)
    stop = _Stop()
    saved = {}
    if not once:
        for sig in (signal.SIGTERM, signal.SIGINT):
            saved[sig] = signal.signal(sig, stop)
    read = 0
    t_end = time.monotonic() + max_seconds if max_seconds else None

    def metrics() -> None:
        """The Prometheus textfile (``--metrics-file``): after the replay, after every pass
        that read records or acted, and at the end."""
        if metrics_file:
            from ..ras.metrics import write
            write(metrics_file, status(store, policy),
                  dict(svc.stats.to_json(), records=read))
    try:
        with obj.hypervisor() as hv:
            # the list is opened once the backend is there: a service that cannot start
            # (no Xen, an unreadable host) leaves the state directory as it was
            store = _store(obj)
            svc = _make_service(obj, store, policy, log, kind, rows)
            srcs = _open_sources(names, store, follow)
            if kind == "sim":
                from ..backends.sim.ras import geometry_of
                rows.geometry = geometry_of(hv)
            replay = svc.replay(hv)
        metrics()
        sd_notify("READY=1")
        log("started", "info", backend=kind, sources=",".join(names), follow=follow,
            enabled=svc.enabled, replayed=replay.get("checked", 0))
        while True:
            recs, batches = [], []
            final = once or not follow
            for s in srcs:
                if hasattr(s, "read_batches"):  # /dev/mcelog: handled column-wise
                    batches += s.read_batches(final=final)
                else:
                    recs += s.read(final=final)
            read += len(recs) + sum(len(b) for b in batches)
            due = store.next_due()
            if recs or batches or (due is not None and due <= time.time()):
                with obj.hypervisor() as hv:
                    svc.process(hv, recs, batches)
                metrics()
                sd_notify(f"STATUS={read} records, {svc.stats.transitions} transitions")
            if final or stop.flag or (t_end and time.monotonic() >= t_end):
                break
            if all(getattr(s, "eof", False) for s in srcs):
                break
            slept = 0.0
            poller = _device_poller(srcs)
            while slept < interval and not stop.flag:
                if poller is not None:  # /dev/mcelog: wake when the driver has records
                    if poller.poll(int(min(0.1, interval - slept) * 1000)):
                        break
                else:
                    time.sleep(min(0.1, interval - slept))
                slept += 0.1
    except HostFileError as e:
        fail(f"{e}", 2)
    finally:
        sd_notify("STOPPING=1")
        for sig, h in saved.items():
            signal.signal(sig, h)
    metrics()
    st = status(store, policy)
    if not once:
        log("stopped", "info", records=read, transitions=svc.stats.transitions)
    return {"records": read, "replay": replay, "stats": svc.stats.to_json(),
            "log": log.lines, "status": {k: st[k] for k in ("enabled", "counts", "memory_retired_kib")}}


@cli.command("retired")
@click.option("--from", "sources", multiple=True, metavar="FILE",
              help="machine-check source: /dev/mcelog (the xen-mcelog device, read natively), "
                   "an mcelog-format log, or - for stdin (repeatable; default: /dev/mcelog on "
                   "Xen, STATE_DIR/mcelog on the simulator)")
@click.option("--follow/--no-follow", default=True, show_default=True,
              help="keep following the logs (the service) or stop at their end")
@click.option("--config", type=click.Path(dir_okay=False), help=f"policy file (default /etc/xenpage/{CONFIG_NAME} on real Xen, "
              f"STATE_DIR/{CONFIG_NAME} on the simulator)")
@click.option("--policy", "preset", help="start from a preset: first-error, mcelog, mcelog-default, "
              "rasdaemon, row, account, off; +hvm-exchange, +hvm-none, +pv-migrate modify it")
@click.option("--interval", type=float, default=2.0, show_default=True, help="seconds between polls")
@click.option("--json", "as_json", is_flag=True, help="log JSON lines; the last is the envelope")
@click.option("--verbose", is_flag=True, help="also log every record")
@click.option("--max-seconds", type=float, default=None, hidden=True)
@click.option("--metrics-file", type=click.Path(dir_okay=False), metavar="PATH",
              help="write Prometheus metrics (retired/pending/failed frames, errors, per DIMM) "
                   "to PATH after every pass, atomically: for node_exporter's textfile "
                   "collector (e.g. /var/lib/node_exporter/textfile_collector/xenpage.prom)")
@click.pass_obj
def retired_cmd(obj: Ctx, sources, follow, config, preset, interval, as_json, verbose, max_seconds,
                metrics_file):
    """The page-retirement service, in the foreground.

    Replays the retired-page list (what was retired is retired again, e.g. after a reboot),
    then follows machine-check logs: corrected errors are counted in leaky buckets per frame
    (and per DRAM row or bank), a bucket that overflows retires its frames by the policy;
    uncorrected errors are followed through what Xen's machine-check handler did.  One log
    line per state transition (Xen's states: online, offlining, offlined, +broken).  Stops
    cleanly on SIGTERM; tells systemd READY=1 when Type=notify."""
    if metrics_file and not Path(metrics_file).parent.is_dir():
        fail(f"{metrics_file}: its directory does not exist; nothing done", 2)
    res = _run(obj, sources, follow, config, preset, as_json, interval, verbose,
               max_seconds=max_seconds, metrics_file=metrics_file)
    if as_json:  # the last JSON line: the envelope (the lines before it are the log's events)
        emit("retired", 0, **{k: v for k, v in res.items() if k != "log"})


@cli.command("retire")
@click.option("--from", "sources", multiple=True, required=True, metavar="FILE",
              help="/dev/mcelog, an mcelog-format log, or - for stdin (repeatable)")
@click.option("--config", type=click.Path(dir_okay=False))
@click.option("--policy", "preset")
@click.option("--json", "as_json", is_flag=True)
@click.option("--verbose", is_flag=True)
@click.pass_obj
def retire_cmd(obj: Ctx, sources, config, preset, as_json, verbose):
    """One pass: read the records of FILE (from where the last pass stopped), decide, act,
    record, exit."""
    check_sources(sources)
    res = _run(obj, sources, False, config, preset, as_json, 0.0, verbose, once=True)
    if as_json:
        res["transitions"] = [l for l in res.pop("log") if l["event"] == "transition"]
        emit("retire", 0, **res)
    else:
        c = res["status"]["counts"]
        click.echo(f"xenpage: {res['records']} records; {res['stats']['transitions']} transitions; "
                   f"frames: {c['retired']} retired, {c['pending']} pending, {c['failed']} failed, "
                   f"{c['accounted']} accounted")
        if res["stats"].get("duplicates"):
            click.echo(f"xenpage: {res['stats']['duplicates']} records seen before (replayed or "
                       "from another source): not counted again", err=True)
        if res["stats"].get("quarantined"):
            click.echo(f"xenpage: {res['stats']['quarantined']} records quarantined (not machine "
                       "checks or not storable: 'xenpage badpages --json' lists them)", err=True)


# -- status, boot option, clearing ---------------------------------------------------------

def _ago(t: float | None) -> str:
    if not t:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(t))


@cli.group("badpages", invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True)
@click.option("--boot-option", is_flag=True, help="print Xen's badpage= for its command line")
@click.option("--history", "history", metavar="MFN", help="every event, decision and outcome of one frame")
@click.option("--summary", is_flag=True, help="errors and frames per DIMM, bank and row "
              "(like 'ras-mc-ctl --summary')")
@click.pass_context
def badpages_group(ctx, as_json, boot_option, history, summary):
    """The retired-page list: retired, pending, failed and accounted frames with reasons."""
    if ctx.invoked_subcommand is not None:
        return
    obj: Ctx = ctx.obj
    from ..ras.service import status
    mfn = None
    if history:
        from ..toolstack import hptool
        try:
            mfn = hptool.parse_mfn(history)
        except hptool.BadMfn as e:
            fail(f"{e}; nothing done", 1)
    store = _store(obj)
    if boot_option:
        opt = store.boot_option()
        if as_json:
            sys.exit(emit("badpages", 1 if opt.missing else 0, boot_option=opt.to_json()))
        else:
            if opt.text:
                click.echo(opt.text)
            else:
                click.echo("xenpage: no bad frames: no badpage= needed", err=True)
            if opt.widened:
                click.echo(f"xenpage: ranges widened over {opt.widened} good frames to fit Xen's "
                           f"99 characters", err=True)
            if opt.missing:
                click.echo(f"xenpage: {len(opt.missing)} bad frames do not fit in Xen's 99 "
                           "characters: " + ",".join(f"{m:#x}" for m in opt.missing[:16])
                           + (" ..." if len(opt.missing) > 16 else ""), err=True)
                sys.exit(1)
        return
    if mfn is not None:
        f = store.frame(mfn)
        h = {"mfn": f"{mfn:#x}", "frame": f.to_json() if f else None, **store.history(mfn)}
        if as_json:
            emit("badpages", 0, **h)
        else:
            click.echo(f"mfn {mfn:#x}: " + (f"{f.state} ({f.xen_state}) -- {f.detail}" if f else "not in the list"))
            for d in h["decisions"]:
                click.echo(f"  {_ago(d['time'])} decision {d['action']} ({d['trigger']}): {d['reason']}")
            for o in h["outcomes"]:
                click.echo(f"  {_ago(o['time'])} {o['action']}: {o['kind']} {o['xen_before']} -> "
                           f"{o['xen_after']} ({o['state_before'] or 'new'} -> {o['state_after']}) {o['detail']}")
            click.echo(f"  {len(h['events'])} events")
        return
    st = status(store)
    if summary:
        from ..ras.inventory import dimm_summary, dimm_summary_lines
        dimms = dimm_summary(st["frames"])
        if as_json:
            emit("badpages", 0, summary=True, counts=st["counts"], dimms=dimms)
            return
        for line in dimm_summary_lines(dimms):
            click.echo(line)
        return
    if as_json:
        emit("badpages", 0, **st)  # boot_option: computed from the list (nothing written)
        return
    c = st["counts"]
    click.echo(f"page retirement: {'on' if st['enabled'] else 'OFF'}; {c['retired']} retired "
               f"({st['memory_retired_kib']} KiB), {c['pending']} pending, {c['failed']} failed, "
               f"{c['accounted']} accounted"
               + (f"; {len(st['quarantined'])} records quarantined" if st["quarantined"] else ""))
    if not st["frames"]:
        return
    click.echo(f"{'MFN':>10} {'state':<9} {'Xen':<17} {'action':<8} {'CE':>5} {'UE':>3} {'dom':>4} "
               f"{'since':<16} reason")
    for f in st["frames"]:
        dom = "-" if f["domid"] is None else str(f["domid"])
        why = f["detail"] if f["state"] != "accounted" else f["reason"]
        if f["state"] in ("retired", "pending") and f["reason"]:
            why = f"{f['reason']}; {f['detail']}" if f["detail"] else f["reason"]
        click.echo(f"{f['mfn']:>#10x} {f['state']:<9} {f['xen_state'] or '-':<17} {f['action'] or '-':<8} "
                   f"{f['errors']:>5} {f['uncorrected']:>3} {dom:>4} "
                   f"{_ago(f['retired_time'] or f['decided_time']):<16} {why}")


@badpages_group.command("clear")
@click.argument("frames", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every frame in the list")
@click.option("--dimm", "dimm", metavar="S:C:D", help="every frame whose errors came from this "
              "DIMM (socket:channel:dimm as mcelog locates it; S:C for a whole channel)")
@click.option("--online", is_flag=True, help="also bring the frames back online in Xen "
              "(those not marked broken)")
@click.option("--reason", default="DIMM replaced", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def badpages_clear(obj: Ctx, frames, all_, dimm, online, reason, as_json):
    """Forget frames (MFNs or START-END ranges, hex; or --dimm; or --all) after a DIMM swap;
    print the new badpage= value.  The history is kept."""
    from .main import parse_mfn_args
    from ..toolstack import hptool
    if not frames and not all_ and not dimm:
        fail("name the frames to clear (MFN or START-END), --dimm S:C:D or --all", 1)
    try:
        mfns = None if all_ else parse_mfn_args(list(frames))
    except hptool.BadMfn as e:
        fail(f"{e}; nothing done", 1)
    if dimm:
        parts = dimm.split(":")
        if len(parts) not in (2, 3) or not all(x.isdigit() and x.isascii() for x in parts):
            fail(f"--dimm {dimm!r}: socket:channel[:dimm]; nothing done", 1)
    store = _store(obj)
    if dimm and not all_:
        want = dict(zip(("socketid", "channel", "dimm"), map(int, dimm.split(":"))))
        mfns = sorted(set(mfns or []) | {f.mfn for f in store.frames()
                                         if all(f.location.get(k) == v for k, v in want.items())})
    gone = store.clear(mfns, time.time(), reason)
    # counts and row memberships go too: the new DIMM starts clean
    from ..ras.policy import Accountant
    from ..ras.thresholds import Policy
    b, uf = store.load_buckets()
    acct = Accountant(Policy(), b, uf)
    acct.forget(gone if mfns is not None or gone else [])
    with store.batch():
        store.save_buckets(acct.buckets, acct.unit_frames, acct.dirty)
    onlined = []
    if online and gone:
        try:
            with obj.hypervisor() as hv:
                for m in gone:
                    r = hptool.mem_online(hv, m)
                    onlined.append({"mfn": f"{m:#x}", "exit": r.exit_code,
                                    "lines": [l.text for l in r.lines]})
        except HostFileError as e:
            fail(f"{e}", 2)
    opt = store.boot_option()
    res = {"cleared": [f"{m:#x}" for m in gone], "onlined": onlined, "boot_option": opt.to_json()}
    if as_json:
        emit("badpages clear", 0, **res)
        return
    click.echo(f"xenpage: cleared {len(gone)} frames" + (f": {', '.join(res['cleared'][:16])}"
                                                          if gone else ""))
    for o in onlined:
        for line in o["lines"]:
            click.echo(line)
    click.echo(f"new Xen command-line option: {opt.text or '(none: remove badpage=)'}")


@cli.command("retire-switch")
@click.argument("state", required=False, type=click.Choice(["on", "off"]))
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def retire_switch(obj: Ctx, state, as_json):
    """Show or set the global off switch: off stops all counting and every action (a
    running service notices within one poll); events are still recorded."""
    store = _store(obj)
    if state:
        store.set_switch(state == "on")
    on = store.switch()
    if as_json:
        emit("retire-switch", 0, switch="on" if on else "off")
    else:
        click.echo(f"page retirement is {'on' if on else 'off'}")


