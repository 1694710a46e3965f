"""Benchmark section: booting a Linux-like PV guest at scale on the simulated host.

A 4 GiB guest (1M pages), a 64 GiB guest (16M pages) and a 256 GiB guest (64M pages, one
L1 per 2 MiB of its direct map as Linux: 131,342 L1 tables), each in a fresh Python process
(``python guest_scale.py boot JSON``) so that its peak RSS (``VmHWM``) is its own.  The
process does what ``build_host(DefaultHostSpec(mem_mib=G + 2048, dom0_mib=1024,
pv_guests=(("big", G),), hvm_guests=()))`` does for a PV guest, phase by phase: boot the
host (``Host.boot``, dom0 1 GiB), create the domain (``create_domain``: its frames, P2M,
M2P, shared_info), boot the guest kernel (``LinuxPV.boot``: page tables, P2M frames,
pins, CR3, grants, dom0's rings).  Targets: 4 GiB in <= 10 s, 64 GiB in <= 120 s, 256 GiB
in <= 480 s; peak RSS <= 4 GiB (256 GiB: <= 8 GiB).  After the boot (not counted) it runs a
short workload, the guest's own memory check and the invariant checker (not at 256 GiB: it
holds every table's counts at once, > 13 GiB there), which must find nothing.

``bench/run.py`` calls :func:`sections`.
"""

from __future__ import annotations

import json
import os
import sys
import time

from common import peak_rss as _peak_rss  # noqa: E402
from common import run_task as _run_task  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20

#: (guest MiB, boot-time target in seconds)
SIZES = ((4096, 10.0), (65536, 120.0), (262144, 480.0))
DOM0_MIB = 1024
RSS_TARGET_GIB = 4.0
#: guests larger than 64 GiB: their own RSS target, no invariant checker after the boot
RSS_TARGET_BIG_GIB = 8.0
BIG_MIB = 65536




class _Clock:
    def __init__(self):
        self.t, self.c = time.perf_counter(), time.process_time()

    def lap(self) -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        out = (t - self.t, c - self.c)
        self.t, self.c = t, c
        return out


def task_boot(args: dict) -> dict:
    """In a fresh process: boot the host and the guest, then check it."""
    import numpy as np

    from xenpage.guests import linux_pv as L
    from xenpage.hypervisor import invariants
    from xenpage.hypervisor.host import Host, HostConfig

    gmib, dom0 = args["guest_mib"], args["dom0_mib"]
    load0 = os.getloadavg()[0]
    out: dict = {"guest_mib": gmib, "mem_mib": gmib + 2 * dom0}
    clk = _Clock()
    host = Host.boot(HostConfig(mem_bytes=(gmib + 2 * dom0) * MiB, nr_pcpus=2), dom0_pages=dom0 * 256)
    out["host_s"], out["host_cpu_s"] = clk.lap()
    d = host.create_domain("big", gmib * 256, hvm=False)
    out["create_s"], out["create_cpu_s"] = clk.lap()
    g = L.LinuxPV.boot(host, d.domid, seed=1)
    out["guest_s"], out["guest_cpu_s"] = clk.lap()
    out["boot_s"] = out["host_s"] + out["create_s"] + out["guest_s"]
    out["boot_cpu_s"] = out["host_cpu_s"] + out["create_cpu_s"] + out["guest_cpu_s"]
    out["peak_rss_boot"] = _peak_rss()
    out["loadavg"] = [load0, os.getloadavg()[0]]
    out["pages"] = int(d.tot_pages)
    roles = np.bincount(g.role, minlength=len(L.ROLE_NAMES))
    out["tables"] = {f"L{lvl}": int(roles[r]) for lvl, r in ((1, L.L1T), (2, L.L2T), (3, L.L3T), (4, L.L4T))}
    out["pinned"] = int(((host.ft.type_info[host.owned_frames(d.domid)]
                          & np.uint64(0x0800000000000000)) != 0).sum())
    if args.get("check", True):
        clk.lap()
        g.step(args.get("steps", 100))
        out["steps_s"], _ = clk.lap()
        out["verify"] = g.verify()
        out["verify_s"], _ = clk.lap()
        out["invariants"] = invariants.check(host)[:5] if args.get("invariants", True) else []
        out["check_s"], _ = clk.lap()
    out["peak_rss"] = _peak_rss()
    return out


