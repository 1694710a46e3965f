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
