"""Benchmark sections about translated (HVM/PVH) guests: pre-copy live migration between two
simulated hosts on a 1 Gbit/s link (1, 4 and 16 GiB guests at three dirty rates), beside
Clark et al., "Live Migration of Virtual Machines" (NSDI 2005); the in-place retirement with
stock hypercalls against migration (target: a downtime at least 100 times lower); and, per
retired frame of the default host's HVM and PVH guests, both methods side by side.

All times are *simulated* (the migration model's link and costs, ``xenpage.backends.
sim.migrate``, and the hypervisor cost model, ``xenpage.hypervisor.costs``); the wall time
the simulator took is shown beside them.  ``bench/run.py`` calls :func:`sections`; set
``MIGRATION_BENCH_GIB=1,4`` to run fewer sizes.
"""

from __future__ import annotations

import gc
import os
import time

GiB = 1 << 30

#: guest sizes, GiB
SIZES = [int(x) for x in os.environ.get("MIGRATION_BENCH_GIB", "1,4,16").split(",") if x.strip()]

#: the three workloads (``xenpage.guests.hvm.Workload``): writes per second of the guest's vCPUs
WORKLOADS = {
    # a game server (Clark et al.'s Quake 3 server): few writes, a small hot set
    "low (game server)": dict(rate=1_000, shape="hotcold", wss=0.1, hot_pages=1024, hot_frac=0.95),
    # a web server (SPECweb-like, ~12,000 page writes/s): a 64 MiB hot core, a long tail
    "web server": dict(rate=12_000, shape="hotcold", wss=0.5, hot_pages=16384, hot_frac=0.8),
    # memory-bound (Clark et al.'s "MMuncher"): writes all over memory at twice the link's rate
    "high (faster than the link)": dict(rate=61_000, shape="uniform", wss=1.0),
}

#: Clark et al. 2005 (Xen 2, PV guests, 1 Gbit/s): reported service downtimes
CLARK = {"low (game server)": "60 ms (Quake 3 server)",
         "web server": "210 ms (SPECweb)",
         "high (faster than the link)": "-- (not compared)"}

TARGET_RATIO = 100.0
WARMUP_S = 2.0           # the guest runs this long before the migration starts

_RESULTS: dict = {}


def _run(gib: int, wname: str) -> dict:
    from xenpage.backends.sim import SimHypervisor
    from xenpage.guests.hvm import HvmGuest, Workload
    from xenpage.hypervisor import invariants
    from xenpage.hypervisor.host import Host, HostConfig
    from xenpage.toolstack import hptool
    from xenpage.toolstack.hvm_exchange import exchange_hvm_pages
    from xenpage.backends.sim.migrate import GIGABIT

    t0 = time.perf_counter()
    # two hosts, each with room for the guest (in 1 GiB pages: RAM above 4 GiB) and a
    # 256 MiB dom0
    mem = max(gib + 4, 5) * GiB
    a = Host.boot(HostConfig(mem_bytes=mem), dom0_pages=65536)
    b = Host.boot(HostConfig(mem_bytes=mem), dom0_pages=65536)
    d = a.create_domain("guest", gib * 262144, hvm=True, max_pages=gib * 262144 + 256)
    g = HvmGuest.boot(a, d.domid, seed=gib, workload=Workload(**WORKLOADS[wname]))
    hva, hvb = SimHypervisor(a), SimHypervisor(b)
    hva.wait(WARMUP_S)
    order = int(a.ept[d.domid].order[12345])
    # in place: one offline-pending frame exchanged while the guest runs
    m = g.mfn(12345)
    hptool.mem_offline_mark(hva, m)
    x = exchange_hvm_pages(hva, d.domid, [m])
    ok_x = x.outcomes[0].kind.value == "exchanged"
    # migration: a second offline-pending frame retired by moving the whole guest
    m2 = g.mfn(54321)
    hptool.mem_offline_mark(hva, m2)
    t1 = time.perf_counter()
    hva.migration_link = GIGABIT
    hva.live_migrate(d.domid, hvb)
    r = hva.last_migration      # the model's full result (rounds, downtime parts)
    t2 = time.perf_counter()
    st = int(hva.page_offline_op(3, m2, m2)[1][0])
    ng = b.guests.get(r.dst_domid)
    checks = (r.ok and ok_x and st == 2 and ng is not None and ng.verify() == []
              and invariants.check(a) == [] and invariants.check(b) == [])
    out = {"gib": gib, "workload": wname, "rc": r.rc, "rounds": [rr.pages for rr in r.rounds],
           "live_rounds": r.live_rounds, "stop": r.stop_reason, "total_s": r.total_s,
           "downtime_s": r.downtime_s, "last_round_s": r.downtime_parts.get("last_round_s", 0.0),
           "fixed_s": r.downtime_s - r.downtime_parts.get("last_round_s", 0.0),
           "pages_sent": r.pages_sent, "xchg_s": x.downtime_s, "xchg_order": order,
           "checks": checks, "wall_setup_s": t1 - t0, "wall_migrate_s": t2 - t1}
    del a, b, g, ng, hva, hvb
    gc.collect()
    return out


