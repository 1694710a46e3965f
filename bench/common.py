"""Helpers shared by the benchmark sections."""

from __future__ import annotations

import resource
from pathlib import Path


def peak_rss() -> int:
    """Peak resident set size of this process, bytes (VmHWM; ru_maxrss as a fallback)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
