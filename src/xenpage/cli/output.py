"""Writing reports: xen-hptool's lines on their streams, or one JSON document."""

from __future__ import annotations

import json
import sys

from ..toolstack.report import Report


def emit(report: Report, as_json: bool = False) -> int:
    if as_json:
        sys.stdout.write(json.dumps(report.to_json(), indent=2, default=_default) + "\n")
        sys.stdout.flush()
        return report.exit_code
    for line in report.lines:
        stream = sys.stdout if line.stream == "out" else sys.stderr
        stream.write(line.text + ("\n" if line.newline else ""))
        stream.flush()
    return report.exit_code


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=_default) + "\n")


def _default(o):
    try:
        import numpy as np
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "to_json"):
        return o.to_json()
    raise TypeError(f"not JSON serialisable: {type(o)}")
