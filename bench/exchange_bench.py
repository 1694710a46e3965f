"""Benchmark sections about retiring a PV guest's pages (``mem-offline`` with the in-place
exchange) on the simulated host:

* one page of a Linux PV guest of 1, 4, 16, 64 and 256 GiB: the toolstack's time while the
  guest is suspended (``prescan.exchange``: bitmap, rescan of the dirtied tables, grant
  check, clear, XENMEM_exchange, copy, P2M/M2P, re-point), apart from the modelled suspend
  and resume (the simulated guest checks all its memory when it resumes, which a real guest
  does not); the pre-scan's own running time (log-dirty on, survey, scan, while the guest
  runs and changes its page tables) and the dirty-table count; the same with the pre-scan
  off (every table scanned under the suspend);
* batches of 1, 16 and 256 pages of one (64 GiB) guest, each under one suspend;
* the page-table scan's bytes/s beside a plain numpy pass over the same stacked PTE array
  (``np.isin`` of the entries' frame fields: the floor).

Targets (ratios within one run): one page of a 64 GiB guest <= 1.5x the toolstack time of a
1 GiB guest, 256 GiB <= 2x; 256 pages of the 64 GiB guest <= 3x one page; the scan within 3x
of the numpy floor.

Every guest size runs in a fresh Python process (``python exchange_bench.py TASK JSON``).
``bench/run.py`` calls :func:`sections`; ``python bench/exchange_bench.py`` alone prints the
same Markdown.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

from common import peak_rss as _peak_rss  # noqa: E402
from common import run_task as _run_task  # noqa: E402

GUEST_GIB = (1, 4, 16, 64, 256)
BATCHES = (1, 16, 256)
BATCH_GUEST_GIB = 64
SCAN_MAX_GIB = 64         # the scan-vs-floor section stacks every table: not at 256 GiB
REPS = 7
DOM0_MIB = 1024

TARGETS = {
    "ratio_64g": 1.5,         # toolstack time under suspend, one page, 64 GiB vs 1 GiB, at most
    "ratio_256g": 2.0,        # ... 256 GiB vs 1 GiB
    "batch_ratio": 3.0,       # 256 pages vs one page (64 GiB guest), at most
    "scan_floor_ratio": 3.0,  # scan time vs the numpy floor, at most
}


# -- inside the measuring process ---------------------------------------------------------------



def _boot(guest_gib: float):
    from xenpage.backends.sim import DefaultHostSpec, SimHypervisor, build_host
    mib = int(guest_gib * 1024)
    t0 = time.perf_counter()
    host = build_host(DefaultHostSpec(mem_mib=mib + DOM0_MIB + 1024, dom0_mib=DOM0_MIB,
                                      pv_guests=(("g", mib),), hvm_guests=(), pvh_guests=()))
    boot_s = time.perf_counter() - t0
    hv = SimHypervisor(host)
    hv.set_vcpu_affinity(0, 0, [1])  # off pCPU 0 (Xen 4.17's PoD-lock hang)
    return host, hv, boot_s


class _Timed:
    """Wall and CPU time of the exchange under the suspend (``prescan.exchange``) made by
    ``mem_offline``; between the pre-scan and the suspend the guest works (``window``)."""

    def __init__(self, window=None):
        from xenpage.toolstack import prescan
        self.prescan = prescan
        self.inner = prescan.exchange
        self.inner_start = prescan.start
        self.window = window
        self.last: dict = {}

    def __enter__(self):
        def timed(*a, **kw):
            w0, c0 = time.perf_counter(), time.process_time()
            r = self.inner(*a, **kw)
            self.last = {"wall": time.perf_counter() - w0, "cpu": time.process_time() - c0}
            return r

        def start(*a, **kw):
            pre = self.inner_start(*a, **kw)
            if self.window is not None:
                self.window()
            return pre
        self.prescan.exchange = timed
        self.prescan.start = start
        return self

    def __exit__(self, *exc):
        self.prescan.exchange = self.inner
        self.prescan.start = self.inner_start


def _window(g):
    """What the guest does while the pre-scan runs: 300 workload steps (writes, mappings),
    16 pages of its free pool mapped and unmapped through the writable-page-table emulation,
    and a new user L1 with a page in it (freed again in the next window)."""
    state = {"n": 0}

    def work():
        g.step(300)
        pr = state["n"] % len(g.procs)
        for _ in range(16):
            if g.free:
                vp = g.map_pfn(pr, g.free[-1], "ptwr")
                if vp is not None:
                    g.unmap_vp(pr, vp, "ptwr")
        prev = state.get("grown")
        if prev is not None:
            g.shrink_l1(prev)
        if g.grow_l1(pr) is not None:
            state["grown"] = pr
            if g.free:
                g.map_pfn(pr, g.free[-1], "mmu")
        state["n"] += 1
    return work


def _offline(hv, timed: _Timed, mfns: list[int]) -> dict:
    from xenpage.toolstack.offline import mem_offline
    c0 = time.process_time()
    res = mem_offline(hv, mfns)
    cpu_all = time.process_time() - c0
    kinds = {o.kind.value for o in res.outcomes}
    if kinds != {"exchanged"}:
        raise RuntimeError(f"not all exchanged: {[(o.mfn, o.kind.value, o.detail) for o in res.outcomes][:5]}")
    g = res.timings["guests"][1]
    ex = [o.extra for o in res.outcomes]
    pst = g.get("prescan", {})
    return {"pages": len(mfns), "survey_s": g.get("survey_s", 0.0),
            "suspended_s": g["suspended_s"], "suspend_s": g["suspend_s"],
            "resume_s": g["resume_s"], "toolstack_s": g["toolstack_s"], "toolstack_cpu_s": timed.last["cpu"],
            "group_s": max(e["toolstack_s"] for e in ex), "scan_s": max(e["scan_s"] for e in ex),
            "mem_offline_cpu_s": cpu_all, "prescan": 1.0 if pst.get("path") == "prescan" else 0.0,
            "dirty_tables": float(pst.get("dirty_tables", -1)), "dirty_pfns": float(pst.get("dirty_pfns", -1)),
            "running_scan_s": pst.get("running_scan_s", 0.0), "finish_s": pst.get("finish_s", 0.0),
            "tables": float(pst.get("tables", 0))}


def _median(rows: list[dict]) -> dict:
    """Median of each figure; ``best_toolstack_s`` / ``best_toolstack_cpu_s``: the least of
    the runs (on a shared machine the least is the one least disturbed)."""
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["best_toolstack_s"] = min(r["toolstack_s"] for r in rows)
    out["best_toolstack_cpu_s"] = min(r["toolstack_cpu_s"] for r in rows)
    return out


def _scan_figures(host, hv, domid: int, pages: list[int]) -> dict:
    """The scan on the suspended guest, best of several runs, beside the numpy floor."""
    import numpy as np

    from xenpage.abi import pte as P
    from xenpage.toolstack.exchange import load_guest, scan
    from xenpage.toolstack.offline import resume_guest, suspend_guest
    ok, ours, msg = suspend_guest(hv, domid)
    if not ok:
        raise RuntimeError(msg)
    view, err = load_guest(hv, domid)
    g = host.guests[domid]
    out: dict = {"tables": 0, "bytes": 0}
    tabs, _ = view.table_mfns()
    m = hv.map_foreign(domid, tabs, False)
    ents = m.array.copy()
    m.unmap()
    out["tables"], out["bytes"] = int(tabs.size), int(ents.nbytes)

    def best(fn, n=7):
        b = 1e9
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            b = min(b, time.perf_counter() - t0)
        return b

    def mapping():
        from xenpage.toolstack.exchange import SCAN_CHUNK
        for s0 in range(0, tabs.size, SCAN_CHUNK):
            hv.map_foreign(domid, tabs[s0:s0 + SCAN_CHUNK], False).unmap()
    out["map_s"] = best(mapping)
    pre = _Premapped(hv, tabs, ents)
    for k in (1, 256):
        targets = np.array([g.mfn(p) for p in pages[:k]], dtype=np.int64)
        tu = targets.astype(np.uint64)
        for _ in range(3):  # interleaved, best of all: the machine may be busy
            for key, fn in ((f"scan_{k}_s", lambda: scan(hv, view, targets)),
                            (f"own_{k}_s", lambda: scan(pre, view, targets)),
                            (f"floor_{k}_s", lambda: np.isin((ents >> np.uint64(12)) & np.uint64(P.MFN_MASK_X86), tu))):
                out[key] = min(out.get(key, 1e9), best(fn, 5))
        rc, refs = scan(hv, view, targets)
        rc2, refs2 = scan(pre, view, targets)
        if rc or rc2 or refs != refs2:
            raise RuntimeError("the premapped scan differs")
        out[f"hits_{k}"] = len(refs)
    resume_guest(hv, domid)
    return out


class _Premapped:
    """The hypervisor as the scan sees it when mapping costs nothing (on real Xen a foreign
    mapping is an mmap of the frames; the simulator copies every frame into a new array):
    ``map_foreign`` of a run of the guest's tables hands out a view of rows already read."""

    def __init__(self, hv, tabs, ents):
        self.hv, self.ents = hv, ents
        self.row = {int(m): i for i, m in enumerate(tabs.tolist())}

    def map_foreign(self, domid, mfns, writable):
        i = self.row[int(mfns[0])]
        return _Rows(self.ents[i:i + len(mfns)])


