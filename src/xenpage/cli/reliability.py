"""``xenpage recover``: finish or undo an exchange interrupted by the death of the toolstack
(from the write-ahead journal in the state directory), and resume the guest."""

from __future__ import annotations

import sys

import click

from .main import Ctx, cli
from .output import print_json


@cli.command("recover")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def recover_cmd(obj: Ctx, as_json: bool):
    """Complete or roll back an interrupted exchange (write-ahead journal), resume the guest."""
    from ..backends import default_state_dir
    from ..toolstack.journal import recover
    with obj.hypervisor() as hv:
        sd = getattr(hv, "state_dir", None) or obj.state_dir or default_state_dir()
        from ..toolstack.journal import JournalError, acquire
        with acquire(sd):
            try:
                res = recover(hv, sd)
            except JournalError as e:
                sys.stderr.write(f"xenpage: {e}\n")
                sys.exit(2)
    if as_json:
        print_json(res.to_json())
    else:
        for line in res.lines():
            click.echo(line, err=bool(res.errors))
    sys.exit(0 if res.ok else 1)
