"""``xenpage``: xen-hptool's ``mem-offline|mem-online|mem-status`` (a drop-in, with the same
prefix matching), plus ``list``, ``host``, ``demo`` and more.

Global options come before the command: ``--backend`` forces ``sim`` or ``xen`` (default: real
Xen in a control domain, the simulator elsewhere); ``--state-dir`` (or ``$XENPAGE_STATE_DIR``)
overrides where xenpage keeps its state (:mod:`xenpage.paths`: ``/var/lib/xenpage`` on real
Xen, ``$XDG_STATE_HOME/xenpage`` on the simulator, whose saved host lives there too).
"""

from __future__ import annotations

import errno
import os
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path

import click

from ..backends import choose_backend
from ..errors import HostFileError
from ..paths import StatePaths, state_paths
from ..toolstack import hptool
from ..toolstack.pcpu import SinglePcpuHost
from . import output
from .output import emit_report, fail

#: what the ``mem-*`` commands take (xenpage's additions to xen-hptool's one MFN)
MFN_ARGS = "<mfn>|<a>-<b>|<a>,<b>,..."

EXTRA_HELP_TAIL = """\
  mem-offline, mem-online and mem-status take several MFNs, START-END ranges and
  comma-separated lists (hex); mem-offline also --hvm=migrate|exchange|none,
  --fallback=migrate, --migrate-to=DIR, --link=MBITS[:MS], --force, --no-split-guard.
  Every command takes -h/--help, and --json (one JSON document: command, exit, fields).
Global options (before the command): --state-dir DIR, --backend sim|xen; -V, --version
"""


def extra_help() -> str:
    """xenpage's own commands after xen-hptool's help, from the command tree (never a
    command missing): every command and subcommand with the first line of its help."""
    rows: list[tuple[str, str]] = []
    for name, c in sorted(cli.commands.items()):
        if name in hptool.COMMANDS or name in _CPU_COMMANDS:
            continue
        if isinstance(c, click.Group):
            for sub, sc in sorted(c.commands.items()):
                rows.append((f"{name} {sub}", sc.get_short_help_str(64)))
            if not c.invoke_without_command:
                continue
        rows.append((name, c.get_short_help_str(64)))
    rows.sort()
    rows = [("mem-offline|online|status", "as xen-hptool, for many frames (below)")] + rows
    width = max(len(n) for n, _ in rows) + 2
    body = "".join(f"  {n:<{width}}{h}\n" for n, h in rows)
    return "\nxenpage also has (xenpage <command> -h for each):\n" + body + EXTRA_HELP_TAIL


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
            fail(f"'{what}' exists only on the simulated host (--backend sim); this is real "
                 f"Xen: nothing done{hint}", 2)

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
    fail(str(e), 2)


def command_of(args: list[str]) -> str:
    """The command an argv names, as its envelope says it (``host show``, ``badpages
    clear``): global options skipped, xen-hptool's prefixes resolved."""
    it = iter(args)
    for a in it:
        if a in ("--state-dir", "--backend"):
            next(it, None)
            continue
        if a.startswith("-"):
            continue
        name = a if a in cli.commands and a not in hptool.COMMANDS else hptool.match_command(a)
        if name is None:
            return a
        c = cli.commands.get(name)
        if isinstance(c, click.Group):
            for b in it:
                if b.startswith("-"):
                    continue
                if b in c.commands:
                    return f"{name} {b}"
                break
        return name
    return "xenpage"


class HptoolGroup(click.Group):
    """Resolves xen-hptool's commands by prefix in hptool's table order, then xenpage's own
    commands by exact name; unknown words get hptool's message and exit code."""

    def main(self, args=None, **kwargs):
        """Every command: ``--json`` mode for :mod:`.output` (a refusal becomes an envelope
        too), and a state file that cannot be opened or written is one ``xenpage: <file>:
        <why>`` line, exit 2 -- never a traceback."""
        args = list(sys.argv[1:] if args is None else args)
        name = command_of(args)
        as_json = "--json" in args
        output.begin(name, as_json, lines=(name == "retired"))
        tee = None
        if as_json:
            tee = output.StderrTee(sys.stderr)
            sys.stderr = tee
        try:
            try:
                return super().main(args, **kwargs)
            except OSError as e:
                if e.filename is None or isinstance(e, BrokenPipeError):
                    raise
                # a state file that cannot be written or opened (read-only or full
                # directory, a planted symbolic link: ELOOP) -- what and where
                why = "a symbolic link: refused" if e.errno == errno.ELOOP else (e.strerror or str(e))
                fail(f"{e.filename}: {why}", 2)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if tee is not None:
                output.finish(code, "".join(tee.seen))
            raise
        finally:
            if tee is not None:
                sys.stderr = tee.stream

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
def _host_errors(before=None):
    """The refusals every hypervisor-backed command shares: a single-pCPU host (exit 1) and
    a saved host that cannot be read or written (exit 2), each as one ``xenpage:`` line
    (after what ``before()`` prints: the report of a command that did its work but whose host
    could not be saved)."""
    try:
        yield
    except SinglePcpuHost as e:
        fail(str(e), 1)
    except HostFileError as e:
        if before is not None:
            before()
        fail(str(e), 2)


