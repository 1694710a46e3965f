"""``make bench``: run every benchmark section and write a Markdown report to
``bench/out/report.md`` (also printed).

A section is a function ``section(ctx) -> str`` returning Markdown; a benchmark module lists
its sections in ``sections()``.  To add one, write ``bench/<topic>.py`` with a
``sections()`` function and add the module's name to ``MODULES``.  Sections that need honest
memory figures run their measurements in fresh processes (see ``host_scale.run_task``).
Benchmarks are never timed tests: ``make test`` does not run them.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

#: benchmark modules, in report order
MODULES = ["startup_bench", "host_scale", "operator_bench", "year_bench", "fleet_bench", "guest_scale", "migration_bench",
           "exchange_bench", "mcelog_bench"]


def _environment() -> str:
    import numpy as np
    try:
        mem = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                   if l.startswith("MemTotal:")) * 1024
    except (OSError, StopIteration):
        mem = 0
    try:
        load = ", load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = ""
    return (f"Python {platform.python_version()}, numpy {np.__version__}, "
            f"{os.cpu_count()} CPUs, {mem / (1 << 30):.1f} GiB RAM, {platform.platform()}{load}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=HERE / "out" / "report.md")
    ap.add_argument("--only", nargs="*", help="run only sections whose name contains one of these")
    args = ap.parse_args(argv)

    from host_scale import Context

    work = Path(tempfile.mkdtemp(prefix="xenpage-bench-"))
    ctx = Context(work)
    parts = ["# xenpage benchmark", "",
             f"{datetime.datetime.now().isoformat(timespec='seconds')} -- {_environment()}", ""]
    t0 = time.perf_counter()
    try:
        for modname in MODULES:
            mod = importlib.import_module(modname)
            for sec in mod.sections():
                if args.only and not any(o in sec.__name__ for o in args.only):
                    continue
                t = time.perf_counter()
                try:
                    body = sec(ctx)
                except Exception:  # a broken section is reported, the others still run
                    body = f"## {sec.__name__}\n\nFAILED:\n\n```\n{traceback.format_exc()}```\n"
                    ctx.failures.append(f"{sec.__name__} raised")
                parts.append(body)
                parts.append(f"_({sec.__name__}: {time.perf_counter() - t:.1f} s)_\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    parts.append("## Summary\n")
    if ctx.failures:
        parts += [f"- target missed: {f}" for f in ctx.failures]
    else:
        parts.append("All targets met.")
    parts.append(f"\nTotal {time.perf_counter() - t0:.1f} s.\n")
    report = "\n".join(parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