def _results() -> list[dict]:
    for gib in SIZES:
        for w in WORKLOADS:
            if (gib, w) not in _RESULTS:
                _RESULTS[(gib, w)] = _run(gib, w)
    return [_RESULTS[(gib, w)] for gib in SIZES for w in WORKLOADS]


def _ms(s: float) -> str:
    return f"{s * 1e3:,.1f} ms" if s < 10 else f"{s:,.1f} s"


def _pages(rounds: list[int]) -> str:
    live, last = rounds[:-1], rounds[-1]
    return " / ".join(f"{p:,}" for p in live) + f" + **{last:,}**"


def section_live_migration(ctx) -> str:
    rows = _results()
    lines = ["## HVM live migration, 1 Gbit/s link (simulated)", "",
             "Pre-copy as Xen 4.17's `xg_sr_save` does it (rounds while more than 50 pages are dirty "
             "and fewer than 5 have run, then suspend and send the rest), between two simulated hosts "
             "on a 1 Gbit/s, 0.1 ms link.  Each guest ran its workload for "
             f"{WARMUP_S:g} s first.  *Pages per round*: the live rounds, then **stop-and-copy**.  "
             "Downtime = suspend (5 ms) + the last round + HVM context and device-model state "
             "(64 KiB) + latency and xl's ready/go handshake + destination resume (30 ms) "
             "(`MigrationCosts`: stated assumptions).", "",
             "| guest | workload | pages per round | stopped after | total | downtime | of which last round | Clark et al. downtime | checks | wall |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gib']} GiB | {r['workload']} | {_pages(r['rounds'])} | {r['stop']} | "
                     f"{r['total_s']:,.1f} s | **{_ms(r['downtime_s'])}** | {_ms(r['last_round_s'])} | "
                     f"{CLARK[r['workload']]} | {'ok' if r['checks'] else 'FAILED'} | "
                     f"{r['wall_migrate_s']:.1f} s |")
        if not r["checks"]:
            ctx.failures.append(f"migration of a {r['gib']} GiB {r['workload']} guest: checks failed")
    lines += ["", "*checks*: the migration succeeded, the second offline-pending frame is offlined, "
              "the guest verifies all of its memory on the destination, and the invariant checker "
              "is clean on both hosts.", "",
              "**Beside Clark et al.** Their 60 ms (a Quake 3 server) and 210 ms (SPECweb) were "
              "measured in 2005 on Xen with paravirtualised guests and their own rate-adaptive "
              "pre-copy; Xen 4.17's `simple_precopy_policy` stops after at most 5 rounds.  The "
              "low-dirty-rate guest comes out below their 60 ms whatever its size: its last round "
              "is a handful of pages, so its downtime is the fixed costs assumed above (~36 ms).  "
              "The web-server guest stays below their 210 ms because its dirty rate is well under "
              "the link's ~30,500 pages/s, so each round is a fraction of the one before and the "
              "fifth leaves hundreds to a few thousand pages (more for a bigger guest: its first "
              "round is longer, its tail dirtier); a hotter working set or a slower link moves it "
              "up.  A guest dirtying faster than the link never converges: every round resends "
              "most of its memory and the stop-and-copy after the fifth moves nearly all of it, so "
              "its downtime grows with its size -- the case pre-copy cannot help, and the one "
              "in-place exchange avoids.  Total time is dominated by round 1: 8.6 s per GiB at "
              "1 Gbit/s.", ""]
    return "\n".join(lines)


