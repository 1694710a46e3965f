"""``xenpage``: xen-hptool's ``mem-offline|mem-online|mem-status`` (a drop-in, with the same
prefix matching), plus ``list``, ``host``, ``demo`` and more.

Global options come before the command: ``--backend`` forces ``sim`` or ``xen`` (default: real
Xen in a control domain, the simulator elsewhere); ``--state-dir`` (or ``$XENPAGE_STATE_DIR``)
overrides where xenpage keeps its state (:mod:`xenpage.paths`: ``/var/lib/xenpage`` on real
Xen, ``$XDG_STATE_HOME/xenpage`` on the simulator, whose saved host lives there too).
"""

from __future__ import annotations

import errno
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

from ..backends import choose_backend
from ..errors import HostFileError
from ..paths import StatePaths, state_paths
from ..toolstack import hptool
from ..toolstack.pcpu import SinglePcpuHost
from .output import emit

EXTRA_HELP = """
xenpage also has (each takes --json):
  list                     domains, like 'xl list'
  host create|show         create or describe the saved simulated host
  demo                     retire pages on a fresh simulated host, with a report
  dump-p2m <domid>         a guest's pfn -> mfn with page types (like xen-mfndump)
  mem-offline <mfn|a-b>... several frames or ranges; PV guests' frames are exchanged,
                           HVM guests migrated (--hvm=migrate|exchange|none,
                           --migrate-to=DIR, --link=MBITS[:MS]); --fallback=migrate
Global options (before the command): --state-dir DIR, --backend sim|xen; -V, --version
"""


class Ctx:
    def __init__(self, state_dir: Path | None, backend: str):
        self.state_dir = state_dir
        self.backend = backend
        self._kind: str | None = None

    @property
    def kind(self) -> str:
        """The backend this command acts on: ``sim`` or ``xen`` (``auto`` resolved once)."""
        if self._kind is None:
            self._kind = choose_backend(self.backend)
        return self._kind

    @property
    def paths(self) -> StatePaths:
        """Where this backend keeps its state (:mod:`xenpage.paths`), ``--state-dir`` applied."""
        return state_paths(self.kind, self.state_dir)

    def simulator_only(self, what: str, hint: str = "") -> None:
        """A command that exists only on the simulated host: on real Xen say so, exit 2,
        nothing done (the backend is never opened)."""
        if self.kind != "sim":
            sys.stderr.write(f"xenpage: '{what}' exists only on the simulated host "
                             f"(--backend sim); this is real Xen: nothing done{hint}\n")
            sys.exit(2)

    @contextmanager
    def simulated_host(self, what: str, save: bool = True):
        """The simulated backend of a simulator-only command (its ``host`` is the simulated
        machine itself): refuses on real Xen first (:meth:`simulator_only`)."""
        self.simulator_only(what)
        with self.hypervisor(save=save) as hv:
            yield hv

    @contextmanager
    def hypervisor(self, save: bool = True):
        kind = self.kind
        if kind == "xen":
            from ..backends import xen as xenbackend  # noqa: F401  (real-Xen backend)
            with ExitStack() as stack:
                try:
                    hv = stack.enter_context(xenbackend.open_xen())
                except xenbackend.XenBackendError as e:
                    host_file_error(e)  # "xenpage: <why>", exit 2
                yield hv
            return
        from ..backends.sim import open_host
        with ExitStack() as stack:
            try:
                hv = stack.enter_context(open_host(self.paths.state_dir, save=save))
            except HostFileError as e:
                # A saved host that cannot be read: say so, touch nothing (every command).
                host_file_error(e)
            yield hv


def host_file_error(e: Exception) -> None:
    sys.stderr.write(f"xenpage: {e}\n")
    sys.exit(2)


