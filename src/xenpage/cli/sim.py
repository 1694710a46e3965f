"""The simulator's commands (the simulated world only; each says so on real Xen):

* ``host create|show``  create or describe the saved simulated host
* ``host reboot``       reboot it, with ``badpage=`` from the retired-page list
* ``demo``              retire pages of each kind on a fresh simulated host
* ``mce-inject``        a corrected or uncorrected memory error, logged as dom0's mcelog would
* ``year``              a year of field-like errors in seconds, beside published figures

This module imports only click when the CLI starts: the simulator's wing
(:mod:`xenpage.backends.sim`), rich and matplotlib are imported by the command that runs.
"""

from __future__ import annotations

import math
import sys
import time

import click

from ..errors import HostFileError
from .main import Ctx, cli
from .output import emit, fail
from .ras import SIM_LOG_NAME, _state_dir, _store

PLOT_EXTRA = "plot"


def _need_plotting() -> None:
    """``year --plot`` needs matplotlib, an optional dependency: say which extra brings it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        fail(f"--plot needs matplotlib, which is not installed: install xenpage "
                   f"with its [{PLOT_EXTRA}] extra (pip install 'xenpage[{PLOT_EXTRA}]')", 2)


@cli.group("host")
@click.pass_obj
def host_group(obj: Ctx):
    """Create or describe the saved simulated host (simulator only)."""
    obj.simulator_only("host")


#: the simulated host's RAM, MiB: the smallest a layout holds, the largest the simulator is
#: meant for (1 TiB: ~8 GB of frame table in this process)
MEM_MIB_RANGE = (64, 1 << 20)
#: the simulated Linux PV kernel's layout needs this much (LinuxPV: "too small for its layout")
PV_MIN_MIB = 2


def _parse_guests(values: tuple[str, ...], what: str, min_mib: int = 1) -> tuple[tuple[str, int], ...]:
    out = []
    for v in values:
        name, _, mib = v.partition(":")
        if not name or not mib.isdigit() or not mib.isascii() or not name.isprintable() \
                or any(c.isspace() for c in name):
            fail(f"--{what.lower()} takes NAME:MiB (a name without blanks, a whole number of "
                 f"MiB), got {v!r}; nothing done", 1)
        if not min_mib <= int(mib) <= MEM_MIB_RANGE[1]:
            fail(f"--{what.lower()} {v!r}: a {what} guest has {min_mib} to {MEM_MIB_RANGE[1]} MiB; "
                 "nothing done", 1)
        out.append((name, int(mib)))
    return tuple(out)


def check_host_sizes(spec) -> None:
    """Refuse (exit 1, nothing written) a host whose parts cannot fit: dom0 and every guest
    need RAM of their own, and Xen keeps some for itself (its image, the frame table, the
    heap's own pages).  Unique guest names, as xl requires."""
    guests = list(spec.pv_guests) + list(spec.hvm_guests) + list(spec.pvh_guests)
    names = [n for n, _ in guests]
    dup = sorted({n for n in names if names.count(n) > 1 or n == "Domain-0"})
    if dup:
        fail(f"guest names must be unique (and not Domain-0): {', '.join(dup)}; nothing done", 1)
    if spec.mem_mib % 2 or not MEM_MIB_RANGE[0] <= spec.mem_mib <= MEM_MIB_RANGE[1]:
        fail(f"--mem {spec.mem_mib}: the host has an even number of MiB from {MEM_MIB_RANGE[0]} to "
             f"{MEM_MIB_RANGE[1]}; nothing done", 1)
    if not 1 <= spec.dom0_mib < spec.mem_mib:
        fail(f"the sizes do not fit: dom0 has {spec.dom0_mib} MiB of a {spec.mem_mib} MiB host "
             "(dom0 needs at least 1 MiB, and less than the host's RAM); nothing done", 1)
    need = spec.dom0_mib + sum(m for _, m in guests)
    if need >= spec.mem_mib:
        fail(f"the sizes do not fit: dom0 {spec.dom0_mib} MiB + guests "
             f"{need - spec.dom0_mib} MiB = {need} MiB, and the host has {spec.mem_mib} MiB of "
             "RAM (Xen keeps some for itself); nothing done", 1)


@host_group.command("create")
@click.option("--mem", "mem_mib", type=int, default=2048, show_default=True, help="host RAM, MiB")
@click.option("--dom0", "dom0_mib", type=int, default=1024, show_default=True, help="dom0 RAM, MiB")
@click.option("--pv", multiple=True, help="a PV guest NAME:MiB (repeatable; default domu1:96)")
@click.option("--hvm", multiple=True, help="an HVM guest NAME:MiB (repeatable; default hvm1:128)")
@click.option("--pvh", multiple=True, help="a PVH guest NAME:MiB (repeatable; default pvh1:64)")
@click.option("--no-guests", is_flag=True, help="only dom0")
@click.option("--pcpus", type=click.IntRange(1, 256), default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def host_create(obj: Ctx, mem_mib, dom0_mib, pv, hvm, pvh, no_guests, pcpus, as_json):
    """Create (or replace) the saved simulated host."""
    from ..backends.sim import DefaultHostSpec, build_host, host_path
    from ..errors import HostFileError as HFE
    spec = DefaultHostSpec(mem_mib=mem_mib, dom0_mib=dom0_mib, nr_pcpus=pcpus)
    if no_guests and (pv or hvm or pvh):
        fail("--no-guests and --pv/--hvm/--pvh contradict each other; nothing done", 1)
    if no_guests:
        spec.pv_guests, spec.hvm_guests, spec.pvh_guests = (), (), ()
    else:
        if pv:
            spec.pv_guests = _parse_guests(pv, "PV", PV_MIN_MIB)
        if hvm:
            spec.hvm_guests = _parse_guests(hvm, "HVM")
        if pvh:
            spec.pvh_guests = _parse_guests(pvh, "PVH")
    check_host_sizes(spec)
    from .progress import activity
    path = host_path(obj.paths.state_dir)
    with activity(f"booting a {mem_mib} MiB host and its guests ...") as say:
        try:
            host = build_host(spec)
        except Exception as e:  # the simulator's DomainError/GuestError: the CLI imports neither
            what = "dom0 does not fit" if "dom0" in str(e) else str(e)
            fail(f"the sizes do not fit in a {mem_mib} MiB host once Xen has its own memory "
                 f"({what}); nothing done", 1)
        say(f"saving the {mem_mib} MiB host to {path} ...")
        try:
            host.save(path)
        except HFE as e:
            fail(str(e), 2)
    if as_json:
        emit("host create", 0, path=str(path), **host_summary(host))
    else:
        click.echo(f"created a {mem_mib} MiB host with {len(host.guest_domains())} domains in {path}")


def host_summary(host) -> dict:
    import numpy as np

    from ..abi import mm
    ft = host.ft
    by_state = np.zeros(4, dtype=np.int64)
    invalid = broken = 0
    step = 1 << 22  # a slice at a time: no temporary the size of the frame table
    for a in range(0, host.nframes, step):
        part = slice(a, min(a + step, host.nframes))
        by_state += np.bincount(ft.states(a, step).view(np.uint8), minlength=4)
        broken += int(np.count_nonzero(ft.has_flag(mm.PGC_broken, part)))
        invalid += int(part.stop - a - np.count_nonzero(host.e820.valid_window(a, part.stop - a)))
    counts = {name: int(by_state[s]) for s, name in mm.STATE_NAMES.items()}
    counts["invalid"] = invalid
    counts["broken"] = broken
    return {
        "backend": "sim",
        "max_mfn": host.max_page,
        "max_mfn_hex": f"{host.max_page:x}",
        "nr_pcpus": host.nr_pcpus,
        "e820": host.e820.to_json(),
        "xen_image": [f"{host.xen_image[0]:x}", f"{host.xen_image[1] - 1:x}"],
        "xen_init_freed": [f"{host.xen_init[0]:x}", f"{host.xen_init[1] - 1:x}"],
        "frames": counts,
        "free_pages": host.heap.free_pages,
        "offlined_list": len(host.heap.offlined_list),
        "broken_list": len(host.heap.broken_list),
        "domains": [{"domid": d.domid, "name": d.name, "type": "PVH" if d.pvh else ("HVM" if d.hvm else "PV"),
                     "tot_pages": d.tot_pages, "flags": f"{d.flags():#x}"}
                    for d in host.guest_domains()],
        "quirks": host.quirks.to_state(),
    }


@host_group.command("show")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def host_show(obj: Ctx, as_json):
    """E820 map, Xen's image, domains and frames per state."""
    with obj.simulated_host("host show", save=False) as hv:
        s = host_summary(hv.host)
    if as_json:
        emit("host show", 0, **s)
        return
    from rich.console import Console
    from rich.table import Table
    con = Console()
    t = Table(title=f"E820 (max_mfn {s['max_mfn_hex']})")
    for c in ("start", "end", "type"):
        t.add_column(c)
    for e in s["e820"]:
        t.add_row(e["start"], e["end"], e["type"])
    con.print(t)
    con.print(f"Xen image frames {s['xen_image'][0]}-{s['xen_image'][1]} "
              f"(init region {s['xen_init_freed'][0]}-{s['xen_init_freed'][1]} freed to the heap)")
    t = Table(title="frames by state")
    for k in s["frames"]:
        t.add_column(k, justify="right")
    t.add_row(*[str(v) for v in s["frames"].values()])
    con.print(t)
    t = Table(title="domains")
    for c in ("id", "name", "type", "pages", "flags"):
        t.add_column(c)
    for d in s["domains"]:
        t.add_row(str(d["domid"]), d["name"], d["type"], str(d["tot_pages"]), d["flags"])
    con.print(t)


@cli.command("demo")
@click.option("--json", "as_json", is_flag=True)
@click.option("--keep", is_flag=True, help="keep the demo host in the state directory")
@click.pass_obj
def demo_cmd(obj: Ctx, as_json, keep):
    """Retire pages of each kind on a fresh simulated host and report what happened."""
    obj.simulator_only("demo")
    from .sim_demo import run_demo
    sys.exit(run_demo(obj.paths.state_dir, as_json=as_json, keep=keep))


# -- the service's view of the simulated machine --------------------------------------------------------------------------

def _need_sim(obj: Ctx, what: str, hint: str = "") -> None:
    obj.simulator_only(what, hint)


def days_option(param, v: float) -> float:
    """A study's length in days: finite, more than 0, at most 100 years."""
    if not (math.isfinite(v) and 0 < v <= 36525):
        raise click.BadParameter(f"{v!r} is not a number of days (more than 0, at most 36525)",
                                 param=param)
    return v


def _seconds(param, v: float | None) -> float | None:
    """A number of seconds: finite and not negative (click's FloatRange lets NaN through)."""
    if v is not None and not (math.isfinite(v) and 0 <= v < 2 ** 62):
        raise click.BadParameter(f"{v!r} is not a number of seconds", param=param)
    return v


@cli.command("mce-inject")
@click.argument("frames", nargs=-1, required=True)
@click.option("--uc", is_flag=True, help="uncorrected (Xen's machine-check handler acts on it)")
@click.option("--count", type=click.IntRange(min=1, max=0x8000), default=1, show_default=True,
              help="corrected errors per report (1 + MCi_STATUS's 15-bit count)")
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True, help="reports per frame")
@click.option("--scrub", is_flag=True, help="found by the patrol scrubber (else a read)")
@click.option("--time", "at", type=float, default=None, callback=lambda c, p, v: _seconds(p, v),
              help="Unix time of the event (default now)")
@click.option("--interval", type=float, default=60.0, show_default=True,
              callback=lambda c, p, v: _seconds(p, v), help="seconds between repeated reports")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def mce_inject(obj: Ctx, frames, uc, count, repeat, scrub, at, interval, as_json):
    """(simulator) Memory errors on frames (MFNs or ranges, hex), logged to STATE_DIR/mcelog as
    dom0's mcelog would; the service reads them from there."""
    from .main import parse_mfn_args
    from ..toolstack import hptool
    from ..abi import sysctl as S
    from ..ras.sources import format_mcelog
    _need_sim(obj, "mce-inject", " (on real Xen: xen-mceinj, xen-utils-4.17)")
    try:
        mfns = parse_mfn_args(list(frames))
    except hptool.BadMfn as e:
        fail(f"{e}; nothing done", 1)
    from ..backends.sim.ras import SimMachineCheck
    t0 = time.time() if at is None else at
    out, texts = [], []
    try:
        with obj.simulated_host("mce-inject") as hv:
            mc = SimMachineCheck(hv)
            for m in mfns:
                for k in range(repeat):
                    try:
                        inj = mc.inject(m, uncorrected=uc, count=count, time=t0 + k * interval,
                                        scrub=scrub)
                    except ValueError as e:
                        fail(f"{e}", 1)
                    texts.append(format_mcelog(inj.record, len(texts)))
                    xen = inj.xen.to_json()  # Xen's offline_page answer, decoded as everywhere
                    xen["status"] = S.decode(int(xen["status"]), S.sysctl_page_offline)
                    out.append({"record": inj.record.to_json(), "xen": xen})
    except HostFileError as e:
        fail(f"{e}", 2)
    logp = _state_dir(obj) / SIM_LOG_NAME
    from ..statefiles import open_private, state_dir
    state_dir(logp.parent)
    with open_private(logp, "a") as fh:
        fh.write("".join(texts))
    if as_json:
        emit("mce-inject", 0, log=str(logp), injected=out)
        return
    for o in out:
        r, x = o["record"], o["xen"]
        what = "uncorrected" if uc else f"{count} corrected"
        line = f"mfn {r['mfn']:#x}: {what} error logged (bank {r['bank']}, status {r['status_hex']})"
        if uc:
            line += f"; Xen: {x['effect']}" + (f" (owner d{x['owner']})" if x["owner"] is not None else "")
        click.echo(line)
    click.echo(f"xenpage: appended {len(texts)} records to {logp}")


@cli.command("year")
@click.option("--hosts", type=click.IntRange(1, 100000), default=3, show_default=True,
              help="host-years (one error trace each)")
@click.option("--seed", type=click.IntRange(0, 2 ** 32 - 1), default=1, show_default=True)
@click.option("--days", type=float, default=365.0, show_default=True,
              callback=lambda c, p, v: days_option(p, v))
@click.option("--policy", "policies", multiple=True,
              help="policies to compare, presets with +modifiers (default: off, first-error, "
                   "first-error+hvm-exchange, mcelog, rasdaemon, row)")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write a PNG")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def year_cmd(obj: Ctx, hosts, seed, days, policies, plot_path, as_json):
    """(simulator) A year of field-like memory errors replayed against a simulated host's
    guests in seconds: errors seen and avoided, frames retired, memory lost, uncorrected
    errors avoided, guest suspend time -- beside Hwang et al. (ASPLOS 2012) and Meza et al.
    (DSN 2015).  Uses fresh hosts; the saved host is not touched."""
    _need_sim(obj, "year")
    from ..backends.sim import year
    from ..ras.thresholds import ThresholdError
    if plot_path:
        _need_plotting()
    pols = policies or year.DEFAULT_POLICIES
    from .progress import activity, frames_progress
    runs = len(pols) * max(hosts, 0)
    try:
        with frames_progress("a year of errors", runs, unit="host-years") as advance:
            rep = year.compare(pols, seeds=range(seed, seed + hosts), days=days,
                               progress=(lambda *_: advance(1)) if advance else None)
    except ThresholdError as e:
        fail(f"{e}", 2)
    if plot_path:
        with activity(f"plotting {plot_path} ..."):
            year.plot(rep, plot_path)
        rep["plot"] = str(plot_path)
    if as_json:
        emit("year", 0, **rep)
        return
    click.echo(year.markdown(rep), nl=False)
    if plot_path:
        click.echo(f"plot: {plot_path}")


#: one item of Xen's ``badpage=``: a number as ``simple_strtoul`` reads it whole (0x hex,
#: 0 octal, decimal), or a range of two
_BADPAGE_NUM = r"(?:0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*)"
_BADPAGE = rf"{_BADPAGE_NUM}(?:-{_BADPAGE_NUM})?(?:,{_BADPAGE_NUM}(?:-{_BADPAGE_NUM})?)*"
BADPAGE_MAX_CHARS = 99


def check_badpage(value: str) -> None:
    """``host reboot --badpage V``: Xen's parser (``parse_badpage`` in the simulator) stops
    silently at the first character it does not expect and cuts the value at 99 characters;
    xenpage refuses such a value instead (nothing rebooted)."""
    import re
    if value and not re.fullmatch(_BADPAGE, value):
        fail(f"--badpage {value!r}: Xen reads START[-END] items (0x hex, 0 octal or decimal) "
             "separated by commas, and would silently stop at the first other character; "
             "nothing done", 1)
    if len(value) > BADPAGE_MAX_CHARS:
        fail(f"--badpage: {len(value)} characters; Xen keeps only the first "
             f"{BADPAGE_MAX_CHARS}; nothing done", 1)


@host_group.command("reboot")
@click.option("--no-badpage", is_flag=True, help="boot without badpage= (Xen forgets everything)")
@click.option("--badpage", "badpage_opt", default=None, help="this badpage= value instead of the list's")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def host_reboot(obj: Ctx, no_badpage, badpage_opt, as_json):
    """(simulator) Reboot the saved host: guests are rebuilt, Xen forgets every offlined
    frame except those its badpage= option names (by default the retired-page list's)."""
    _need_sim(obj, "host reboot", " (on real Xen: reboot with badpage= from "
              "'xenpage badpages --boot-option')")
    from ..backends.sim import host_path
    from ..backends.sim import ras as sim_ras
    from ..errors import HostFileError as HFE
    if badpage_opt is not None:
        check_badpage(badpage_opt)
    value = ""
    store = _store(obj)
    if not no_badpage:
        value = badpage_opt if badpage_opt is not None else store.boot_option().value
    try:
        with obj.simulated_host("host reboot", save=False) as hv:
            new = sim_ras.reboot(hv.host, value)
            new.save(host_path(obj.paths.state_dir))
            store.record_boot_option(value)  # what Xen was booted with (the service's replay)
    except HFE as e:
        fail(f"{e}", 2)
    res = {"badpage": value, "withheld": len(getattr(new, "withheld", [])), "domains": [
        {"domid": d.domid, "name": d.name, "hvm": d.hvm} for d in new.guest_domains()]}
    if as_json:
        emit("host reboot", 0, **res)
    else:
        click.echo("rebooted the simulated host" + (f" with badpage={value} ({res['withheld']} "
                                                    "frames withheld)" if value else " (no badpage=)"))
