"""``xenpage mem-status`` in the lab's dom0 imports nothing it does not use (issue 13): the
query runs to its end through the real backend (ctypes, the offline sysctl) and loads no
numpy, no rich, no simulator and no service; its start-up is timed next to
``python3 -c "import numpy"`` on the same dom0."""

from __future__ import annotations

import json
import statistics
import sys
import time

from helpers import run

#: a frame of the lab machine's RAM outside Xen's fixed range (a query changes nothing; a frame
#: inside that range makes mem-status look up its PV owner in the M2P, which is numpy's work)
FRAME = 0x20000

_PROBE = """
import json, sys
from xenpage.cli.main import main
code = 0
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"exit": code, "modules": sorted(sys.modules)}), file=sys.__stderr__)
"""

HEAVY = ("numpy", "rich", "matplotlib", "dask", "xenpage.hypervisor", "xenpage.guests",
         "xenpage.backends.sim", "xenpage.ras")


def test_mem_status_loads_no_numpy_on_real_xen(rec):
    r = run([sys.executable, "-c", _PROBE, "--backend", "xen", "mem-status", f"{FRAME:x}"],
            timeout=300)
    d = json.loads(r.stderr.strip().splitlines()[-1])
    mods = set(d["modules"])
    heavy = sorted(m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY))
    rec.add("dom0-package", case="mem-status modules", exit=d["exit"], heavy=heavy,
            stdout=r.stdout)
    assert d["exit"] == 0, r.stdout + r.stderr
    assert f"Querying MEMORY mfn {FRAME:x} status" in r.stdout
    assert "xenpage.backends.xen" in mods
    assert heavy == []


def test_mem_status_start_up_next_to_numpy(rec):
    """Figures only (TCG: indicative); the assertion is that both ran."""
    times: dict[str, list[float]] = {"import numpy": [], "xenpage mem-status": []}
    for _ in range(3):
        for k, argv in (("import numpy", [sys.executable, "-c", "import numpy"]),
                        ("xenpage mem-status", [sys.executable, "-m", "xenpage.cli.main",
                                                "--backend", "xen", "mem-status",
                                                f"{FRAME:x}"])):
            t = time.perf_counter()
            r = run(argv, timeout=300)
            times[k].append(time.perf_counter() - t)
            assert r.rc == 0, r.stderr
    med = {k: statistics.median(v) for k, v in times.items()}
    rec.add("dom0-package", case="start-up", median_s=med,
            ratio=med["xenpage mem-status"] / med["import numpy"])
