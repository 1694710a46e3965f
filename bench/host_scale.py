"""Benchmark sections about the simulated host at scale: a bare 256 GiB host (create, save,
load, peak RSS) and the page-offline sysctl's throughput over ranges of 1M frames (query,
offline of free frames, online of the same).

Every measurement runs in a fresh Python process (``python host_scale.py TASK JSON``), so its
peak RSS (``VmHWM``) is its own; the section functions start those processes and turn their
figures into Markdown.  ``bench/run.py`` calls the sections.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from common import peak_rss as _peak_rss  # noqa: E402
from common import run_task as _run_task  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20

#: the bare host of the targets: 256 GiB of RAM, a small dom0 (1 GiB) to keep it bare
HOST_GIB = 256
DOM0_MIB = 1024
RANGE = 1 << 20          # frames per sysctl call
NRANGES = 4              # ranges per measurement
CLI_RANGE = 1 << 16      # frames of the whole-command range offline

TARGETS = {
    "rss_bare_gib": 2.0,          # peak RSS of create / load of the bare host, at most
    "query_pages_s": 5_000_000,   # query over a range, at least
    "offline_pages_s": 200_000,   # offline of free frames over a range, at least
    "save_load_s": 60.0,          # "seconds, not minutes"
}


# -- inside the measuring process ------------------------------------------------------------------



def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in Path(p).iterdir())


def _boot(mem_gib: int, dom0_mib: int):
    from xenpage.hypervisor.host import Host, HostConfig
    return Host.boot(HostConfig(mem_bytes=mem_gib * GiB), dom0_pages=dom0_mib * 256)


def _ranges(host, n: int, length: int) -> list[int]:
    """Starts of ``n`` ranges of ``length`` free frames above 4 GiB, deliberately not aligned
    to a buddy boundary."""
    from xenpage.abi import mm
    starts = []
    s = 0x100000 + 0x12345
    while len(starts) < n and s + length <= host.nframes:
        if (host.ft.states(s, length) == mm.STATE_FREE).all():
            starts.append(s)
        s += length + 0x1000
    if len(starts) < n:
        raise RuntimeError("not enough free ranges")
    return starts


def task_create(args: dict) -> dict:
    t0 = time.perf_counter()
    host = _boot(args["mem_gib"], args["dom0_mib"])
    t1 = time.perf_counter()
    rss_boot = _peak_rss()
    host.save(args["path"])
    t2 = time.perf_counter()
    return {"frames": host.nframes, "free_pages": host.heap.free_pages,
            "boot_s": t1 - t0, "save_s": t2 - t1, "peak_rss_boot": rss_boot,
            "peak_rss": _peak_rss(), "saved_bytes": _dir_bytes(args["path"])}


def task_load(args: dict) -> dict:
    from xenpage.hypervisor.host import Host
    t0 = time.perf_counter()
    host = Host.load(args["path"])
    t1 = time.perf_counter()
    return {"frames": host.nframes, "load_s": t1 - t0, "peak_rss": _peak_rss()}


def task_sysctl(args: dict) -> dict:
    """Load the saved bare host, then: query N ranges of 1M free frames, offline them, query
    them (offlined), save the host with N million frames offlined (to ``save_to``), online
    them; then single-frame latencies."""
    from xenpage.hypervisor import sysctl
    from xenpage.hypervisor.host import Host
    host = Host.load(args["path"])
    rss_loaded = _peak_rss()
    length = args["range"]
    starts = _ranges(host, args["nranges"], length)
    out: dict = {"range": length, "nranges": len(starts), "rss_loaded": rss_loaded}

    def timed(cmd: int, expect: int) -> float:
        t = 0.0
        for s in starts:
            t0 = time.perf_counter()
            rc, st = sysctl.page_offline_op(host, 0, cmd, s, s + length - 1, pcpu=1)
            t += time.perf_counter() - t0
            if rc != 0 or not (st == expect).all():
                raise RuntimeError(f"cmd {cmd} at {s:#x}: rc {rc}, status {set(st.tolist())}")
        return t

    n = length * len(starts)
    out["query_free_pages_s"] = n / timed(3, 0)
    out["offline_pages_s"] = n / timed(1, 0x2)
    out["query_offlined_pages_s"] = n / timed(3, 0x2)
    out["offlined_frames"] = len(host.heap.offlined_list)
    out["rss_after_offline"] = _peak_rss()
    t0 = time.perf_counter()
    host.save(args["save_to"])
    out["save_offlined_s"] = time.perf_counter() - t0
    out["saved_offlined_bytes"] = _dir_bytes(args["save_to"])
    out["online_pages_s"] = n / timed(2, 0x2)
    out["free_pages_restored"] = host.heap.free_pages
    # single frames, as one xenpage command issues them
    s = starts[0] + 7
    lat = {}
    for name, cmd in (("offline", 1), ("query", 3), ("online", 2)):
        t0 = time.perf_counter()
        for i in range(100):
            sysctl.page_offline_op(host, 0, cmd, s + 2 * i, s + 2 * i, pcpu=1)
        lat[name] = (time.perf_counter() - t0) / 100
    out["single_frame_s"] = lat
    out["peak_rss"] = _peak_rss()
    return out


TASKS = {"create": task_create, "load": task_load, "sysctl": task_sysctl}


# -- running tasks in fresh processes --------------------------------------------------------------

def run_task(task: str, **args) -> dict:
    """Run one task of this module in a fresh interpreter and return its figures."""
    return _run_task(__file__, task, **args)


# -- Markdown ------------------------------------------------------------------------------------------

def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def _ok(good: bool) -> str:
    return "yes" if good else "**NO**"


def _rate(x: float) -> str:
    return f"{x / 1e6:.2f} M pages/s"


class Context:
    """Shared by the sections of one run: a scratch directory and results of earlier steps."""

    def __init__(self, workdir: Path):
        self.workdir = Path(workdir)
        self.results: dict = {}
        self.failures: list[str] = []

    def host_path(self) -> Path:
        return self.workdir / f"bare-{HOST_GIB}g"


def section_bare_host(ctx: Context) -> str:
    """Create, save and load a bare 256 GiB host."""
    path = ctx.host_path()
    c = run_task("create", mem_gib=HOST_GIB, dom0_mib=DOM0_MIB, path=str(path))
    ld = run_task("load", path=str(path))
    ctx.results["create"], ctx.results["load"] = c, ld
    rss_ok = max(c["peak_rss"], ld["peak_rss"]) <= TARGETS["rss_bare_gib"] * GiB
    sl_ok = c["save_s"] <= TARGETS["save_load_s"] and ld["load_s"] <= TARGETS["save_load_s"]
    if not rss_ok:
        ctx.failures.append("peak RSS of the bare host above 2 GiB")
    if not sl_ok:
        ctx.failures.append("save/load of the bare host not within seconds")
    rows = [
        ("frames (max_mfn)", f"{c['frames']:,} ({c['frames']:#x})", ""),
        ("free pages after boot", f"{c['free_pages']:,}", ""),
        ("boot (`Host.boot`)", f"{c['boot_s']:.2f} s", ""),
        ("peak RSS after boot", _gib(c["peak_rss_boot"]), f"<= {TARGETS['rss_bare_gib']:g} GiB: {_ok(c['peak_rss_boot'] <= TARGETS['rss_bare_gib'] * GiB)}"),
        ("save", f"{c['save_s']:.2f} s", f"seconds: {_ok(c['save_s'] <= TARGETS['save_load_s'])}"),
        ("peak RSS, create + save process", _gib(c["peak_rss"]), f"<= {TARGETS['rss_bare_gib']:g} GiB: {_ok(c['peak_rss'] <= TARGETS['rss_bare_gib'] * GiB)}"),
        ("saved size", f"{c['saved_bytes'] / MiB:.1f} MiB", ""),
        ("load (fresh process)", f"{ld['load_s']:.2f} s", f"seconds: {_ok(ld['load_s'] <= TARGETS['save_load_s'])}"),
        ("peak RSS, load process", _gib(ld["peak_rss"]), f"<= {TARGETS['rss_bare_gib']:g} GiB: {_ok(ld['peak_rss'] <= TARGETS['rss_bare_gib'] * GiB)}"),
    ]
    lines = [f"## A bare {HOST_GIB} GiB host", "",
             f"`Host.boot(HostConfig(mem_bytes={HOST_GIB} << 30), dom0_pages={DOM0_MIB * 256})` "
             f"(dom0 {DOM0_MIB} MiB), saved and loaded again; each step in a fresh process.", "",
             "| measure | value | target met |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {t} |" for a, b, t in rows]
    return "\n".join(lines) + "\n"


def section_sysctl_throughput(ctx: Context) -> str:
    """Query / offline / online throughput over ranges of 1M frames."""
    path = ctx.host_path()
    if not (path / "host.json").exists():
        run_task("create", mem_gib=HOST_GIB, dom0_mib=DOM0_MIB, path=str(path))
    offl = ctx.workdir / "offlined"
    r = run_task("sysctl", path=str(path), range=RANGE, nranges=NRANGES, save_to=str(offl))
    r["load_offlined"] = run_task("load", path=str(offl))
    r["load_offlined_s"] = r["load_offlined"]["load_s"]
    ctx.results["sysctl"] = r
    q_ok = min(r["query_free_pages_s"], r["query_offlined_pages_s"]) >= TARGETS["query_pages_s"]
    o_ok = r["offline_pages_s"] >= TARGETS["offline_pages_s"]
    if not q_ok:
        ctx.failures.append("query throughput below 5M pages/s")
    if not o_ok:
        ctx.failures.append("offline throughput below 200k pages/s")
    lat = r["single_frame_s"]
    rows = [
        ("query, free frames", _rate(r["query_free_pages_s"]), f">= 5 M/s: {_ok(r['query_free_pages_s'] >= TARGETS['query_pages_s'])}"),
        ("offline, free frames", _rate(r["offline_pages_s"]), f">= 0.2 M/s: {_ok(o_ok)}"),
        ("query, offlined frames", _rate(r["query_offlined_pages_s"]), f">= 5 M/s: {_ok(r['query_offlined_pages_s'] >= TARGETS['query_pages_s'])}"),
        ("online, the same frames", _rate(r["online_pages_s"]), ""),
        (f"save with {r['offlined_frames']:,} frames offlined", f"{r['save_offlined_s']:.2f} s "
         f"({r['saved_offlined_bytes'] / MiB:.1f} MiB)", f"seconds: {_ok(r['save_offlined_s'] <= TARGETS['save_load_s'])}"),
        ("load of that host (fresh process)", f"{r['load_offlined_s']:.2f} s, peak RSS "
         f"{_gib(r['load_offlined']['peak_rss'])}", f"seconds: {_ok(r['load_offlined_s'] <= TARGETS['save_load_s'])}"),
        ("one frame: offline / query / online", f"{lat['offline'] * 1e3:.2f} / {lat['query'] * 1e3:.2f} / "
         f"{lat['online'] * 1e3:.2f} ms", ""),
        ("peak RSS: loaded / after the offlines / at the end", f"{_gib(r['rss_loaded'])} / "
         f"{_gib(r['rss_after_offline'])} / {_gib(r['peak_rss'])}", ""),
    ]
    lines = [f"## Page-offline sysctl over ranges of {RANGE:,} frames", "",
             f"On the saved bare {HOST_GIB} GiB host (loaded in a fresh process): "
             f"{r['nranges']} ranges of {RANGE:,} free frames above 4 GiB, not buddy-aligned, "
             "each one `XEN_SYSCTL_page_offline_op` call (query, offline, query, online); every "
             "status word is checked.", "",
             "| measure | value | target met |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {t} |" for a, b, t in rows]
    return "\n".join(lines) + "\n"


def section_cli_latency(ctx: Context) -> str:
    """Wall time of whole ``xenpage`` commands (start, load, act, save) on the saved bare host."""
    import shutil
    src = ctx.host_path()
    if not (src / "host.json").exists():
        run_task("create", mem_gib=HOST_GIB, dom0_mib=DOM0_MIB, path=str(src))
    sd = ctx.workdir / "cli-state"
    shutil.copytree(src, sd / "host")
    exe = Path(sys.executable).with_name("xenpage")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "xenpage.cli.main"]
    env = dict(os.environ, XENPAGE_STATE_DIR=str(sd), XENPAGE_BACKEND="sim")
    mfn = 0x2000123
    rows = []
    for argv in (["mem-status", f"{mfn:x}"], ["mem-offline", f"{mfn:x}"], ["mem-status", f"{mfn:x}"],
                 ["mem-online", f"{mfn:x}"], ["mem-offline", f"{mfn:x}-{mfn + CLI_RANGE - 1:x}"],
                 ["mem-status", "zz"]):
        t0 = time.perf_counter()
        p = subprocess.run(cmd + argv, capture_output=True, text=True, env=env)
        dt = time.perf_counter() - t0
        last = (p.stdout.strip().splitlines() or p.stderr.strip().splitlines() or [""])[-1]
        if "-" in argv[1]:
            m = re.search(r"frames: (\d+) offlined", p.stdout)
            k = int(m.group(1)) if m else 0
            last = f"{k} frames offlined ({k / dt:,.0f} frames/s end to end)"
        rows.append((" ".join(["xenpage"] + argv), f"{dt:.2f} s", p.returncode, last[:80]))
    ctx.results["cli"] = rows
    lines = [f"## Whole `xenpage` commands on the saved {HOST_GIB} GiB host", "",
             "Each is a fresh process: start Python, load the saved host, act, save it back "
             "(a malformed MFN is refused before anything is loaded).", "",
             "| command | wall time | exit | last line |", "|---|---|---|---|"]
    lines += [f"| `{a}` | {b} | {c} | {d} |" for a, b, c, d in rows]
    return "\n".join(lines) + "\n"


def sections():
    """The sections this module contributes to the report, in order."""
    return [section_bare_host, section_sysctl_throughput, section_cli_latency]


if __name__ == "__main__":
    task, arg = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    print(json.dumps(TASKS[task](arg)))