def _hptool_args(args: tuple[str, ...]) -> tuple[list[str], bool]:
    rest = [a for a in args if a != "--json"]
    return rest, len(rest) != len(args)


_HELP_WORDS = ("-h", "--help")

_MEM_HELP = {
    "mem-status": "Query frames' offline state (xen-hptool mem-status): per frame, xen-hptool's "
                  "two lines; exit 1 if any frame could not be queried.",
    "mem-online": "Bring frames back online (xen-hptool mem-online): per frame, xen-hptool's "
                  "lines; exit 1 if any frame could not be onlined.",
}


def _mem_help(name: str, text: str) -> None:
    """``mem-* -h``/``--help`` (xen-hptool has no such option: it would read the word as an
    MFN): the usage, on stdout, exit 0."""
    click.echo(f"Usage: xenpage mem-{name.split('-', 1)[1]} {MFN_ARGS} [...] [--json]\n")
    click.echo(text)
    click.echo("\nMFNs are hex digits with an optional 0x, nothing else; a range A-B is "
               "inclusive (at most 0x100000 frames);\na list is comma-separated. Anything else "
               "is refused and nothing is done.")
    sys.exit(0)


def _usage(name: str) -> None:
    """xen-hptool's answer to a mem command without its MFN: its help on stderr, exit 1."""
    sys.stderr.write(hptool.HELP)
    fail(f"{name} takes {MFN_ARGS}", 1) if output.json_mode() else sys.exit(1)


def _mfns_or_refuse(args: list[str], as_array: bool = False):
    """The MFNs given (a list; with ``as_array`` the int64 array and whether a range was
    given), or a refusal that does nothing."""
    try:
        return parse_mfn_array(args) if as_array else parse_mfn_args(args)
    except hptool.BadMfn as e:
        fail(f"{e}; nothing done", 1)


def _mem_command(name: str, fn, writes: bool):
    @cli.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []},
                 add_help_option=False, help=_MEM_HELP[name])
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    @click.pass_obj
    def cmd(obj: Ctx, args):
        if any(a in _HELP_WORDS for a in args):
            _mem_help(name, _MEM_HELP[name])
        rest, as_json = _hptool_args(args)
        if not rest:
            _usage(name)
        mfns = _mfns_or_refuse(rest)
        with _host_errors(), obj.hypervisor(save=writes) as hv:
            reports = [fn(hv, m) for m in mfns]
        sys.exit(emit_report(name, _frames_report(reports), as_json))
    return cmd


def _frames_report(reports) -> "hptool.Report":
    """One report of many frames: each frame's lines in order (as xen-hptool run once per
    frame prints them), exit 1 if any frame's would be, ``frames``: each frame's answer."""
    from ..toolstack.report import Report
    r = Report()
    frames = []
    for x in reports:
        r.extend(x)
        r.exit_code = max(r.exit_code, x.exit_code)
        frames.append(dict({k: v for k, v in x.data.items() if k != "command"}, exit=x.exit_code))
    r.data = {"frames": frames}
    return r


_mem_command("mem-status", hptool.mem_status_noted, writes=False)  # a query changes nothing
_mem_command("mem-online", hptool.mem_online, writes=True)


