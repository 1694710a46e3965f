"""Fleet commands, on a Dask cluster (the ``[fleet]`` extra: dask[distributed], pyarrow):

* ``fleet study``      N host-years of field-like errors under each policy (the simulator)
* ``fleet inventory``  many hosts' retired-page lists: per host, per DIMM, what could not be
                       retired and why, DIMMs ranked for replacement

This module imports only click when the CLI starts: dask, pyarrow, numpy, rich and the
simulator's wing are imported by the command that runs.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import click

from .main import cli
from .output import emit, fail


def _days(param, v: float) -> float:
    from .sim import days_option
    return days_option(param, v)


def _cluster_options(f):
    f = click.option("--threads", is_flag=True,
                     help="a local cluster of threads in this process instead of worker processes")(f)
    f = click.option("--workers", type=click.IntRange(1, 1024), default=None,
                     help="local cluster: worker processes (default: one per core)")(f)
    f = click.option("--scheduler", metavar="ADDRESS", default=None,
                     help="an existing Dask cluster: its scheduler's address (tcp://host:8786) "
                          "or scheduler file; default: a LocalCluster on this machine")(f)
    return f


def _client(scheduler, workers, threads):
    from ..ras import cluster
    try:
        return cluster.client(scheduler, workers, threads)
    except cluster.FleetExtraMissing as e:
        fail(f"{e}", 2)


def _need_extra() -> None:
    from ..ras.cluster import FleetExtraMissing, need_fleet_extra
    try:
        need_fleet_extra()
    except FleetExtraMissing as e:
        fail(f"{e}", 2)


@cli.group("fleet")
def fleet_group():
    """Fleet scale on Dask: the policy study over host-years, the retired-page inventory."""


@fleet_group.command("study")
@click.option("--hosts", type=click.IntRange(1, 10 ** 7), default=200, show_default=True,
              help="host-years")
@click.option("--seed", type=click.IntRange(0, 2 ** 32 - 1), default=1, show_default=True,
              help="the study's seed")
@click.option("--days", type=float, default=365.0, show_default=True,
              callback=lambda c, p, v: _days(p, v))
@click.option("--policy", "policies", multiple=True,
              help="policies to compare, presets with +modifiers (default: off, first-error, "
                   "first-error+hvm-exchange, mcelog, rasdaemon, row)")
@click.option("--fleet", "fleet_file", type=click.Path(exists=True, dir_okay=False),
              help="a fleet description (JSON: {\"shapes\": [{name, mem_mib, dom0_mib, pv: "
                   "[[name, MiB]...], hvm: [...], dimms_per_channel, weight}...]}); default: the "
                   "embedded one")
@click.option("--path", "path", type=click.Choice(["fast", "full"]), default="fast",
              show_default=True, help="fast: the service's decisions over a frame map; full: "
                                      "the whole simulated host (~1-2 s a host-year and policy)")
@click.option("--partition", type=click.IntRange(min=0), default=0, show_default=True,
              help="host-years per task (0: ~16 tasks per worker thread, at most 50 each)")
@_cluster_options
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="fleet-study",
              show_default=True, help="where the Parquet tables go")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), help="write a PNG (needs [plot])")
@click.option("--json", "as_json", is_flag=True)
def study_cmd(hosts, seed, days, policies, fleet_file, path, partition, scheduler, workers,
              threads, out_dir, plot_path, as_json):
    """(simulator) N host-years of field-like memory errors under each policy, on a Dask
    cluster: distributions across hosts (mean, p50/p95/p99, bootstrap CIs) of errors
    avoided, memory retired, guest crashes, migrations and uncorrected errors, beside Hwang
    et al. (ASPLOS 2012) and Meza et al. (DSN 2015); Parquet in --out."""
    if hosts < 1 or partition < 0:
        raise click.BadParameter("--hosts must be >= 1, --partition >= 0")
    _need_extra()
    if plot_path:
        from .sim import _need_plotting
        _need_plotting()
    from ..backends.sim import fleet as F
    from ..ras.cluster import describe
    from ..ras.thresholds import Policy, ThresholdError
    pols = tuple(policies or F.DEFAULT_POLICIES)
    try:
        for p in pols:
            Policy.named(p)
    except ThresholdError as e:
        fail(f"{e}", 2)
    fleet = F.DEFAULT_FLEET
    if fleet_file:
        try:
            fleet = F.Fleet.from_json(json.loads(Path(fleet_file).read_text()))
        except (ValueError, KeyError, TypeError) as e:
            fail(f"bad fleet description {fleet_file}: {e}", 2)
    t0 = time.perf_counter()
    with _client(scheduler, workers, threads) as c:
        where = describe(c)
        tab = F.study(hosts, seed, pols, fleet, days, path, client=c, partition=partition)
    wall = time.perf_counter() - t0
    summary = F.summarise(tab, seed)
    rep = {"hosts": hosts, "seed": seed, "days": days, "path": path, "policies": list(pols),
           "fleet": fleet.to_json(), "cluster": where, "wall_s": wall,
           "host_years_per_s": hosts / wall if wall else None,
           "oracle_first_error": F.oracle_first_error(tab), "summary": summary,
           "calibration": F.calibration(summary, tab)}
    paths = F.write_parquet(tab, summary, out_dir)
    rep["parquet"] = [str(p) for p in paths]
    if plot_path:
        rep["plot"] = str(F.plot(tab, summary, plot_path))
    if as_json:
        emit("fleet study", 0, **rep)
        return
    _print_study(rep, tab)


def _pct(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _print_study(rep: dict, tab) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console(width=None if sys.stdout.isatty() else 120)
    n_err = sum(tab.column("errors").to_pylist()[::len(rep["policies"])])
    t = Table(title=f"{rep['hosts']} host-years (seed {rep['seed']}, {rep['path']} path): "
                    f"{n_err} memory errors -- {rep['cluster']['workers']} workers, {rep['cluster']['threads']} threads, "
                    f"{rep['wall_s']:.1f} s", title_justify="left")
    for col in ("policy", "avoided", "95% CI", "vs off", "per host p50/p95/p99",
                "KiB retired mean/p99", "crashes mean (CI)", "UE seen", "migr."):
        t.add_column(col, justify="left" if col == "policy" else "right")

    def pc(x) -> str:
        return "-" if x is None or math.isnan(x) else f"{100 * x:.0f}"

    for r in rep["summary"]:
        a, ret, cr, ue, mig = (r[k] for k in ("avoided_fraction", "retired_kib", "guest_crashes",
                                              "seen_uncorrected", "migrations"))
        pa_ = r["pooled_avoided"]
        red = r.get("error_rate_reduction")
        t.add_row(
            r["policy"], _pct(pa_["value"]), f"{pc(pa_['ci95'][0])}-{pc(pa_['ci95'][1])}%",
            "-" if not red or r["policy"] == "off" else f"-{_pct(red['value'])}",
            "/".join(pc(a[k]) for k in ("p50", "p95", "p99")) + "%",
            f"{ret['mean']:.0f}/{ret['p99']:.0f}",
            f"{cr['mean']:.2f} ({cr['ci95'][0]:.2f}-{cr['ci95'][1]:.2f})",
            f"{ue['mean']:.2f}", f"{mig['mean']:.2f}")
    con.print(t)
    for line in rep["calibration"]:
        con.print(line, highlight=False)
    con.print(f"Parquet: {', '.join(rep['parquet'])}" + (f"; plot: {rep['plot']}" if rep.get("plot") else ""),
              highlight=False)


@fleet_group.command("inventory")
@click.argument("lists", nargs=-1, required=True, type=click.Path(exists=True))
@_cluster_options
@click.option("--chunk", type=click.IntRange(min=1), default=200, show_default=True,
              help="lists per task")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="fleet-inventory",
              show_default=True, help="where the Parquet tables go")
@click.option("--top", type=click.IntRange(min=1), default=10, show_default=True,
              help="DIMMs to show")
@click.option("--json", "as_json", is_flag=True)
def inventory_cmd(lists, scheduler, workers, threads, chunk, out_dir, top, as_json):
    """Read many hosts' retired-page lists (their `badpages --json` exports or copies of
    retired.db; directories are searched for *.json and *.db) in parallel: per host and
    per DIMM tables, error and retirement rates, frames that could not be retired and why,
    DIMMs ranked for replacement; Parquet in --out."""
    _need_extra()
    from ..ras import inventory as I
    from ..ras.cluster import describe
    paths = I.find_lists(lists)
    if not paths:
        fail("no *.json or *.db lists found", 2)
    t0 = time.perf_counter()
    with _client(scheduler, workers, threads) as c:
        where = describe(c)
        tables = I.inventory(paths, client=c, chunk=max(1, chunk))
    wall = time.perf_counter() - t0
    written = I.write_parquet(tables, out_dir)
    s = I.summary(tables, top)
    s.update({"lists": len(paths), "cluster": where, "wall_s": wall,
              "parquet": [str(p) for p in written]})
    if as_json:
        emit("fleet inventory", 0, **s)
        return
    from rich.console import Console
    from rich.table import Table
    con = Console()
    con.print(f"{s['hosts']} hosts ({len(s['unreadable'])} lists unreadable), {s['frames']} frames "
              f"with errors, {s['retired']} retired, {s['unretirable']} could not be retired, "
              f"{s['dimms_with_errors']} DIMMs with errors -- {where['workers']} workers, "
              f"{wall:.1f} s", highlight=False)
    if s["unretirable_why"]:
        con.print("not retired, why: " + ", ".join(f"{r['outcome'] or '?'} {r['frames']}"
                                                    for r in s["unretirable_why"]), highlight=False)
    t = Table(title="DIMMs to replace first", title_justify="left")
    for col in ("rank", "host", "DIMM", "UE", "not retirable", "errors", "errors/day", "frames",
                "retired"):
        t.add_column(col, justify="left" if col in ("host", "DIMM") else "right")
    for r in s["replace_first"]:
        t.add_row(str(r["rank"]), r["host"], r["dimm_name"], str(r["uncorrected"]),
                  str(r["unretirable"]), str(r["errors"]), f"{r['errors_per_day']:.2f}",
                  str(r["frames"]), str(r["retired"]))
    con.print(t)
    for p in s["unreadable"][:5]:
        con.print(f"unreadable: {p['host']}: {p['error']}", highlight=False)
    con.print(f"Parquet: {', '.join(s['parquet'])}", highlight=False)
