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


def run_task(script: str, task: str, **args) -> dict:
    """Run ``script task <args as JSON>`` in a fresh interpreter (so memory figures are the
    task's own) and return the JSON figures it prints last, with ``process_wall_s``."""
    import json
    import os
    import subprocess
    import sys
    import time

    env = dict(os.environ)
    src = str(Path(script).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(Path(script).resolve()), task, json.dumps(args)],
                       capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"bench task {task} {args} failed:\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    res["process_wall_s"] = wall
    return res