class _Rows:
    def __init__(self, array):
        self.array = array

    def unmap(self):
        pass


def task_guest(args: dict) -> dict:
    """Boot a host with one Linux PV guest of ``gib`` GiB; offline single pages (and, if
    asked, batches); measure the scan."""
    host, hv, boot_s = _boot(args["gib"])
    g = host.guests[1]
    # the guest's full memory check runs once at the end, not at every resume (a real guest
    # does not check its memory when it resumes; at 256 GiB the check alone takes ~10 s)
    g.verify_on_resume = False
    pages = g.kernel_only_pages()
    out: dict = {"gib": args["gib"], "boot_s": boot_s, "guest_pages": int(g.role.size),
                 "table_frames": int(sum(g.role == r for r in (2, 3, 4, 5)).sum()),
                 "rss_after_boot": _peak_rss()}
    nxt = iter(range(1000, len(pages), 7))  # distinct pages, spread out
    from xenpage.toolstack import prescan
    with _Timed(_window(g)) as timed:
        _offline(hv, timed, [g.mfn(pages[next(nxt)])])  # warm-up (imports, caches)
        one, full = [], []
        for _ in range(args.get("reps_one", args["reps"])):  # with and without the pre-scan, interleaved
            one.append(_offline(hv, timed, [g.mfn(pages[next(nxt)])]))
            prescan.ENABLED = False
            try:
                full.append(_offline(hv, timed, [g.mfn(pages[next(nxt)])]))
            finally:
                prescan.ENABLED = True
        out["one"], out["full"] = _median(one), _median(full)
        if args.get("batches"):
            out["batch"] = {}
            for b in BATCHES:
                reps = []
                for _ in range(args["reps"]):
                    reps.append(_offline(hv, timed, [g.mfn(pages[next(nxt)]) for _ in range(b)]))
                out["batch"][b] = _median(reps)
    if args.get("scan", True):
        out["scan"] = _scan_figures(host, hv, 1, [pages[i] for i in range(3, len(pages), 11)])
    from xenpage.hypervisor import invariants
    out["invariants"] = invariants.check(host)[:3] if args.get("invariants", True) else []
    problems = g.verify()
    if problems:
        raise RuntimeError(f"guest memory check failed: {problems[:3]}")
    out["peak_rss"] = _peak_rss()
    return out


