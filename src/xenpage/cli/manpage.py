"""``xenpage(1)``, written from the CLI's own command tree (click), so the page never drifts
from the commands: every command and subcommand with its usage, help and options, plus what
the tree does not hold (files, environment, exit status, the systemd unit, completion).

``python -m xenpage.cli.manpage > xenpage.1`` (``make man`` writes ``build/man/xenpage.1``).
"""

from __future__ import annotations

import re
import sys

import click

NAME = "xenpage \\- retire faulty memory pages on Xen hosts (xen-hptool compatible)"

DESCRIPTION = """\
xenpage retires faulty memory pages on Xen hosts without stopping the guests on them. It is a
drop-in for xen-hptool mem-offline, mem-online and mem-status: the same lines on the same
streams, the same exit codes and the same prefix matching of commands. A frame of a PV guest is
exchanged in place under one suspend per guest; an HVM guest is live-migrated off its frames (or
its frames exchanged in place with --hvm=exchange on the simulator).

In a Xen control domain (/proc/xen/capabilities says control_d) xenpage uses the real-Xen
backend (Xen 4.17's libraries through ctypes); elsewhere it acts on a saved simulated Xen 4.17
host. --backend forces one. Commands marked (simulator) exist only for the simulated host.

The page-retirement service (retired) follows dom0's machine-check log, counts corrected errors
in leaky buckets and retires frames by policy; the retired-page list survives restarts and
reboots (badpages --boot-option prints Xen's badpage= value)."""

FILES = [
    ("/var/lib/xenpage", "real Xen, as the unit in contrib/ runs the service (--state-dir, "
     "StateDirectory=xenpage): the write-ahead exchange journal, the split-guard record, the "
     "retired-page list (retired.db) and the service's log positions"),
    ("/etc/xenpage/retired.conf", "real Xen, as the unit runs the service (--config, "
     "ConfigurationDirectory=xenpage): the retirement policy (mcelog.conf and rasdaemon "
     "syntax)"),
    ("/run/xenpage.lock", "real Xen: keeps two xenpage processes apart ($XENPAGE_LOCK)"),
    ("$XDG_STATE_HOME/xenpage", "the simulator: the saved host, its journal, its retired-page "
     "list (default ~/.local/state/xenpage)"),
    ("/var/log/mcelog", "dom0's machine-check log as mcelog writes it, read by retired"),
]

ENVIRONMENT = [
    ("XENPAGE_STATE_DIR", "the state directory (as --state-dir)"),
    ("XENPAGE_BACKEND", "auto, sim or xen (as --backend)"),
    ("XDG_STATE_HOME", "base of the simulator's default state directory"),
    ("XENPAGE_LOCK", "the host-wide lock file on real Xen (default /run/xenpage.lock)"),
    ("PAGE_CE_THRESHOLD, PAGE_CE_REFRESH_CYCLE, PAGE_CE_ACTION, ROW_CE_*",
     "rasdaemon's policy keys, read by the retirement service"),
    ("_XENPAGE_COMPLETE", "shell completion: eval \"$(_XENPAGE_COMPLETE=bash_source xenpage)\" "
     "(zsh_source, fish_source for zsh and fish)"),
]

EXIT_STATUS = """\
mem-offline, mem-online and mem-status exit as xen-hptool does: 0 on success, 1 on a refused or
failed operation or bad usage (xen-hptool's own codes, kept for scripts). Other commands exit 0
on success, 1 when they refuse their input (nothing is done) and 2 when the state directory,
the saved host, the journal or the policy file cannot be used."""

JSON_OUTPUT = """\
With --json every command writes one JSON object on stdout: "command" (the command's path,
e.g. "host show"), "exit" (the exit status) and the command's own typed fields, described by
the JSON Schema schema/envelope.json installed with the package (xenpage/cli/schema). A
refusal under --json is {"command", "exit", "error"} on stdout, with the usual xenpage: line on
stderr. retired --json writes JSON lines (one event each) and its envelope last. Status words
are decoded the same way by every command: {op, status, hex, flags, owner, untouched}."""

SEE_ALSO = ["xen-hptool(8)", "xl(1)", "mcelog(8)", "rasdaemon(8)", "systemd.service(5)"]


