"""Start-up of the ``xenpage`` command: what an operator (or a monitoring script calling
``mem-status`` in a loop) waits for before xenpage does anything.

Each figure is the median wall time of N fresh processes, interleaved so that a busy machine
slows them all alike:

* ``python -c pass`` -- the interpreter alone (the floor);
* ``python -c "import numpy"`` -- numpy alone, on the same interpreter;
* ``xenpage -V`` -- the CLI loaded (click and the command tree: no numpy, rich or simulator);
* ``xenpage --backend xen mem-status 0`` -- the real-Xen path: the CLI, ctypes and the real
  backend, no numpy (the backend answers the status query in an ``array('I')`` and imports
  numpy only for calls over many frames); off Xen it stops where the libraries or privcmd are
  missing, before any hypercall, so it is the start-up alone;
* ``xenpage --backend sim mem-status MFN`` -- the simulator's path, for contrast: it loads
  and checks a saved (small) simulated host.

``bench/run.py`` calls :func:`section_startup`; alone: ``.venv/bin/python bench/startup_bench.py``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNS = 15
#: the real-Xen mem-status start-up, in units of numpy's own import on the same machine (a
#: ratio, so that a loaded machine slows both alike): xenpage's own share (click, ctypes, the
#: CLI and the real backend) at most one numpy import.  Before the CLI imported lazily the
#: command loaded numpy, rich and the whole simulator (0.35-0.57 s, issue 13).
TARGET_X_NUMPY = 2.0


def _xenpage() -> str:
    exe = Path(sys.executable).parent / "xenpage"
    if not exe.exists():
        raise RuntimeError(f"{exe} missing: install the package (make venv)")
    return str(exe)


def _time(cmd: list[str], env: dict, ok: tuple[int, ...]) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, env=env)
    dt = time.perf_counter() - t0
    if p.returncode not in ok:
        raise RuntimeError(f"{cmd}: exit {p.returncode}: {p.stderr.decode()[-500:]}")
    return dt


def measure(runs: int = RUNS) -> dict:
    exe, py = _xenpage(), sys.executable
    with tempfile.TemporaryDirectory(prefix="xenpage-startup-") as d:
        env = {**os.environ, "XENPAGE_STATE_DIR": str(Path(d) / "state"),
               "XENPAGE_LOCK": str(Path(d) / "xenpage.lock"), "XENPAGE_BACKEND": "auto"}
        subprocess.run([exe, "--backend", "sim", "host", "create", "--mem", "256", "--dom0", "64",
                        "--pv", "pv1:16", "--hvm", "hvm1:16"], check=True, capture_output=True,
                       env=env)
        on_xen = Path("/dev/xen/privcmd").exists() or Path("/proc/xen/privcmd").exists()
        cases = {
            "python -c pass": ([py, "-c", "pass"], (0,)),
            "python -c 'import numpy'": ([py, "-c", "import numpy"], (0,)),
            "xenpage -V": ([exe, "-V"], (0,)),
            "xenpage --backend xen mem-status 0": ([exe, "--backend", "xen", "mem-status", "0"],
                                                  (0,) if on_xen else (2,)),
            "xenpage --backend sim mem-status 100": ([exe, "--backend", "sim", "mem-status", "100"],
                                                    (0,)),
        }
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(runs):
            for k, (cmd, ok) in cases.items():
                times[k].append(_time(cmd, env, ok))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"runs": runs, "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
            "on_xen": on_xen,
            "xen_own_s": med["xenpage --backend xen mem-status 0"] - med["python -c 'import numpy'"]}


def section_startup(ctx) -> str:
    r = measure()
    ctx.results["startup"] = r
    med, mn = r["median_s"], r["min_s"]
    numpy_s = med["python -c 'import numpy'"]
    lines = ["## Start-up: `xenpage mem-status` vs `import numpy`", "",
             f"Median (and minimum) wall time of {r['runs']} fresh processes each, interleaved, "
             "on this machine" + (" (a Xen control domain)" if r["on_xen"] else
                                  " (not Xen: the real-Xen path stops at opening privcmd, "
                                  "before any hypercall)") + ".", "",
             "| command | median | min | vs `import numpy` |", "|---|---|---|---|"]
    for k in med:
        lines.append(f"| `{k}` | {med[k] * 1000:.0f} ms | {mn[k] * 1000:.0f} ms | "
                     f"{med[k] / numpy_s:.2f}x |")
    own = r["xen_own_s"]
    x = med["xenpage --backend xen mem-status 0"] / numpy_s
    ok = x <= TARGET_X_NUMPY
    lines += ["", f"Real-Xen `mem-status` start-up: {x:.2f}x `import numpy` (target <= "
              f"{TARGET_X_NUMPY:.1f}x{'' if ok else ': MISSED'}); xenpage's own share (its "
              f"median minus numpy's) {own * 1000:.0f} ms. That path loads click, ctypes and the "
              "real backend; no numpy, no rich, no simulator, no service "
              "(tests/test_packaging.py checks the modules).", ""]
    if not ok:
        ctx.failures.append(f"startup: real-Xen mem-status start-up {x:.2f}x import numpy > "
                            f"{TARGET_X_NUMPY:.1f}x")
    return "\n".join(lines)


def sections():
    return [section_startup]


if __name__ == "__main__":
    class _Ctx:
        results: dict = {}
        failures: list = []
    c = _Ctx()
    print(section_startup(c))
    for f in c.failures:
        print("target missed:", f)
    sys.exit(1 if c.failures else 0)
