"""``xenpage demo``: retire pages of every kind on a fresh simulated host, with a report."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.panel import Panel

from ..backends.sim import SimHypervisor, build_host, host_path
from ..toolstack import hptool
from ..hypervisor import invariants
from ..toolstack.offline import mem_offline, resume_guest, suspend_guest
from ..toolstack.outcomes import Kind
from ..toolstack.report import Report
from ..toolstack.upstream import Defects, xc_exchange_page
from .output import emit


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
    res = mem_offline(hv, [free])  # guarded: Xen 4.17 would misalign the buddy around it
    r = res.report
    s = status(free)
    r.extend(s)
    g = res.timings.get("split_guard") or {}
    _step(con, steps, "a free page is offlined at once (guard frames around it first: "
          f"{g.get('guard_frames_probed', 0)} probed)", f"xenpage mem-offline {free:x}", r,
          "exit 0, Memory Status 2: [ PAGE_OFFLINED ], every free chunk still aligned",
          r.exit_code == 0 and "PAGE_OFFLINED" in s.stdout and host.heap.misaligned == 0)

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
    if host.heap.misaligned:
        s.err(f"xenpage: Xen 4.17 split the freed memory around it into {host.heap.misaligned} "
              "misaligned free chunk(s) (reserve_offlined_page; no tool can guard a domain's "
              "destruction)")
    _step(con, steps, f"destroying {pv.name} frees its pages: the pending one becomes offlined",
          f"xl destroy {pv.name}; xenpage mem-status {g:x}", s,
          "Memory Status 2: [ PAGE_OFFLINED ]", rc == 0 and s.data["status"]["status"] == 2)

    _pv_part(con, steps, host, hv)
    _hvm_part(con, steps, host, hv)
    ok = all(st["ok"] for st in steps)
    if keep:
        p = host_path(state_dir)
        host.save(p)
    if as_json:
        emit("demo", 0 if ok else 1, ok=ok, steps=steps)
    else:
        off = len(host.heap.offlined_list) + len(host.heap.broken_list)
        con.print(f"[bold]{'All steps behaved as Xen 4.17 does' if ok else 'Some steps misbehaved'}[/bold]; "
                  f"frames offlined now: {off}; free pages: {host.heap.free_pages}")
    return 0 if ok else 1


def _pv_part(con, steps, host, hv) -> None:
    """A second Linux-like PV guest: pages of each kind retired while it keeps working."""
    from ..guests.linux_pv import LinuxPV
    d = host.create_domain("domu2", 64 * 256)
    g = LinuxPV.boot(host, d.domid, seed=7)
    g.step(200)
    kinds = [
        ("a page mapped only by the kernel's direct map", g.kernel_only_pages()[11]),
        ("a private user page (mapped by one process)", g.user_pages("private")[5]),
        ("a page shared by two processes", g.user_pages("shared")[0]),
        ("a pinned page-table frame (a process's L1)", g.procs[1].ul1[0]),
        ("a P2M frame (the guest's own pfn->mfn list)", int(g.pfns_of(6)[0])),
    ]
    for title, pfn in kinds:
        m = g.mfn(pfn)
        res = mem_offline(hv, [m])
        g.step(100)
        problems = g.verify() + invariants.check(host)
        o = res.outcomes[0]
        _step(con, steps, f"PV guest: {title}", f"xenpage mem-offline {m:x}", res.report,
              "exchanged in place, old frame offlined, guest content and mappings intact",
              o.kind == Kind.EXCHANGED and not problems)
    ring = g.rings[0]["pfn"]
    m = g.mfn(ring)
    res = mem_offline(hv, [m])
    _step(con, steps, "PV guest: a ring page granted to dom0's backend", f"xenpage mem-offline {m:x}",
          res.report, "left offline-pending: granted (named grant ref), nothing changed",
          res.outcomes[0].kind == Kind.PENDING and not g.verify())
    batch = [g.mfn(p) for p in g.kernel_only_pages()[30:46]]
    before = g.suspends
    res = mem_offline(hv, batch)
    g.step(100)
    _step(con, steps, "PV guest: 16 pages in one batch", f"xenpage mem-offline {batch[0]:x} ... ({len(batch)} MFNs)",
          _short(res.report, 4), "all exchanged under ONE suspend",
          all(o.kind == Kind.EXCHANGED for o in res.outcomes) and g.suspends == before + 1 and not g.verify())
    # Stock libxenguest on the same kind of page (what the lab saw on real Xen 4.17).
    pf = g.kernel_only_pages()[60]
    m = g.mfn(pf)
    hv.page_offline_op(1, m, m)
    for label, df in (("stock xc_exchange_page", Defects()),
                      ("stock xc_exchange_page with only the foreigndom fix", Defects(pfd=False))):
        suspend_guest(hv, d.domid)
        r = xc_exchange_page(hv, d.domid, m, df)
        resume_guest(hv, d.domid)
        rep = Report()
        for line in r.log:
            rep.err(line)
        rep.out(f"xc_exchange_page -> {r.result}")
        problems = g.verify()
        for p in problems[:2]:
            rep.err(f"guest: {p}")
        if df.pfd:
            _step(con, steps, f"upstream: {label}", f"xc_exchange_page(xch, {d.domid}, {m:#x})", rep,
                  "fails: 'clear pte failed' (EINVAL), as on real Xen 4.17", r.result == -1 and r.errno == 22)
        else:
            _step(con, steps, f"upstream: {label}", f"xc_exchange_page(xch, {d.domid}, {m:#x})", rep,
                  "'succeeds' but leaves the mapping read-only (flags stripped)", r.result == 0 and bool(problems))


def _hvm_part(con, steps, host, hv) -> None:
    """The HVM and PVH guests: a frame retired in place with stock hypercalls (pause,
    decrease_reservation, populate_physmap, unpause), another by live migration."""
    from ..toolstack.guest_type import domain_type
    from ..toolstack.retire import RetireOptions
    for d in [x for x in hv.domain_list() if x.hvm]:
        kind = domain_type(hv, d).upper()
        g = host.guests.get(d.domid)
        if g is None:
            continue
        m = g.mfn(777)
        res = mem_offline(hv, [m], retire=RetireOptions(hvm="exchange"))
        hv.wait(0.01)
        o = res.outcomes[0]
        _step(con, steps, f"{kind} guest {d.name}: a page retired in place",
              f"xenpage mem-offline {m:x} --hvm=exchange", res.report,
              "gfn given back and repopulated under one pause, old frame offlined, memory intact",
              o.kind == Kind.EXCHANGED and not g.verify() and not _hvm_problems(host))
        m = g.mfn(778)
        res = mem_offline(hv, [m])
        o = res.outcomes[0]
        ng = host.guests.get(o.extra.get("new_domid"))
        _step(con, steps, f"{kind} guest {d.name}: a page retired by live migration",
              f"xenpage mem-offline {m:x}", res.report,
              "the guest moved to the same host, old frame offlined, memory intact",
              o.kind == Kind.MIGRATED and ng is not None and not ng.verify())


def _hvm_problems(host) -> list[str]:
    """The translated guests' p2m checks (the upstream step above leaves a PV guest's M2P
    wrong on purpose, as stock libxenguest does)."""
    from ..hypervisor import p2m
    return p2m.check(host)


def _short(report: Report, n: int) -> Report:
    r = Report(exit_code=report.exit_code, data=report.data)
    r.lines = report.lines[:n]
    if len(report.lines) > n:
        r.out(f"... ({len(report.lines) - n} more lines)")
    return r