def mfn_spans(args: list[str]) -> list[tuple[int, int]]:
    """MFNs, inclusive ranges ``START-END`` and comma-separated lists of either (hex, each
    MFN as strict as :func:`~xenpage.toolstack.hptool.parse_mfn`), as ``(first, last)``
    spans in the order given (no numpy: ``mem-status`` on real Xen loads none)."""
    out: list[tuple[int, int]] = []
    for a in args:
        for part in a.split(","):
            if not part:
                raise hptool.BadMfn(f"'{a}' has an empty item")
            if "-" not in part[1:]:
                m = hptool.parse_mfn(part)
                out.append((m, m))
                continue
            lo, _, hi = part.partition("-") if not part.startswith("-") else ("-", "", "")
            if not lo or lo == "-":
                raise hptool.BadMfn(f"'{part}' is negative")
            try:
                s, e = hptool.parse_mfn(lo), hptool.parse_mfn(hi)
            except hptool.BadMfn as err:
                raise hptool.BadMfn(f"range '{part}': {err}") from None
            if e < s:
                raise hptool.BadMfn(f"range '{part}' ends before it starts")
            if e - s >= MAX_RANGE:
                raise hptool.BadMfn(f"range '{part}' is longer than {MAX_RANGE:#x} frames")
            out.append((s, e))
    return out


def parse_mfn_args(args: list[str]) -> list[int]:
    """:func:`mfn_spans`, every MFN listed in order."""
    return [m for s, e in mfn_spans(args) for m in range(s, e + 1)]


def parse_mfn_array(args: list[str]):
    """:func:`mfn_spans` as an int64 array (no Python int per frame of a range), and whether
    a range of more than one frame was given."""
    import numpy as np
    spans = mfn_spans(args)
    parts = [np.arange(s, e + 1, dtype=np.int64) for s, e in spans]
    return ((np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)),
            any(e > s for s, e in spans))


MAX_RANGE = 1 << 20


@cli.command("mem-offline", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                             "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_obj
def mem_offline_cmd(obj: Ctx, args):
    """xen-hptool mem-offline <mfn> [more MFNs or START-END ranges] [--json] [--force] [--each]:
    offline the frames; owned frames of PV guests are exchanged under one suspend per guest.
    A range prints one summary line (frames per outcome) and, on a terminal, progress;
    ``--each`` (or ``-v``) prints xen-hptool's lines for every frame of it as well.
    ``--force``: go ahead on a single-pCPU host (risking Xen 4.17's PoD-lock hang).
    ``--no-split-guard``: offline as stock does, without guard frames (only for a Xen that
    has the 2026 fix of its buddy split; see :mod:`xenpage.toolstack.split_guard`).
    ``--hvm=migrate|exchange|none``, ``--fallback=migrate``, ``--migrate-to=DIR``,
    ``--link=MBITS[:MS]``: see :mod:`xenpage.cli.retire_opts`."""
    from ..toolstack.offline import mem_offline
    from ..toolstack.pcpu import allow_single_pcpu
    from .retire_opts import retire_options
    if any(a in _HELP_WORDS for a in args):
        _mem_help("mem-offline", _rst_plain(mem_offline_cmd.__doc__ or ""))
    rest, as_json = _hptool_args(args)
    force = "--force" in rest
    guard = None if "--no-split-guard" not in rest else False
    each_asked = "--each" in rest or "-v" in rest
    rest = [a for a in rest if a not in ("--force", "--no-split-guard", "--each", "-v")]
    try:
        rest, retire_args = retire_options(rest)
    except ValueError as e:
        fail(f"{e}; nothing done", 1)
    if not rest:
        _usage("mem-offline")
    mfns, ranged = _mfns_or_refuse(rest, as_array=True)
    _check_migrate_to(obj, retire_args.migrate_to)
    from .progress import frames_progress
    done: list = []

    def said_first() -> None:  # the report of what was done, before an error saving the host
        if done and not as_json:  # (under --json the error envelope is the one document)
            emit_report("mem-offline", done[0].report, as_json)

    try:
        with _host_errors(said_first), obj.hypervisor() as hv, allow_single_pcpu(force), \
                retire_args.open(hv, obj.paths.state_dir) as retire, \
                frames_progress("offlining", mfns.size, enabled=ranged) as progress:
            res = mem_offline(hv, mfns, retire=retire, split_guard=guard,
                              journal_dir=obj.paths.journal_dir,
                              each=each_asked or not ranged, summary=ranged,
                              progress=progress)
            done.append(res)
    except ValueError as e:  # --migrate-to on real Xen
        fail(f"{e}; nothing done", 1)
    sys.exit(emit_report("mem-offline", res.report, as_json))


def _check_migrate_to(obj: Ctx, dest) -> None:
    """``--migrate-to DIR`` names a saved simulated host, checked before this host is even
    opened: a typo never creates a host (or takes a lock) anywhere."""
    if dest is None or obj.kind != "sim":
        return  # on real Xen retire_options' open() refuses --migrate-to itself
    from ..backends.sim import host_path
    if Path(dest).resolve() == Path(obj.paths.state_dir).resolve():
        return
    if not (host_path(Path(dest)) / "host.json").is_file():
        fail(f"--migrate-to {dest}: no saved host there (create one with 'xenpage --state-dir "
             f"{dest} host create'); nothing done", 1)


def _rst_plain(text: str) -> str:
    import inspect
    import re
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", inspect.cleandoc(text)).replace("``", "'")


@cli.command("dump-p2m")
@click.argument("domid", type=click.IntRange(0, 0x7FEF))
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", type=click.IntRange(min=0), default=None, help="only the first N pfns")
@click.pass_obj
def dump_p2m_cmd(obj: Ctx, domid, as_json, limit):
    """A guest's pfn -> mfn with page types, like 'xen-mfndump dump-p2m'."""
    from ..toolstack.mfndump import dump_p2m
    with _host_errors(), obj.hypervisor(save=False) as hv:
        r = dump_p2m(hv, domid, limit)
    extra = {}
    if r.exit_code and "error" not in r.data:
        extra["error"] = "; ".join(l.text for l in r.lines if l.stream == "err")
        extra["domid"] = domid
    sys.exit(emit_report("dump-p2m", r, as_json, **extra))


@cli.command("help")
def help_cmd():
    """xen-hptool's help (on stderr), then every xenpage command."""
    sys.stderr.write(hptool.HELP)
    sys.stderr.write(extra_help())


_CPU_COMMANDS = ("cpu-online", "cpu-offline", "smt-enable", "smt-disable")


def _not_memory(name: str):
    @cli.command(name, context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []},
                 add_help_option=False, help=f"xen-hptool {name} (not handled by xenpage)")
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def cmd(args):
        fail(f"'{name}' is an xen-hptool CPU command; xenpage only handles memory (use "
             "xen-hptool itself)", 1)
    cmd.__doc__ = f"xen-hptool {name} (not handled by xenpage)"


