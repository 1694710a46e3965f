"""Everything xenpage prints for scripts, in one place: xen-hptool's lines on their streams,
or -- with ``--json`` -- one JSON *envelope* per command on stdout::

    {"command": "mem-status", "exit": 0, ...typed fields of that command...}

``command`` is the command's path (``mem-offline``, ``host show``, ``badpages clear``),
``exit`` the process's exit code; the other fields are the command's own, described by the
JSON Schema ``schema/envelope.json`` next to this module (the tests validate every command's
output against it).  A refusal under ``--json`` is an envelope too: ``{"command", "exit",
"error"}`` on stdout (and the usual ``xenpage: ...`` line on stderr, for people).

* :func:`emit` -- a command's envelope (returns ``exit``, for ``sys.exit(emit(...))``);
* :func:`emit_report` -- a :class:`~xenpage.toolstack.report.Report`: its lines, or its
  envelope (with ``stdout``/``stderr``: the lines xen-hptool would have printed);
* :func:`fail` -- a refusal: ``xenpage: <why>`` on stderr, its envelope under ``--json``,
  then exit (1: refused, nothing done; 2: a file or host that cannot be used).

:meth:`xenpage.cli.main.HptoolGroup.main` sets the mode (:func:`begin`) and, when a command
under ``--json`` ends with a non-zero exit without having written its envelope (a click
usage error, a message written elsewhere), writes one from what went to stderr
(:func:`finish`), so stdout under ``--json`` is always one JSON document.
``retired --json`` is a stream of JSON lines (one event per line); its envelope is its last
line, compact (:func:`begin` ``lines=True``).
"""

from __future__ import annotations

import io
import json
import sys
from typing import NoReturn

from ..toolstack.report import Report

#: the schema every ``--json`` document follows (package data; tests validate against it)
SCHEMA_NAME = "envelope.json"


class _Mode:
    def __init__(self) -> None:
        self.reset("xenpage", False)

    def reset(self, command: str, as_json: bool, lines: bool = False) -> None:
        self.command = command
        self.json = as_json
        self.lines = lines
        self.emitted = False


_mode = _Mode()


def begin(command: str, as_json: bool, lines: bool = False) -> None:
    """A command starts: its name (for envelopes written on its behalf) and whether
    ``--json`` was given (``lines``: JSON lines, compact)."""
    _mode.reset(command, as_json, lines)


def json_mode() -> bool:
    return _mode.json


def set_command(command: str, lines: bool | None = None) -> None:
    """The command's full name, once known (a subcommand of a group)."""
    _mode.command = command
    if lines is not None:
        _mode.lines = lines


def emit(command: str, exit: int = 0, **fields) -> int:
    """Write ``{"command", "exit", **fields}`` on stdout; returns ``exit``."""
    doc = {"command": command, "exit": int(exit), **fields}
    if _mode.lines:
        text = json.dumps(doc, default=_default)
    else:
        text = json.dumps(doc, indent=2, default=_default)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    _mode.emitted = True
    return int(exit)


def emit_report(command: str, report: Report, as_json: bool = False, **extra) -> int:
    """A report: xen-hptool's lines on their streams (exactly), or its envelope: the
    report's data, ``stdout``/``stderr`` (the lines) and ``extra``."""
    if as_json:
        data = {k: v for k, v in report.data.items() if k not in ("command", "exit")}
        data.update(extra)
        data["stdout"] = [l.text for l in report.lines if l.stream == "out"]
        data["stderr"] = [l.text for l in report.lines if l.stream == "err"]
        return emit(command, report.exit_code, **data)
    for line in report.lines:
        stream = sys.stdout if line.stream == "out" else sys.stderr
        stream.write(line.text + ("\n" if line.newline else ""))
        stream.flush()
    return report.exit_code


def fail(message: str, exit: int = 1, command: str | None = None, **fields) -> NoReturn:
    """Refuse: ``xenpage: <message>`` on stderr; under ``--json`` also the envelope
    ``{"command", "exit", "error": message, **fields}`` on stdout.  Never returns."""
    sys.stderr.write(f"xenpage: {message}\n")
    sys.stderr.flush()
    if _mode.json and not _mode.emitted:
        emit(command or _mode.command, exit, error=message, **fields)
    sys.exit(exit)


def finish(code: int, stderr_text: str) -> None:
    """End of a command under ``--json``: a non-zero exit with no envelope written gets one,
    its ``error`` the last thing said on stderr."""
    if not _mode.json or _mode.emitted or code == 0:
        return
    lines = [l for l in stderr_text.splitlines() if l.strip()]
    said = [l for l in lines if l.startswith(("xenpage:", "Error:", "Unrecognised", "Usage:"))]
    msg = (said[-1] if said else (lines[-1] if lines else f"exit {code}"))
    if msg.startswith("xenpage: "):
        msg = msg[len("xenpage: "):]
    elif msg.startswith("Error: "):
        msg = msg[len("Error: "):]
    emit(_mode.command, code, error=msg)


class StderrTee(io.TextIOBase):
    """stderr, with what went through it kept (the error of a ``--json`` envelope)."""

    def __init__(self, stream):
        self.stream = stream
        self.seen: list[str] = []

    def write(self, s: str) -> int:
        n = self.stream.write(s)  # a text stream refuses bytes (click probes with b"")
        self.seen.append(s if isinstance(s, str) else bytes(s).decode(errors="replace"))
        return n

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    @property
    def encoding(self):  # noqa: D401
        return getattr(self.stream, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.stream.fileno()


def _default(o):
    try:
        import numpy as np
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "to_json"):
        return o.to_json()
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    from pathlib import PurePath
    if isinstance(o, PurePath):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")