TASKS = {"boot": task_boot}


def run_task(task: str, **args) -> dict:
    """Run one task of this module in a fresh interpreter and return its figures."""
    return _run_task(__file__, task, **args)


def _gib(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def _ok(good: bool) -> str:
    return "yes" if good else "**NO**"


def section_guest_boot(ctx) -> str:
    """Boot time and peak RSS of a 4 GiB and a 64 GiB Linux-like PV guest."""
    rows = []
    results = {}
    for gmib, target in SIZES:
        r = run_task("boot", guest_mib=gmib, dom0_mib=DOM0_MIB, steps=100, check=True,
                     invariants=gmib <= BIG_MIB)
        results[gmib] = r
        t_ok = r["boot_s"] <= target
        rss_target = RSS_TARGET_GIB if gmib <= BIG_MIB else RSS_TARGET_BIG_GIB
        m_ok = r["peak_rss_boot"] <= rss_target * GiB
        clean = not r.get("invariants") and not r.get("verify")
        if not t_ok:
            ctx.failures.append(f"{gmib // 1024} GiB PV guest boot {r['boot_s']:.1f} s > {target:g} s")
        if not m_ok:
            ctx.failures.append(f"{gmib // 1024} GiB PV guest boot peak RSS above {rss_target:g} GiB")
        if not clean:
            ctx.failures.append(f"{gmib // 1024} GiB PV guest: invariant checker or guest check not clean")
        rows.append((gmib, target, r, t_ok, m_ok, clean))
    getattr(ctx, "results", {})["guest_scale"] = results
    lines = ["## Booting a Linux-like PV guest at scale", "",
             "Each size in a fresh process: the host (guest + 2 GiB, dom0 1 GiB), the domain "
             "(frames, P2M, M2P) and the guest kernel (`LinuxPV.boot`: page tables, P2M frames, "
             "pins, CR3, grants, dom0's ring mappings), as `build_host(DefaultHostSpec(mem_mib=..., "
             "dom0_mib=1024, pv_guests=((\"big\", G),), hvm_guests=()))` does. Wall time is the "
             "target; CPU time of the process is shown too, since the machine may be shared "
             "(load average at start/end of the boot given). After the boot, not counted: 100 "
             "workload steps, the guest's memory check and the invariant checker.", "",
             "| guest | pages | page tables L1/L2/L3/L4 (pinned) | boot: host + domain + kernel | "
             "boot total (target) | CPU | peak RSS of the boot (<= 4 GiB; 256 GiB: <= 8 GiB) | load avg | "
             "after: steps / verify / invariants | peak RSS with checks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for gmib, target, r, t_ok, m_ok, clean in rows:
        tb = r["tables"]
        after = "-"
        if "check_s" in r:
            inv = f"{r['check_s']:.1f} s" if gmib <= BIG_MIB else "not run"
            after = (f"{r['steps_s']:.1f} s / {r['verify_s']:.1f} s / {inv}: "
                     f"{'clean' if clean else '**' + '; '.join((r['verify'] + r['invariants'])[:2]) + '**'}")
        lines.append(
            f"| {gmib // 1024} GiB | {r['pages']:,} | {tb['L1']:,}/{tb['L2']}/{tb['L3']}/{tb['L4']} "
            f"({r['pinned']:,}) | {r['host_s']:.2f} + {r['create_s']:.2f} + {r['guest_s']:.2f} s | "
            f"**{r['boot_s']:.2f} s** (<= {target:g} s: {_ok(t_ok)}) | {r['boot_cpu_s']:.2f} s | "
            f"{_gib(r['peak_rss_boot'])}: {_ok(m_ok)} | {r['loadavg'][0]:.1f} / {r['loadavg'][1]:.1f} | "
            f"{after} | {_gib(r['peak_rss'])} |")
    return "\n".join(lines) + "\n"


def sections():
    """The sections this module contributes to the report, in order."""
    return [section_guest_boot]


if __name__ == "__main__":
    task, arg = sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
    print(json.dumps(TASKS[task](arg)))