def section_exchange_vs_migration(ctx) -> str:
    rows = _results()
    lines = ["## In-place HVM retirement vs migration (simulated downtime)", "",
             "One offline-pending frame of the running guest retired in place with stock Xen 4.17 "
             "hypercalls (pause; copy the gfn out; `XENMEM_decrease_reservation`: split the "
             "superpage, drop the frame, which is offlined; `XENMEM_populate_physmap`; copy back; "
             "unpause -- `CostModel` of `xenpage.hypervisor.costs`), "
             "against the downtime of migrating the same guest. Target: at least "
             f"{TARGET_RATIO:g} times lower.", "",
             "| guest | workload | leaf split | in-place downtime | migration downtime | ratio | target met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r["downtime_s"] / r["xchg_s"] if r["xchg_s"] else float("inf")
        good = ratio >= TARGET_RATIO
        leaf = {18: "1 GiB", 9: "2 MiB", 0: "4 KiB"}.get(r["xchg_order"], "?")
        lines.append(f"| {r['gib']} GiB | {r['workload']} | {leaf} | {r['xchg_s'] * 1e6:.1f} us | "
                     f"{_ms(r['downtime_s'])} | {ratio:,.0f}x | {'yes' if good else 'NO'} |")
        if not good:
            ctx.failures.append(f"in-place exchange only {ratio:.0f}x below migration "
                                f"({r['gib']} GiB, {r['workload']})")
    lines += ["", "The in-place downtime does not depend on the guest's size or dirty rate (~50 us: "
              "the pause, three foreign-mapping batches -- copy out, copy back, read back -- the "
              "two memory hypercalls with a table split and a flush, the unpause); a migration's "
              "floor is its fixed costs (~36 ms here), so the ratio is at least ~700x and grows "
              "with the dirty rate.", ""]
    return "\n".join(lines)


#: the per-frame comparison: the default host's guests running a memtest-like workload
PER_FRAME_WORKLOAD = dict(rate=4_000, shape="uniform", wss=1.0)


def _per_frame() -> list[dict]:
    """On the default (lab-shaped) host: per guest type, one frame retired in place, then
    another by live migration to the same host -- in one run."""
    if "per_frame" in _RESULTS:
        return _RESULTS["per_frame"]
    from xenpage.backends.sim import DefaultHostSpec, SimHypervisor, build_host
    from xenpage.hypervisor import invariants
    from xenpage.toolstack import hptool
    from xenpage.toolstack.guest_type import domain_type
    from xenpage.toolstack.hvm_exchange import exchange_hvm_pages

    h = build_host(DefaultHostSpec(hvm_workload=PER_FRAME_WORKLOAD))
    hv = SimHypervisor(h)
    hv.wait(WARMUP_S)
    rows = []
    for d in [x for x in hv.domain_list() if x.hvm]:
        kind = domain_type(hv, d)
        g = h.guests[d.domid]
        m = g.mfn(4321)
        hptool.mem_offline_mark(hv, m)
        t0 = hv.now()
        w0 = time.perf_counter()
        x = exchange_hvm_pages(hv, d.domid, [m])
        x_total, x_wall = hv.now() - t0, time.perf_counter() - w0
        m2 = g.mfn(1234)
        hptool.mem_offline_mark(hv, m2)
        w0 = time.perf_counter()
        r = hv.live_migrate(d.domid)
        r_wall = time.perf_counter() - w0
        st = int(hv.page_offline_op(3, m2, m2)[1][0])
        ng = h.guests.get(r.new_domid)
        ok = (x.outcomes[0].kind.value == "exchanged" and r.ok and st == 2 and ng is not None
              and ng.verify() == [] and invariants.check(h) == [])
        rows.append({"type": kind, "mib": d.tot_pages // 256, "x_down": x.downtime_s, "x_total": x_total,
                     "x_pages": 2, "m_down": r.downtime_s, "m_total": r.total_s, "m_pages": r.pages_sent,
                     "m_rounds": r.rounds, "ok": ok, "x_wall": x_wall, "m_wall": r_wall})
    _RESULTS["per_frame"] = rows
    return rows


def section_per_frame(ctx) -> str:
    rows = _per_frame()
    lines = ["## Per retired HVM / PVH frame: in place vs live migration (simulator)", "",
             "The default host (2 GiB, lab-shaped: `hvm1` 128 MiB, `pvh1` 64 MiB) with both guests "
             f"writing {PER_FRAME_WORKLOAD['rate']:,} pages/s all over their memory (memtest-like) "
             f"for {WARMUP_S:g} s; then per guest one offline-pending frame retired in place "
             "(`--hvm=exchange`), and another by live migration to the same host (`--hvm=migrate`, "
             "loopback link), in one run.  *Pages*: copied (in place: out and back) or sent "
             "(migration).  Simulated times; wall = what the simulator took.  The lab's figures "
             "for the same guests on real Xen go beside these (README).", "",
             "| guest | method | downtime | total | pages | checks | wall |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ck = "ok" if r["ok"] else "FAILED"
        lines.append(f"| {r['type'].upper()} {r['mib']} MiB | in place | **{r['x_down'] * 1e6:.0f} us** | "
                     f"{r['x_total'] * 1e6:.0f} us | {r['x_pages']} | {ck} | {r['x_wall'] * 1e3:.1f} ms |")
        lines.append(f"| {r['type'].upper()} {r['mib']} MiB | live migration ({r['m_rounds']} rounds) | "
                     f"**{_ms(r['m_down'])}** | {_ms(r['m_total'])} | {r['m_pages']:,} | {ck} | "
                     f"{r['m_wall'] * 1e3:.0f} ms |")
        if not r["ok"]:
            ctx.failures.append(f"per-frame comparison of the {r['type']} guest: checks failed")
        elif r["m_down"] < TARGET_RATIO * r["x_down"]:
            ctx.failures.append(f"{r['type']}: in place only {r['m_down'] / r['x_down']:.0f}x below migration")
    lines += ["", "*checks*: the in-place frame and the migrated guest's frame are offlined, the "
              "guest verifies all its memory after the migration, invariants clean.", ""]
    return "\n".join(lines)


def sections():
    return [section_live_migration, section_exchange_vs_migration, section_per_frame]


if __name__ == "__main__":  # pragma: no cover
    class _Ctx:
        failures: list = []
    c = _Ctx()
    print(section_live_migration(c))
    print(section_exchange_vs_migration(c))
    print(section_per_frame(c))
    print(c.failures)
