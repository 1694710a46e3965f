"""xenpage's own commands: ``list``; registers the others (recover, the service's, the
simulator's).  Every command module imports only click at load time: what a command needs
is imported when it runs (``xenpage mem-status`` on real Xen loads no simulator, no rich)."""

from __future__ import annotations

import click

from .main import Ctx, cli
from .output import emit


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
        emit("list", 0, domains=[dict(d.to_json(), type=types[d.domid]) for d in doms])
        return
    print(f"{'Name':<40} {'ID':>5} {'Type':>4} {'Mem':>6} {'VCPUs':>5}\tState")
    for d in doms:
        print(f"{d.name or '(null)':<40} {d.domid:>5} {types[d.domid].upper():>4} {d.tot_pages // 256:>6} "
              f"{d.nr_vcpus:>5}\t{d.state_letters()}")


from . import reliability  # noqa: E402,F401  (registers recover)
from . import ras  # noqa: E402,F401  (registers retired, retire, badpages, retire-switch)
from . import sim  # noqa: E402,F401  (registers host create|show|reboot, demo, mce-inject, year)
from . import fleet  # noqa: E402,F401  (registers fleet study|inventory)


@cli.command("owner", context_settings={"ignore_unknown_options": True})
@click.argument("mfns", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def owner_cmd(obj: Ctx, mfns: tuple[str, ...], as_json: bool):
    """Who owns each frame (MFN, hex; START-END ranges up to 4096 frames): the owning
    domain, the pfn/gfn, the page type, the offline state -- with read-only calls only
    (the offline query, the M2P, getpageframeinfo3), on both backends; nothing changes."""
    from ..toolstack.owner import frame_owners
    from .main import _mfns_or_refuse
    from .output import fail
    arr, _ = _mfns_or_refuse(list(mfns), as_array=True)
    if arr.size > 4096:
        fail(f"{arr.size} frames: owner answers at most 4096 at a time; nothing done", 1)
    with obj.hypervisor(save=False) as hv:
        res = frame_owners(hv, arr)
    if as_json:
        emit("owner", 0, frames=[o.to_json() for o in res])
        return
    for o in res:
        click.echo(o.line())