class HptoolGroup(click.Group):
    """Resolves xen-hptool's commands by prefix in hptool's table order, then xenpage's own
    commands by exact name; unknown words get hptool's message and exit code."""

    def parse_args(self, ctx, args):
        # xen-hptool takes its first argument as a command whatever it looks like: an
        # unknown option gets the same answer as an unknown command.
        orig = list(args)  # click consumes the list it parses
        try:
            return super().parse_args(ctx, args)
        except click.NoSuchOption as e:
            word = next((a for a in orig if a.split("=", 1)[0] == e.option_name), e.option_name)
            sys.stderr.write(f"Unrecognised command '{word}' -- try 'xen-hptool help'\n")
            ctx.exit(1)

    def resolve_command(self, ctx, args):
        word = args[0]
        if word in self.commands and word not in hptool.COMMANDS:
            return word, self.commands[word], args[1:]
        name = hptool.match_command(word)
        if name is None:
            sys.stderr.write(f"Unrecognised command '{word}' -- try 'xen-hptool help'\n")
            ctx.exit(1)
        return name, self.commands[name], args[1:]


def version() -> str:
    """The installed distribution's version (package metadata), else the source tree's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version
    try:
        return dist_version("xenpage")
    except PackageNotFoundError:
        from .. import __version__
        return __version__


def _print_version(ctx, _param, value) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"xenpage {version()}")
        ctx.exit(0)


@click.group(cls=HptoolGroup, invoke_without_command=True,
             context_settings={"help_option_names": ["--help"]})
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True,
              callback=_print_version, help="print xenpage's version and exit")
@click.option("--state-dir", type=click.Path(path_type=Path), envvar="XENPAGE_STATE_DIR",
              help="directory of the saved simulated host")
@click.option("--backend", type=click.Choice(["auto", "sim", "xen"]), default="auto",
              envvar="XENPAGE_BACKEND", show_default=True)
@click.pass_context
def cli(ctx, state_dir, backend):
    """Retire faulty memory pages on Xen hosts (xen-hptool compatible)."""
    ctx.obj = Ctx(state_dir, backend)
    if ctx.invoked_subcommand is None:
        sys.stderr.write(hptool.HELP)
        ctx.exit(0)


@contextmanager
def _host_errors():
    """The refusals every hypervisor-backed command shares: a single-pCPU host (exit 1) and
    a saved host that cannot be read (exit 2), each as one ``xenpage:`` line."""
    try:
        yield
    except SinglePcpuHost as e:
        sys.stderr.write(f"xenpage: {e}\n")
        sys.exit(1)
    except HostFileError as e:
        sys.stderr.write(f"xenpage: {e}\n")
        sys.exit(2)


def _hptool_args(args: tuple[str, ...]) -> tuple[list[str], bool]:
    rest = [a for a in args if a != "--json"]
    return rest, len(rest) != len(args)


def _mem_command(name: str, fn):
    @cli.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []},
                 add_help_option=False, help=f"xen-hptool {name} <mfn> [--json]")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_obj
    def cmd(obj: Ctx, args):
        rest, as_json = _hptool_args(args)
        if len(rest) != 1:
            sys.stderr.write(hptool.HELP)
            sys.exit(1)
        try:
            mfn = hptool.parse_mfn(rest[0])
        except hptool.BadMfn as e:
            sys.stderr.write(f"xenpage: {e}; nothing done\n")
            sys.exit(1)
        with _host_errors(), obj.hypervisor() as hv:
            report = fn(hv, mfn)
        sys.exit(emit(report, as_json))
    cmd.__doc__ = f"xen-hptool {name} <mfn> [--json]"
    return cmd


_mem_command("mem-status", hptool.mem_status_noted)
_mem_command("mem-online", hptool.mem_online)


def parse_mfn_args(args: list[str]) -> list[int]:
    """MFNs and inclusive ranges ``START-END`` (hex, as xen-hptool reads MFNs)."""
    out: list[int] = []
    for a in args:
        if "-" in a.strip()[1:]:
            lo, hi = a.strip().split("-", 1) if not a.strip().startswith("-") else (a, "")
            s, e = hptool.parse_mfn(lo), hptool.parse_mfn(hi)
            if e < s:
                raise hptool.BadMfn(f"range '{a}' ends before it starts")
            if e - s >= MAX_RANGE:
                raise hptool.BadMfn(f"range '{a}' is longer than {MAX_RANGE:#x} frames")
            out.extend(range(s, e + 1))
        else:
            out.append(hptool.parse_mfn(a))
    return out


MAX_RANGE = 1 << 20


@cli.command("mem-offline", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                             "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def mem_offline_cmd(obj: Ctx, args):
    """xen-hptool mem-offline <mfn> [more MFNs or START-END ranges] [--json] [--force]:
    offline the frames; owned frames of PV guests are exchanged under one suspend per guest.
    ``--force``: go ahead on a single-pCPU host (risking Xen 4.17's PoD-lock hang).
    ``--no-split-guard``: offline as stock does, without guard frames (only for a Xen that
    has the 2026 fix of its buddy split; see :mod:`xenpage.toolstack.split_guard`).
    ``--hvm=migrate|exchange|none``, ``--fallback=migrate``, ``--migrate-to=DIR``,
    ``--link=MBITS[:MS]``: see :mod:`xenpage.cli.retire_opts`."""
    from ..toolstack.offline import mem_offline
    from ..toolstack.pcpu import allow_single_pcpu
    from .retire_opts import retire_options
    rest, as_json = _hptool_args(args)
    force = "--force" in rest
    guard = None if "--no-split-guard" not in rest else False
    rest = [a for a in rest if a not in ("--force", "--no-split-guard")]
    try:
        rest, retire_args = retire_options(rest)
    except ValueError as e:
        sys.stderr.write(f"xenpage: {e}; nothing done\n")
        sys.exit(1)
    if not rest:
        sys.stderr.write(hptool.HELP)
        sys.exit(1)
    try:
        mfns = parse_mfn_args(rest)
    except hptool.BadMfn as e:
        sys.stderr.write(f"xenpage: {e}; nothing done\n")
        sys.exit(1)
    try:
        with _host_errors(), obj.hypervisor() as hv, allow_single_pcpu(force), \
                retire_args.open(hv, obj.paths.state_dir) as retire:
            res = mem_offline(hv, mfns, retire=retire, split_guard=guard,
                              journal_dir=obj.paths.journal_dir)
    except ValueError as e:  # --migrate-to on real Xen
        sys.stderr.write(f"xenpage: {e}; nothing done\n")
        sys.exit(1)
    sys.exit(emit(res.report, as_json))


@cli.command("dump-p2m")
@click.argument("domid", type=int)
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", type=int, default=None, help="only the first N pfns")
@click.pass_obj
def dump_p2m_cmd(obj: Ctx, domid, as_json, limit):
    """A guest's pfn -> mfn with page types, like 'xen-mfndump dump-p2m'."""
    from ..toolstack.mfndump import dump_p2m
    with obj.hypervisor(save=False) as hv:
        r = dump_p2m(hv, domid, limit)
    sys.exit(emit(r, as_json))


@cli.command("help")
def help_cmd():
    """xen-hptool's help (on stderr), then xenpage's own commands."""
    sys.stderr.write(hptool.HELP)
    sys.stderr.write(EXTRA_HELP)


def _not_memory(name: str):
    @cli.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
                 add_help_option=False, help=f"xen-hptool {name} (not handled by xenpage)")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def cmd(args):
        sys.stderr.write(f"xenpage: '{name}' is an xen-hptool CPU command; xenpage only handles "
                         "memory (use xen-hptool itself)\n")
        sys.exit(1)
    cmd.__doc__ = f"xen-hptool {name} (not handled by xenpage)"


for _n in ("cpu-online", "cpu-offline", "smt-enable", "smt-disable"):
    _not_memory(_n)

from . import commands  # noqa: E402,F401  (registers list, host, demo, the service's commands)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="xenpage", standalone_mode=True)
    except BrokenPipeError:  # pragma: no cover
        sys.exit(1)
    except OSError as e:
        if e.filename is None:
            raise
        # a state file that cannot be written or opened (read-only or full directory, a
        # planted symbolic link: ELOOP) -- what went wrong and where, never a traceback
        why = "a symbolic link: refused" if e.errno == errno.ELOOP else (e.strerror or str(e))
        sys.stderr.write(f"xenpage: {e.filename}: {why}\n")
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