TASKS = {"guest": task_guest}


# -- running tasks in fresh processes -------------------------------------------------------------

def run_task(task: str, **args) -> dict:
    """Run one task of this module in a fresh interpreter and return its figures."""
    return _run_task(__file__, task, **args)


# -- Markdown ---------------------------------------------------------------------------------------

def _ms(s) -> str:
    return "n/a" if s is None else f"{s * 1e3:.1f} ms"


def _ok(good: bool) -> str:
    return "yes" if good else "**NO**"


def _load() -> str:
    try:
        return " / ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


class _Ctx:
    def __init__(self):
        self.results: dict = {}
        self.failures: list[str] = []


def _guests(ctx) -> dict:
    res = getattr(ctx, "results", {})
    if "exchange_guests" not in res:
        runs = {}
        for gib in GUEST_GIB:
            try:
                runs[gib] = run_task("guest", gib=gib, reps=REPS, reps_one=REPS,
                                     batches=(gib == BATCH_GUEST_GIB),
                                     scan=(gib <= SCAN_MAX_GIB), invariants=(gib <= SCAN_MAX_GIB))
            except Exception as e:  # a size that cannot be run is reported, the others still are
                runs[gib] = {"error": str(e).strip().splitlines()[-1][:300]}
        res["exchange_guests"] = runs
        if hasattr(ctx, "results"):
            ctx.results = res
    return res["exchange_guests"]


