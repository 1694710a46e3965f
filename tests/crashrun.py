"""Run the xenpage CLI with a crash hook installed -- test support, never shipped.

    python tests/crashrun.py --crash-at POINT[:K] -- <xenpage argv>
    python tests/crashrun.py --fill-at POINT[:K]=FILE -- <xenpage argv>
    python tests/crashrun.py --limit-at POINT[:K][=KIB] -- <xenpage argv>

The first kills the process with SIGKILL the K-th time (default the first) ``mem-offline`` reaches the
named point (``xenpage.toolstack.crashpoint.POINTS``: ``clearing``, ``snapshot+``, ... and
``guarded``, ``pinned``).  A backend claiming ``CAP_CHECKPOINT`` (the simulator) is asked to
save its host first -- what the machine would hold at that instant; real Xen keeps its
state by itself.  The product reads no environment variable for this: only this wrapper
installs the hook (:data:`xenpage.toolstack.crashpoint.hook`).  The second fills the file
system holding FILE (zeros until ``ENOSPC``) at that point instead: the run goes on with a full
disk (``tests/diskfault.py``).  The third sets the address-space limit (``ulimit -v``) to what
the process uses at that point (plus KIB): the next allocation needing more fails; the fourth
also takes all the memory still free under that limit: the run goes on out of memory.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_point(spec: str) -> tuple[str, int]:
    """``POINT`` or ``POINT:K`` -> (point, k); the point must be one the product names."""
    from xenpage.toolstack import crashpoint
    point, _, k = spec.partition(":")
    if point not in crashpoint.POINTS + crashpoint.OTHER_POINTS:
        raise ValueError(f"unknown crash point {point!r}")
    if k and not (k.isdigit() and int(k) >= 1):
        raise ValueError(f"{spec!r}: the occurrence after ':' is a number >= 1")
    return point, int(k) if k else 1


def install(spec: str) -> None:
    """Install the SIGKILL hook for ``POINT[:K]``."""
    from xenpage.toolstack import crashpoint
    from xenpage.toolstack.hypervisor import CAP_CHECKPOINT
    point, want = parse_point(spec)
    seen: dict[str, int] = {}

    def hook(name: str, hv) -> None:
        seen[name] = seen.get(name, 0) + 1
        if name == point and seen[name] == want:
            if hv is not None and CAP_CHECKPOINT in hv.capabilities:
                hv.checkpoint()
            os.kill(os.getpid(), signal.SIGKILL)
    crashpoint.hook = hook


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[0] not in ("--crash-at", "--fill-at", "--limit-at", "--oom-at") \
            or argv[2] != "--":
        sys.stderr.write("usage: crashrun.py --crash-at POINT[:K] | --fill-at POINT[:K]=FILE "
                         "| --limit-at POINT[:K][=KIB] | --oom-at POINT[:K] -- <xenpage argv>\n")
        sys.exit(64)
    try:
        if argv[0] == "--crash-at":
            install(argv[1])
        else:
            sys.path.insert(0, str(HERE))
            import diskfault
            {"--fill-at": diskfault.install_fill, "--limit-at": diskfault.install_limit,
             "--oom-at": diskfault.install_oom}[argv[0]](argv[1])
    except ValueError as e:
        sys.stderr.write(f"crashrun: {e}\n")
        sys.exit(64)
    from xenpage.cli.main import main as xenpage_main
    xenpage_main(argv[3:])


if __name__ == "__main__":
    main(sys.argv[1:])
