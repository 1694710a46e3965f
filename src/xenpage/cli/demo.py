"""``xenpage demo``: retire pages of every kind on a fresh simulated host, with a report."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.panel import Panel

from ..abi import mm
from ..backends.sim import SimHypervisor, build_host, host_path
from ..toolstack import hptool
from ..toolstack.report import Report
from .output import print_json


def _pick_free(host) -> int:
    """A free frame in the middle of the largest free chunk."""
    head, order = max(host.heap.chunks(), key=lambda c: c[1])
    return head + (1 << order) // 2


def _step(con, steps, title, cmd, report: Report, expect: str, ok: bool):
    steps.append({"step": title, "command": cmd, "result": report.to_json(), "expected": expect,
                  "ok": ok})
    if con is None:
        return
    body = "\n".join(("  " if l.stream == "out" else "! ") + l.text for l in report.lines)
    con.print(Panel(f"[bold]$ {cmd}[/bold]\n{body}\n[dim]exit {report.exit_code}[/dim]\n"
                    f"{'[green]as expected' if ok else '[red]UNEXPECTED'}: {expect}",
                    title=title, expand=False))


def run_demo(state_dir: Path, as_json: bool = False, keep: bool = False) -> int:
    con = None if as_json else Console()
    host = build_host()
    hv = SimHypervisor(host)
    steps: list[dict] = []
    status = lambda m: hptool.mem_status(hv, m)  # noqa: E731

    free = _pick_free(host)
    r = hptool.mem_offline(hv, free)
    s = status(free)
    r.extend(s)
    _step(con, steps, "a free page is offlined at once", f"xenpage mem-offline {free:x}", r,
          "exit 0, Memory Status 2: [ PAGE_OFFLINED ]",
          r.exit_code == 0 and "PAGE_OFFLINED" in s.stdout)

    d0 = int(host.p2m[0][len(host.p2m[0]) // 2])
    r = hptool.mem_offline(hv, d0)
    s = status(d0)
    r.extend(s)
    _step(con, steps, "a dom0 page stays offline-pending (dom0 is never suspended)",
          f"xenpage mem-offline {d0:x}", r, "exit 1, Memory Status 8: pending",
          r.exit_code == 1 and s.data["status"]["status"] == 8)

    img = host.xen_image[0]
    r = hptool.mem_offline(hv, img)
    _step(con, steps, "a Xen image page is refused", f"xenpage mem-offline {img:x}", r,
          "error 1 (EPERM), XEN_PAGE is not permitted be offlined",
          r.exit_code == 1 and r.data["rc"] == -1)

    r = hptool.mem_offline(hv, 0xA0)
    r.extend(status(0xA0))
    _step(con, steps, "the VGA hole is refused (not conventional RAM)", "xenpage mem-offline a0", r,
          "error 16 (EINVAL) for offline and status", r.exit_code == 1 and r.data["rc"] == -22)

    for m, what in ((free, "the offlined free page"), (d0, "the pending dom0 page")):
        r = hptool.mem_online(hv, m)
        s = status(m)
        r.extend(s)
        _step(con, steps, f"{what} is onlined again", f"xenpage mem-online {m:x}", r,
              "onlined successfully, Memory Status 0", r.exit_code == 0 and s.data["status"]["status"] == 0)

    pv = next(d for d in host.guest_domains() if d.domid and not d.hvm)
    g = int(host.pv_p2m(pv.domid)[host.guests[pv.domid].kernel_only_pages()[7]])
    r = hptool.mem_offline(hv, g)
    r.extend(status(g))
    _step(con, steps, f"a page of PV guest {pv.name} stays pending (stock behaviour: no suspend port)",
          f"xenpage mem-offline {g:x}", r, "exit 1, pending", r.exit_code == 1)
    rc = hv.destroy(pv.domid)
    s = status(g)
    _step(con, steps, f"destroying {pv.name} frees its pages: the pending one becomes offlined",
          f"xl destroy {pv.name}; xenpage mem-status {g:x}", s,
          "Memory Status 2: [ PAGE_OFFLINED ]", rc == 0 and s.data["status"]["status"] == 2)

    ok = all(st["ok"] for st in steps)
    if keep:
        p = host_path(state_dir)
        if p.exists():
            shutil.rmtree(p)
        host.save(p)
    if as_json:
        print_json({"ok": ok, "steps": steps})
    else:
        off = len(host.heap.offlined_list) + len(host.heap.broken_list)
        con.print(f"[bold]{'All steps behaved as Xen 4.17 does' if ok else 'Some steps misbehaved'}[/bold]; "
                  f"frames offlined now: {off}; free pages: {host.heap.free_pages}")
    return 0 if ok else 1
