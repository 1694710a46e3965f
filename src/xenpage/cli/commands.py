"""xenpage's own commands: ``list``, ``host create|show``, ``demo``."""

from __future__ import annotations

import shutil
import sys

import click
from rich.console import Console
from rich.table import Table

from ..backends.sim import DefaultHostSpec, build_host, host_path
from ..backends import default_state_dir
from .main import Ctx, cli
from .output import print_json


@cli.command("list")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def list_cmd(obj: Ctx, as_json: bool):
    """Domains, like 'xl list' (with a PV/HVM/PVH column: xl's type comes from libxl's
    xenstore node, as here)."""
    from ..toolstack.guest_type import domain_type
    with obj.hypervisor(save=False) as hv:
        doms = hv.domain_list()
        types = {d.domid: domain_type(hv, d) for d in doms}
    if as_json:
        print_json([dict(d.to_json(), type=types[d.domid]) for d in doms])
        return
    print(f"{'Name':<40} {'ID':>5} {'Type':>4} {'Mem':>6} {'VCPUs':>5}\tState")
    for d in doms:
        print(f"{d.name:<40} {d.domid:>5} {types[d.domid].upper():>4} {d.tot_pages // 256:>6} "
              f"{d.nr_vcpus:>5}\t{d.state_letters()}")


@cli.group("host")
def host_group():
    """Create or describe the saved simulated host."""


def _parse_guests(values: tuple[str, ...], what: str) -> tuple[tuple[str, int], ...]:
    out = []
    for v in values:
        name, _, mib = v.partition(":")
        if not name or not mib.isdigit() or int(mib) <= 0:
            raise click.BadParameter(f"{what} guests are NAME:MiB, got {v!r}")
        out.append((name, int(mib)))
    return tuple(out)


@host_group.command("create")
@click.option("--mem", "mem_mib", type=int, default=2048, show_default=True, help="host RAM, MiB")
@click.option("--dom0", "dom0_mib", type=int, default=1024, show_default=True, help="dom0 RAM, MiB")
@click.option("--pv", multiple=True, help="a PV guest NAME:MiB (repeatable; default domu1:96)")
@click.option("--hvm", multiple=True, help="an HVM guest NAME:MiB (repeatable; default hvm1:128)")
@click.option("--pvh", multiple=True, help="a PVH guest NAME:MiB (repeatable; default pvh1:64)")
@click.option("--no-guests", is_flag=True, help="only dom0")
@click.option("--pcpus", type=int, default=2, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def host_create(obj: Ctx, mem_mib, dom0_mib, pv, hvm, pvh, no_guests, pcpus, as_json):
    """Create (or replace) the saved simulated host."""
    spec = DefaultHostSpec(mem_mib=mem_mib, dom0_mib=dom0_mib, nr_pcpus=pcpus)
    if no_guests:
        spec.pv_guests, spec.hvm_guests, spec.pvh_guests = (), (), ()
    else:
        if pv:
            spec.pv_guests = _parse_guests(pv, "PV")
        if hvm:
            spec.hvm_guests = _parse_guests(hvm, "HVM")
        if pvh:
            spec.pvh_guests = _parse_guests(pvh, "PVH")
    if mem_mib % 2 or mem_mib < 64 or pcpus < 1:
        raise click.BadParameter("--mem must be an even number of MiB >= 64, --pcpus >= 1")
    try:
        host = build_host(spec)
    except Exception as e:
        click.echo(f"xenpage: cannot build that host: {e}", err=True)
        sys.exit(1)
    path = host_path(obj.state_dir)
    if path.exists():
        shutil.rmtree(path)
    host.save(path)
    summary = host_summary(host)
    if as_json:
        print_json(summary)
    else:
        click.echo(f"created a {mem_mib} MiB host with {len(host.guest_domains())} domains in {path}")


def host_summary(host) -> dict:
    from ..abi import mm
    counts = {}
    ci = host.ft.count_info
    st = (ci >> mm.PGC_state_shift) & 3
    for s, name in mm.STATE_NAMES.items():
        counts[name] = int((st == s).sum())
    valid = host.e820.valid_window(0, host.nframes)
    counts["invalid"] = int((~valid).sum())
    counts["broken"] = int(((ci & mm.PGC_broken) != 0).sum())
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
    with obj.hypervisor(save=False) as hv:
        if hv.kind != "sim":
            raise click.UsageError("host show describes the simulated host (use --backend sim)")
        s = host_summary(hv.host)
    if as_json:
        print_json(s)
        return
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
    from .demo import run_demo
    sys.exit(run_demo(obj.state_dir or default_state_dir(), as_json=as_json, keep=keep))
from . import reliability  # noqa: E402,F401  (registers recover)
from . import ras  # noqa: E402,F401  (registers retired, retire, badpages, retire-switch, mce-inject, year, host reboot)