def section_exchange_one_page(ctx) -> str:
    """One page of PV guests of 1 to 256 GiB: the toolstack's time under the suspend."""
    runs = _guests(ctx)
    lines = ["## Retiring one page of a PV guest (mem-offline, in-place exchange)", "",
             f"Each guest size in a fresh process: a host with dom0 ({DOM0_MIB} MiB) and one Linux "
             f"PV guest; `mem_offline` of one kernel page, median and best of {REPS} (after a warm-up). "
             "While the guest runs, the **pre-scan** (`toolstack/prescan.py`) turns log-dirty on, "
             "surveys the guest (its P2M, getpageframeinfo3 of every pfn) and scans every page "
             "table; meanwhile the guest works (300 workload steps, 16 pages mapped and unmapped "
             "through the writable-page-table emulation, a user L1 made and one freed). "
             "*Toolstack* = the time under the suspend that is the toolstack's (read and clean "
             "the dirty bitmap, log-dirty off, type the dirtied pfns, rescan the *dirty tables*, "
             "grant check, clear, XENMEM_exchange, copy, P2M/M2P, re-point); *suspend* and "
             "*resume* are modelled (request -> suspended; fast resume -> running; the simulated "
             "guest's own check of all its memory, which a real guest does not do, is switched "
             "off at resume and run once at the end, with the invariant checker up to "
             f"{SCAN_MAX_GIB} GiB). *Without pre-scan* = the path before it (survey while running, "
             "every table typed and scanned under the suspend), interleaved in the same run. "
             f"Wall clock; load average at the end: {_load()}.", "",
             "| guest | pages | tables | pre-scan (running) | dirty tables / pfns | toolstack: median wall / CPU "
             "| best wall (vs 1 GiB) | without pre-scan | suspend / resume (modelled) | suspended | peak RSS (after boot) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    one = runs.get(1, {}).get("one")
    for gib in GUEST_GIB:
        r = runs.get(gib, {})
        if "error" in r or not r:
            lines.append(f"| {gib} GiB | could not run: {r.get('error', 'not run')} ||||||||||")
            continue
        o, f = r["one"], r["full"]
        rel = f"{o['best_toolstack_s'] / one['best_toolstack_s']:.2f}x" if one else "-"
        lines.append(f"| {gib} GiB | {r['guest_pages']:,} | {int(o['tables']):,} | {_ms(o['survey_s'])} | "
                     f"{int(o['dirty_tables'])} / {int(o['dirty_pfns'])} | **{_ms(o['toolstack_s'])}** / "
                     f"{_ms(o['toolstack_cpu_s'])} | {_ms(o['best_toolstack_s'])} ({rel}) | {_ms(f['toolstack_s'])} | "
                     f"{_ms(o['suspend_s'])} / {_ms(o['resume_s'])} | {_ms(o['suspended_s'])} | "
                     f"{r['peak_rss'] / (1 << 30):.2f} GiB ({r['rss_after_boot'] / (1 << 30):.2f}) |")
        fails = getattr(ctx, "failures", [])
        if not o.get("prescan", 1.0):
            fails.append(f"{gib} GiB: the pre-scan path was not taken")
        if r.get("invariants"):
            fails.append(f"{gib} GiB: invariant checker: {r['invariants'][:1]}")
    if one:
        for gib, key in ((64, "ratio_64g"), (256, "ratio_256g")):
            r = runs.get(gib, {})
            if "one" not in r:
                continue
            ratio = r["one"]["best_toolstack_s"] / one["best_toolstack_s"]
            cratio = r["one"]["best_toolstack_cpu_s"] / one["best_toolstack_cpu_s"]
            mratio = r["one"]["toolstack_s"] / one["toolstack_s"]
            good = ratio <= TARGETS[key]
            lines.append("")
            lines.append(f"Target: one page of a {gib} GiB guest <= {TARGETS[key]:g}x the toolstack time of a "
                         f"1 GiB guest: {ratio:.2f}x wall, best of {REPS} -> {_ok(good)} "
                         f"({cratio:.2f}x in CPU time, best -> {_ok(cratio <= TARGETS[key])}; "
                         f"{mratio:.2f}x of the medians).")
            if not good and hasattr(ctx, "failures"):
                ctx.failures.append(f"one page of {gib} GiB: toolstack {ratio:.2f}x that of 1 GiB "
                                    f"(> {TARGETS[key]:g}x)")
    return "\n".join(lines) + "\n"


def section_exchange_batches(ctx) -> str:
    """Batches of 1, 16 and 256 pages of one guest, each under one suspend."""
    runs = _guests(ctx)
    r = runs.get(BATCH_GUEST_GIB, {})
    lines = [f"## Batches of pages of one {BATCH_GUEST_GIB} GiB guest", "",
             "`mem_offline` of N kernel pages of the guest: one pre-scan, one suspend, one "
             f"XENMEM_exchange for all; median of {REPS}.", "",
             "| pages | toolstack (wall / CPU) | per page | dirty tables | suspended | vs one page |",
             "|---|---|---|---|---|---|"]
    if "batch" not in r:
        return "\n".join(lines + [f"| could not run: {r.get('error', 'not run')} |||||"]) + "\n"
    def batch(b: int) -> dict:  # keys are strings once the figures went through JSON
        return r["batch"][str(b)] if str(b) in r["batch"] else r["batch"][b]
    x1 = batch(1)
    one = x1["toolstack_s"]
    for b in BATCHES:
        x = batch(b)
        lines.append(f"| {b} | {_ms(x['toolstack_s'])} / {_ms(x['toolstack_cpu_s'])} | "
                     f"{x['toolstack_s'] / b * 1e6:.0f} µs | {int(x['dirty_tables'])} | {_ms(x['suspended_s'])} | "
                     f"{x['toolstack_s'] / one:.2f}x |")
    x256 = batch(256)
    ratio = x256["best_toolstack_s"] / x1["best_toolstack_s"]
    cratio = x256["best_toolstack_cpu_s"] / x1["best_toolstack_cpu_s"]
    good = ratio <= TARGETS["batch_ratio"]
    lines += ["", f"Target: 256 pages <= {TARGETS['batch_ratio']:g}x the time of one: {ratio:.2f}x wall, best "
              f"of {REPS} -> {_ok(good)} ({cratio:.2f}x in CPU time, best -> "
              f"{_ok(cratio <= TARGETS['batch_ratio'])}; {x256['toolstack_s'] / one:.2f}x of the medians)."]
    if not good and hasattr(ctx, "failures"):
        ctx.failures.append(f"256 pages take {ratio:.2f}x the time of one (> 3x)")
    return "\n".join(lines) + "\n"


def section_exchange_scan(ctx) -> str:
    """The page-table scan's bytes/s beside a plain numpy pass over the same PTE bytes."""
    runs = _guests(ctx)
    lines = ["## The page-table scan vs the numpy floor", "",
             "`exchange.scan` over every L1-L4 frame of the suspended guest for 1 and 256 "
             "target frames, best of 15 (interleaved with the floor); the floor is "
             "`np.isin((ptes >> 12) & MFN_MASK, targets)` over the same stacked `uint64` array, "
             "already in memory. *scan* includes the simulator's foreign mapping of the tables "
             "(*map*: it copies each frame into a new array, where real Xen mmaps them); *own "
             "pass* is the same `scan` handed the rows already read (bytes/s; ratio to the floor "
             "in parentheses).", "",
             "| guest | tables | bytes | map | scan, 1 target | own pass | floor | ratio (own) | "
             "scan, 256 targets | own pass | floor | ratio (own) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    worst = 0.0
    worst_own = 0.0
    for gib in (x for x in GUEST_GIB if x <= SCAN_MAX_GIB):
        r = runs.get(gib, {})
        if "scan" not in r:
            lines.append(f"| {gib} GiB | could not run |||||||||||")
            continue
        s = r["scan"]
        row = [f"{gib} GiB", f"{s['tables']:,}", f"{s['bytes'] / (1 << 20):.1f} MiB", _ms(s["map_s"])]
        for k in (1, 256):
            ratio = s[f"scan_{k}_s"] / s[f"floor_{k}_s"]
            own = s[f"own_{k}_s"] / s[f"floor_{k}_s"]
            worst, worst_own = max(worst, ratio), max(worst_own, own)
            row += [f"{s['bytes'] / s[f'scan_{k}_s'] / 1e9:.2f} GB/s", f"{s['bytes'] / s[f'own_{k}_s'] / 1e9:.2f} GB/s",
                    f"{s['bytes'] / s[f'floor_{k}_s'] / 1e9:.2f} GB/s", f"{ratio:.2f}x ({own:.2f}x)"]
        lines.append("| " + " | ".join(row) + " |")
    good = worst <= TARGETS["scan_floor_ratio"]
    lines += ["", f"Target: the scan within {TARGETS['scan_floor_ratio']:g}x of the numpy floor: worst "
              f"{worst:.2f}x with the simulator's mapping of the tables -> {_ok(good)}; the scan's own "
              f"pass worst {worst_own:.2f}x -> {_ok(worst_own <= TARGETS['scan_floor_ratio'])}."]
    if not good and hasattr(ctx, "failures"):
        ctx.failures.append(f"scan {worst:.2f}x the numpy floor (> 3x)")
    return "\n".join(lines) + "\n"


def sections():
    """The sections this module contributes to the report, in order."""
    return [section_exchange_one_page, section_exchange_batches, section_exchange_scan]


if __name__ == "__main__":
    if len(sys.argv) > 1:
        task, arg = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
        print(json.dumps(TASKS[task](arg)))
    else:
        c = _Ctx()
        for sec in sections():
            print(sec(c))
        print("\n".join(f"- target missed: {f}" for f in c.failures) or "All targets met.")