def esc(text: str) -> str:
    """Roff-escape running text: backslashes, hyphens, and a control character at a line's
    start."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln[:1] in (".", "'") else ln for ln in text.split("\n"))


def _inline(text: str) -> str:
    """Escape, then turn reST's ``literal`` into bold and :mod:`x`/:func:`x` into x."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"\1", text)
    parts = re.split(r"``([^`]+)``", text)
    return "".join(esc(p) if i % 2 == 0 else f"\\fB{esc(p)}\\fR" for i, p in enumerate(parts))


def _paragraphs(text: str | None) -> list[str]:
    if not text:
        return []
    text = text.split("\f")[0]  # click's cut mark
    out = []
    for para in re.split(r"\n\s*\n", text.strip()):
        lines = [ln.strip() for ln in para.splitlines() if ln.strip() != "\b"]
        if lines:
            out.append(" ".join(lines))
    return out


def _options(cmd: click.Command, ctx: click.Context) -> list[str]:
    out = []
    for p in cmd.get_params(ctx):
        if not isinstance(p, click.Option) or p.hidden:
            continue
        rec = p.get_help_record(ctx)
        if rec is None:
            continue
        first, help_text = rec
        out += [".TP", f"\\fB{esc(first)}\\fR"]
        out.append(_inline(help_text) if help_text else "")
    return out


def _usage(cmd: click.Command, ctx: click.Context) -> str:
    return " ".join(cmd.collect_usage_pieces(ctx))


def _walk(group: click.Group, ctx: click.Context, path: list[str]):
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        if cmd is None or cmd.hidden:
            continue
        sub = click.Context(cmd, info_name=name, parent=ctx)
        yield path + [name], cmd, sub
        if isinstance(cmd, click.Group):
            yield from _walk(cmd, sub, path + [name])


def commands(cli: click.Group | None = None) -> list[str]:
    """Every command path in the tree, e.g. ``host create`` (what the page documents)."""
    cli = cli or _cli()
    ctx = click.Context(cli, info_name="xenpage")
    return [" ".join(p) for p, _c, _x in _walk(cli, ctx, [])]


def _cli() -> click.Group:
    from .main import cli
    return cli


def render(cli: click.Group | None = None, version: str | None = None) -> str:
    """The whole page, in man(7) roff."""
    from .main import version as xenpage_version
    cli = cli or _cli()
    version = version or xenpage_version()
    ctx = click.Context(cli, info_name="xenpage")
    out = [f'.TH XENPAGE 1 "" "xenpage {esc(version)}" "User Commands"', ".SH NAME", NAME,
           ".SH SYNOPSIS", ".B xenpage",
           "[\\fIglobal options\\fR] \\fIcommand\\fR [\\fIarguments\\fR]", ".br",
           ".B xenpage", "\\fB\\-V\\fR | \\fB\\-\\-version\\fR", ".SH DESCRIPTION"]
    for para in DESCRIPTION.split("\n\n"):
        out += [esc(para.replace("\n", " ")), ".PP"]
    out.pop()
    out += [".SH GLOBAL OPTIONS", "Given before the command."]
    out += _options(cli, ctx)
    out.append(".SH COMMANDS")
    for path, cmd, sub in _walk(cli, ctx, []):
        usage = _usage(cmd, sub)
        out.append(f'.SS "xenpage {esc(" ".join(path))}{(" " + esc(usage)) if usage else ""}"')
        for i, para in enumerate(_paragraphs(cmd.help)):
            if i:
                out.append(".PP")
            out.append(_inline(para))
        out += _options(cmd, sub)
    out.append(".SH FILES")
    for f, what in FILES:
        out += [".TP", f"\\fI{esc(f)}\\fR", esc(what)]
    out.append(".SH ENVIRONMENT")
    for v, what in ENVIRONMENT:
        out += [".TP", f"\\fB{esc(v)}\\fR", esc(what)]
    out += [".SH EXIT STATUS", esc(EXIT_STATUS.replace("\n", " ")),
            ".SH JSON OUTPUT", esc(JSON_OUTPUT.replace("\n", " ")),
            ".SH SERVICE",
            esc("contrib/xenpage-retired.service in the source tree runs the retirement service "
                "under systemd (Type=notify; state in /var/lib/xenpage, policy in "
                "/etc/xenpage)."),
            ".SH SEE ALSO", ", ".join(f"\\fB{esc(s.split('(')[0])}\\fR({s.split('(')[1]}"
                                      for s in SEE_ALSO)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    page = render()
    if argv:
        from pathlib import Path
        p = Path(argv[0])
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(page)
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
