"""``xenpage recover``: finish or undo an exchange interrupted by the death of the toolstack
(from the write-ahead journal in the state directory, :mod:`xenpage.paths`), resume the
guest, online the split-guard frames it held and restore dom0's vCPU affinity."""

from __future__ import annotations

import sys

import click

from .main import Ctx, cli
from .output import emit, fail


@cli.command("recover")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def recover_cmd(obj: Ctx, as_json: bool):
    """Complete or roll back an interrupted exchange (write-ahead journal), resume the guest."""
    from ..toolstack import pcpu
    from ..toolstack.journal import JournalError, acquire, recover
    sd = obj.paths.journal_dir
    with obj.hypervisor() as hv:
        with acquire(sd):
            try:
                res = recover(hv, sd)
            except JournalError as e:
                fail(str(e), 2)
            from ..toolstack import hvm_exchange
            try:
                hres = hvm_exchange.recover(hv, sd)
            except hvm_exchange.JournalError as e:
                fail(str(e), 2)
            from ..toolstack import split_guard
            try:
                back = split_guard.recover(hv, sd)
            except ValueError as e:
                fail(str(e), 2)
            try:
                affinity = pcpu.restore_recorded(hv, sd)
            except (ValueError, OSError) as e:
                fail(str(e), 2)
            from ..toolstack import retire
            try:
                remarked = retire.recover_unmarked(hv, sd)
            except ValueError as e:
                fail(str(e), 2)
    code = 0 if res.ok and hres.ok else 1
    if as_json:
        sys.exit(emit("recover", code, **dict(res.to_json(), guard_frames_onlined=back,
                                              hvm=hres.to_json(), frames_marked_again=remarked,
                                              dom0_affinity_restored={str(v): c for v, c in affinity.items()})))
    else:
        for line in res.lines():
            click.echo(line, err=bool(res.errors))
        for line in hres.lines():
            click.echo(line, err=bool(hres.errors))
        if back:
            click.echo(f"split guard: {len(back)} guard frame(s) a killed mem-offline left "
                       f"offline are online again ({', '.join(f'{m:x}' for m in back[:8])}"
                       f"{', ...' if len(back) > 8 else ''})")
        if remarked:
            click.echo(f"xenpage: {len(remarked)} frame(s) a killed mem-offline had unmarked for a "
                       f"migration are marked offline again ({', '.join(f'{m:x}' for m in remarked[:8])}"
                       f"{', ...' if len(remarked) > 8 else ''})")
        for v, cpus in sorted(affinity.items()):
            click.echo(f"xenpage: dom0 vCPU {v} a killed mem-offline left pinned off pCPU 0 "
                       f"may run on pCPUs {','.join(map(str, cpus))} again")
    sys.exit(code)