for _n in _CPU_COMMANDS:
    _not_memory(_n)

from . import commands  # noqa: E402,F401  (registers list, host, demo, the service's commands)


_OUT_OF_MEMORY = (b"xenpage: out of memory; nothing more done (an interrupted exchange, if any, "
                  b"is in the journal: run 'xenpage recover')\n")


_OUT_OF_MEMORY_LOADING = (b"xenpage: out of memory loading its libraries (failed to map a "
                          b"shared object); nothing done\n")


def _short_help(group: click.Group) -> None:
    """``-h`` as well as ``--help`` on every command (not before the command: xen-hptool
    answers ``-h`` with "Unrecognised command"); the mem-* commands handle both themselves."""
    for c in group.commands.values():
        if c.context_settings.get("help_option_names") != []:
            c.context_settings["help_option_names"] = ["-h", "--help"]
        if isinstance(c, click.Group):
            _short_help(c)


_short_help(cli)


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="xenpage", standalone_mode=True)
    except BrokenPipeError:  # pragma: no cover
        sys.exit(1)
    except ImportError as e:
        # a library that cannot be mapped for want of address space (ulimit -v): said on one
        # line; nothing was touched yet (the modules load before any state is read)
        if "failed to map segment" not in str(e) and "Cannot allocate memory" not in str(e):
            raise
        os.write(2, _OUT_OF_MEMORY_LOADING)
        os._exit(2)
    except (MemoryError, SystemError):
        # out of memory (SystemError: as numpy and CPython say it from C code) outside what
        # mem-offline salvages itself: nothing half-done is saved -- an exchange in flight is
        # in the journal for 'xenpage recover'.  The line is written without allocating.
        os.write(2, _OUT_OF_MEMORY)
        os._exit(2)


if __name__ == "__main__":  # pragma: no cover
    # ``python -m xenpage.cli.main``: this file runs as ``__main__``, while the command modules
    # register on ``xenpage.cli.main.cli`` -- run that tree, not this copy's.
    from xenpage.cli.main import main as _main
    _main()
