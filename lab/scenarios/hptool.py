#!/usr/bin/env python3
# Stock xen-hptool on real Xen 4.17, verbatim: free / dom0 / reserved / Xen-image / PV domU frames.
"""Scenario "hptool" (runs in the lab's dom0 with Debian's python3).

Records, with stdout and stderr captured separately and the exit code, what the stock
`xen-hptool mem-status|mem-offline|mem-online` prints for: a free frame, a dom0 frame, the VGA
hole, an E820-reserved frame, frames beyond max_mfn, Xen image frames, malformed arguments, and a
frame of a running PV domU (the memtest guest), plus the layout facts (E820, max_mfn, Xen's image
range, dom0's frame ranges).  Output: $LAB_OUT/hptool.json (and hptool.jsonl, streamed record by
record so that nothing measured is lost if the hypervisor hangs).

The hang in Xen 4.17's page offlining (xen-lab.md) is avoided: every mem-offline, and the
destruction of a domain with an offline-pending frame, runs with dom0's vCPUs pinned to
physical CPU 1; the affinity is restored afterwards.
"""
from __future__ import annotations

import ctypes
import os
import re
import selectors
import subprocess
import sys
import time

sys.path.insert(0, "/xenpage/lab/dom0")
import labproto as lab  # noqa: E402

BIN = "/usr/lib/xen-4.17/bin"
HPTOOL = f"{BIN}/xen-hptool"
MFNDUMP = f"{BIN}/xen-mfndump"
OUT = os.environ.get("LAB_OUT", "/tmp/lab-out")
GUEST_CFG = "/xenpage/lab/guest/memtest.cfg"
GUEST_NAME = "memtest"
GUEST_LOG = f"/var/log/xen/console/guest-{GUEST_NAME}.log"

stream = lab.Stream("hptool.jsonl")
RESULT: dict = {"schema": 1, "meta": {}, "layout": {}, "commands": [], "cases": {}, "checks": []}
T0 = time.time()


# ------------------------------------------------------------------------------------------------
# running commands

def run(cid: str, argv: list[str], *, timeout: float = 120, keep: int | None = None,
        quiet: bool = False) -> dict:
    """Run argv; record stdout and stderr separately (and their arrival order), exit code, time.
    keep=N keeps only the first N lines of stdout in the record (the line count is kept)."""
    t = time.time()
    rec = {"id": cid, "argv": argv, "t": round(t - T0, 2)}
    try:
        p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL)
    except OSError as e:
        rec.update(stdout="", stderr="", exit=None, error=str(e), elapsed_s=0.0)
        return _record(rec, quiet)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ, "stdout")
    sel.register(p.stderr, selectors.EVENT_READ, "stderr")
    data = {"stdout": b"", "stderr": b""}
    merged: list[list[str]] = []
    timed_out = False
    while sel.get_map():
        left = timeout - (time.time() - t)
        if left <= 0:
            timed_out = True
            p.kill()
            break
        for key, _ in sel.select(min(left, 1.0)):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            data[key.data] += chunk
            if merged and merged[-1][0] == key.data:
                merged[-1][1] += chunk.decode(errors="replace")
            else:
                merged.append([key.data, chunk.decode(errors="replace")])
    rc = p.wait()
    out = data["stdout"].decode(errors="replace")
    rec.update(stdout=out, stderr=data["stderr"].decode(errors="replace"),
               exit=None if timed_out else rc, elapsed_s=round(time.time() - t, 3))
    if timed_out:
        rec["timeout"] = timeout
    if len(merged) > 1:
        rec["order"] = [m[0] for m in merged]
    if keep is not None:
        lines = out.splitlines(True)
        rec["stdout_lines"] = len(lines)
        if len(lines) > keep:
            rec["stdout"] = "".join(lines[:keep])
            rec["stdout_truncated"] = True
    rec["_full_stdout"] = out
    return _record(rec, quiet)


def _record(rec: dict, quiet: bool) -> dict:
    full = rec.pop("_full_stdout", rec.get("stdout", ""))
    RESULT["commands"].append(rec)
    stream.add({"kind": "command", **rec})
    if not quiet:
        print(f"+ [{rec['id']}] {' '.join(rec['argv'])} -> exit {rec.get('exit')}", flush=True)
    rec = dict(rec, stdout_full=full)
    return rec


def hp(cid: str, *args) -> dict:
    """Stock xen-hptool (stdbuf -oL: line-buffered stdout keeps the stream order meaningful)."""
    return run(cid, ["stdbuf", "-oL", HPTOOL, *[str(a) for a in args]])


class Pinned:
    """dom0's vCPUs on physical CPU 1 (the 4.17 PoD-lock hang happens on pCPU 0)."""

    def __init__(self, why: str):
        self.why = why

    def __enter__(self):
        r = run(f"pin.{self.why}", ["xl", "vcpu-pin", "0", "all", "1"], quiet=True)
        if r["exit"] != 0:
            raise RuntimeError(f"xl vcpu-pin 0 all 1 failed: {r['stderr'].strip()}")
        v = run(f"pin.{self.why}.vcpu-list", ["xl", "vcpu-list", "0"], quiet=True)
        cpus = re.findall(r"^\S+\s+0\s+\d+\s+(\S+)\s", v["stdout"], re.M)
        if any(c not in ("1", "-") for c in cpus):
            raise RuntimeError(f"dom0 vCPU not on pCPU 1 after pinning: {v['stdout']!r}")
        return self

    def __exit__(self, *exc):
        run(f"unpin.{self.why}", ["xl", "vcpu-pin", "0", "all", "all"], quiet=True)
        return False


def check(name: str, ok: bool, detail: str) -> bool:
    RESULT["checks"].append({"name": name, "ok": ok, "detail": detail})
    stream.add({"kind": "check", "name": name, "ok": ok, "detail": detail})
    if ok:
        lab.step_ok(f"check:{name}", detail[:200])
    else:
        lab.Step.failed.append(name)
        lab.step_fail(f"check:{name}", detail[:300])
    return ok


def expect(name: str, rec: dict, *, exit: int | None = None, stdout: str | None = None,
           stderr: str | None = None) -> bool:
    """Compare a record with what xen-lab.md / xen-semantics.md say (verbatim substrings)."""
    lab.step_begin(f"check:{name}")
    bad = []
    if exit is not None and rec.get("exit") != exit:
        bad.append(f"exit {rec.get('exit')} != {exit}")
    if stdout is not None and stdout not in rec.get("stdout", ""):
        bad.append(f"stdout lacks {stdout!r} (got {rec.get('stdout', '').strip()[-120:]!r})")
    if stderr is not None and stderr not in rec.get("stderr", ""):
        bad.append(f"stderr lacks {stderr!r} (got {rec.get('stderr', '').strip()[-120:]!r})")
    return check(name, not bad, "; ".join(bad) or f"[{rec['id']}] as documented")


def cycle(case: str, mfn: int, *, pin: bool = True, online: bool = True) -> dict:
    """mem-status, mem-offline (pinned), mem-status, [mem-online, mem-status] of one frame."""
    h = f"{mfn:x}"
    ids = {"mfn": h}
    ids["status_before"] = hp(f"{case}.status_before", "mem-status", h)["id"]
    if pin:
        with Pinned(case):
            off = hp(f"{case}.offline", "mem-offline", h)
    else:
        off = hp(f"{case}.offline", "mem-offline", h)
    ids["offline"] = off["id"]
    ids["status_after_offline"] = hp(f"{case}.status_after_offline", "mem-status", h)["id"]
    if online:
        ids["online"] = hp(f"{case}.online", "mem-online", h)["id"]
        ids["status_after_online"] = hp(f"{case}.status_after_online", "mem-status", h)["id"]
    RESULT["cases"][case] = ids
    return off


def cmd(cid: str) -> dict:
    return next(c for c in RESULT["commands"] if c["id"] == cid)


# ------------------------------------------------------------------------------------------------
# layout facts

def parse_dmesg(text: str) -> dict:
    lay: dict = {"e820": [], "dom0": {}}
    in_e820 = False
    for line in text.splitlines():
        s = line.replace("(XEN)", "").strip()
        if s.startswith("Xen-e820 RAM map:"):
            in_e820 = True
            continue
        m = re.match(r"\[([0-9a-f]{16}), ([0-9a-f]{16})\] \((.+)\)$", s)
        if in_e820 and m:
            lay["e820"].append({"start": "0x" + m.group(1).lstrip("0") or "0x0",
                                "end": "0x" + m.group(2), "type": m.group(3)})
            continue
        in_e820 = False
        m = re.match(r"Xen image load base address: (\S+)", s)
        if m:
            lay["xen_load_base"] = m.group(1)
        m = re.match(r"New Xen image base address: (\S+)", s)
        if m:
            lay["xen_relocated_base"] = m.group(1)
        m = re.match(r"(Dom0 alloc\.|Init\. ramdisk|Phys-Mach map|Start info|Page tables|Boot stack|"
                     r"TOTAL|Loaded kernel|Init\. ramdisk|ENTRY ADDRESS|Dom0 kernel):\s+(.*)$", s)
        if m:
            lay["dom0"][m.group(1)] = m.group(2)
        m = re.match(r"Freed (\d+)kB init memory", s)
        if m:
            lay["xen_freed_init_kb"] = int(m.group(1))
    for e in lay["e820"]:
        e["start"] = "0x" + (e["start"][2:].lstrip("0") or "0")
        e["end"] = "0x" + (e["end"][2:].lstrip("0") or "0")
    lay["xen_dmesg_lines"] = [ln for ln in text.splitlines()
                              if re.search(r"e820|image|Dom0 alloc|Init\. ramdisk|Phys-Mach|Start info|"
                                           r"Page tables|Boot stack|TOTAL:|Freed \d+kB|Xen version|"
                                           r"System RAM|Scrubbing|Initial low memory", ln)]
    return lay


def max_ram_page() -> int | None:
    try:
        ctl = ctypes.CDLL("libxenctrl.so.4.17", use_errno=True)
        ctl.xc_interface_open.restype = ctypes.c_void_p
        ctl.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        ctl.xc_maximum_ram_page.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
        ctl.xc_interface_close.argtypes = [ctypes.c_void_p]
        h = ctl.xc_interface_open(None, None, 0)
        v = ctypes.c_ulong()
        rc = ctl.xc_maximum_ram_page(h, ctypes.byref(v))
        ctl.xc_interface_close(h)
        return v.value if rc == 0 else None
    except OSError:
        return None


def layout() -> dict:
    with lab.Step("layout") as s:
        dm = run("xl-dmesg", ["xl", "dmesg"], quiet=True)
        with open(os.path.join(OUT, "xl-dmesg-boot.txt"), "w") as f:
            f.write(dm["stdout_full"])
        lay = parse_dmesg(dm["stdout_full"])
        mx = max_ram_page()
        lay["max_mfn"] = hex(mx) if mx is not None else None
        ram = [e for e in lay["e820"] if e["type"] == "usable"]
        if ram:
            lay["max_mfn_from_e820"] = hex((int(ram[-1]["end"], 16) + 1) >> 12)
        # Xen's fixed image frames (_stext .. __2M_rwdata_end): the multiboot ELF's PT_LOAD
        # (measured by the host) placed at the relocated base.
        base = lay.get("xen_relocated_base")
        paddr = os.environ.get("LAB_XEN_PT_LOAD_PADDR")
        memsz = os.environ.get("LAB_XEN_PT_LOAD_MEMSZ")
        if base and paddr and memsz:
            first = (int(base, 16) + int(paddr, 16)) >> 12
            last = (int(base, 16) + int(paddr, 16) + int(memsz, 16) - 1) >> 12
            lay["xen_image_frames"] = [hex(first), hex(last)]
            lay["xen_elf_pt_load"] = {"paddr": paddr, "memsz": memsz}
        d0 = lay["dom0"]
        ranges = []
        for key in ("Dom0 alloc.", "Init. ramdisk"):
            m = re.match(r"([0-9a-f]+)->([0-9a-f]+)", d0.get(key, ""))
            if m:
                a, b = int(m.group(1), 16), int(m.group(2), 16)
                ranges.append({"what": key, "first": hex(a >> 12), "last": hex((b - 1) >> 12)})
        lay["dom0_frame_ranges"] = ranges
        RESULT["layout"] = lay
        stream.add({"kind": "layout", **lay, "xen_dmesg_lines": None})
        s.detail = (f"max_mfn={lay['max_mfn']} e820={len(lay['e820'])} entries "
                    f"xen_base={base} image={lay.get('xen_image_frames')}")
        if mx is None:
            s.fail("xc_maximum_ram_page failed")
        if not lay["e820"]:
            s.fail("no Xen-e820 map in xl dmesg")
    return RESULT["layout"]


# ------------------------------------------------------------------------------------------------
# the domU

def guest_log() -> str:
    try:
        with open(GUEST_LOG, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def wait_log(pattern: str, timeout: float, after: int = 0) -> re.Match | None:
    rx = re.compile(pattern, re.M)
    end = time.time() + timeout
    while time.time() < end:
        m = rx.search(guest_log(), after)
        if m:
            return m
        time.sleep(0.5)
    return None


def domu_part(lay: dict) -> None:
    with lab.Step("domu-start") as s:
        r = run("domu.create", ["xl", "create", GUEST_CFG])
        if r["exit"] != 0:
            s.fail(f"xl create exit {r['exit']}: {r['stderr'].strip()[-200:]}")
            return
        m = wait_log(r"^MEMTEST OK gen=(\d+)", 180)
        if not m:
            s.fail(f"no 'MEMTEST OK' on the domU console within 180 s; log tail: "
                   f"{guest_log()[-300:]!r}")
            return
        s.detail = f"first heartbeat {m.group(0)!r}"
    r = run("domu.domid", ["xl", "domid", GUEST_NAME])
    if r["exit"] != 0 or not r["stdout"].strip().isdigit():
        raise RuntimeError(f"xl domid {GUEST_NAME}: exit {r['exit']} {r['stderr'].strip()!r}")
    domid = int(r["stdout"].strip())
    run("domu.list", ["xl", "list"])
    pfns = {int(i): int(p, 16) for i, p in re.findall(r"^MEMTEST PFN (\d+) ([0-9a-f]+)", guest_log(), re.M)}
    with lab.Step("domu-p2m") as s:
        d = run("domu.dump-p2m", [MFNDUMP, "dump-p2m", str(domid)], keep=40)
        p2m = {int(a, 16): (int(b, 16), int(t, 16)) for a, b, t in
               re.findall(r"pfn=0x([0-9a-f]+) ==> mfn=0x([0-9a-f]+) \(type 0x([0-9a-f]+)\)", d["stdout_full"])}
        if d["exit"] != 0 or not p2m:
            s.fail(f"xen-mfndump dump-p2m {domid} exit {d['exit']}, {len(p2m)} entries")
            return
        if not pfns:
            s.fail("no MEMTEST PFN lines on the domU console")
            return
        idx = sorted(pfns)[len(pfns) // 2]
        pfn = pfns[idx]
        if pfn not in p2m:
            s.fail(f"memtest page {idx} pfn {pfn:#x} not in the P2M dump")
            return
        mfn, typ = p2m[pfn]
        frames = sorted(m for m, _ in p2m.values())
        RESULT["layout"]["domu"] = {"domid": domid, "memory_mib": 128, "p2m_entries": len(p2m),
                                    "mfn_min": hex(frames[0]), "mfn_max": hex(frames[-1]),
                                    "memtest_pages": len(pfns), "chosen_page": idx,
                                    "chosen_pfn": hex(pfn), "chosen_mfn": hex(mfn),
                                    "chosen_type": hex(typ)}
        stream.add({"kind": "domu", **RESULT["layout"]["domu"]})
        s.detail = f"dom{domid} memtest page {idx}: pfn {pfn:#x} -> mfn {mfn:#x}"
    h = f"{mfn:x}"
    case = "domu_page"
    ids = {"mfn": h, "pfn": hex(pfn), "domid": domid}
    RESULT["cases"][case] = ids
    ids["status_before"] = hp(f"{case}.status_before", "mem-status", h)["id"]
    mark = len(guest_log())
    with Pinned(case):
        off = hp(f"{case}.offline", "mem-offline", h)
        ids["offline"] = off["id"]
        ids["status_after_offline"] = hp(f"{case}.status_after_offline", "mem-status", h)["id"]
        lab.step_begin("check:domu-alive-after-offline")
        m = wait_log(r"^MEMTEST (OK|CORRUPT).*", 30, after=mark)
        check("domu-alive-after-offline", bool(m) and m.group(1) == "OK",
              f"next console line after the offline: {m.group(0) if m else None!r}")
        RESULT["cases"][case]["heartbeat_after_offline"] = m.group(0) if m else None
        run("domu.list-after-offline", ["xl", "list"])
        ids["destroy"] = run(f"{case}.destroy", ["xl", "destroy", str(domid)])["id"]
    ids["status_after_destroy"] = hp(f"{case}.status_after_destroy", "mem-status", h)["id"]
    ids["online"] = hp(f"{case}.online", "mem-online", h)["id"]
    ids["status_after_online"] = hp(f"{case}.status_after_online", "mem-status", h)["id"]
    log = guest_log()
    with open(os.path.join(OUT, "guest-memtest.log"), "w") as f:
        f.write(log)
    RESULT["cases"][case]["guest_console_head"] = log.splitlines()[:12]
    RESULT["cases"][case]["guest_console_tail"] = log.splitlines()[-8:]
    expect("domu-page-offline", off, exit=1,
           stderr=f"DOM{domid}: No suspend port, try live migration")
    expect("domu-page-offline-failed-suspend", off, stderr=f"Failed to suspend guest {domid} for mfn {h}")
    expect("domu-page-pending", cmd(f"{case}.status_after_offline"), exit=0,
           stdout="Memory Status 8: [ PAGE_OFFLINE_PENDING  PAGE_ONLINED ]")
    expect("domu-page-offlined-after-destroy", cmd(f"{case}.status_after_destroy"), exit=0,
           stdout="Memory Status 2: [ PAGE_OFFLINED ]")


# ------------------------------------------------------------------------------------------------

def main() -> int:
    try:
        return scenario()
    finally:
        # whatever happened, leave the record (hptool.jsonl has been streamed anyway)
        import json
        RESULT["meta"]["elapsed_s"] = round(time.time() - T0, 1)
        RESULT["meta"]["failed_checks"] = lab.Step.failed
        with open(os.path.join(OUT, "hptool.json"), "w") as f:
            json.dump(RESULT, f, indent=1)
            f.write("\n")


def scenario() -> int:
    meta = RESULT["meta"]
    meta["kernel"] = os.uname().release
    meta["lab_run_id"] = os.environ.get("LAB_RUN_ID")
    with lab.Step("xl-info") as s:
        info = run("xl-info", ["xl", "info"])
        kv = dict(re.findall(r"^(\w+)\s*:\s*(.*)$", info["stdout"], re.M))
        meta.update({k: kv.get(k) for k in ("xen_version", "xen_commandline", "nr_cpus",
                                            "total_memory", "free_memory", "xen_scheduler")})
        s.detail = f"Xen {kv.get('xen_version')}"
    run("xl-list", ["xl", "list"])
    run("xl-vcpu-list", ["xl", "vcpu-list"])
    lay = layout()
    mx = int(lay["max_mfn"], 16) if lay.get("max_mfn") else 0x7ffe0

    with lab.Step("hptool-args"):
        hp("args.none")
        hp("args.help", "help")
        hp("args.mem-offline-noarg", "mem-offline")
        hp("args.mem-status-noarg", "mem-status")
        hp("args.mem-offline-2args", "mem-offline", "3fff0", "3fff1")
        hp("args.mem-query", "mem-query", "1")
        hp("args.mem-prefix", "mem-", "1")
        hp("args.mem-o-prefix", "mem-o", "1")
        hp("args.mem-status-0x", "mem-status", "0x1")
        hp("args.mem-status-zz", "mem-status", "zz")
        hp("args.mem-online-zz", "mem-online", "zz")
        hp("args.bogus", "bogus-command")
        with Pinned("args.mem-offline-zz"):
            r = hp("args.mem-offline-zz", "mem-offline", "zz")
        # sscanf failed: the MFN is whatever the stack held (0 in the first run, a frame owned
        # by DOMID_IO, left offline-pending).  Record its state and put it back online.
        m = re.search(r"Prepare to offline MEMORY mfn ([0-9a-f]+)", r["stdout"])
        if m:
            hp("args.mem-offline-zz.status", "mem-status", m.group(1))
            hp("args.mem-offline-zz.undo", "mem-online", m.group(1))
            hp("args.mem-offline-zz.status_after_undo", "mem-status", m.group(1))

    with lab.Step("free-page") as s:
        free = None
        for cand in (0x3fff0, 0x20000, 0x10000, 0x8000):
            off = cycle(f"free_candidate_{cand:x}", cand)
            if off["exit"] == 0 and "PG_OFFLINE_OFFLINED" in off["stdout"]:
                free = cand
                RESULT["cases"]["free_page"] = RESULT["cases"][f"free_candidate_{cand:x}"]
                break
        if free is None:
            s.fail("no candidate frame was free")
        else:
            s.detail = f"mfn {free:#x}"
            c = RESULT["cases"]["free_page"]
            expect("free-page-offline", cmd(c["offline"]), exit=0,
                   stdout=f"Memory mfn {free:x} offlined successfully, current state is [PG_OFFLINE_OFFLINED]")
            expect("free-page-offlined", cmd(c["status_after_offline"]), exit=0,
                   stdout="Memory Status 2: [ PAGE_OFFLINED ]")
            expect("free-page-online", cmd(c["online"]), exit=0,
                   stdout=f"Memory mfn {free:x} onlined successfully")

    with lab.Step("dom0-page") as s:
        r = next((x for x in lay.get("dom0_frame_ranges", []) if x["what"] == "Dom0 alloc."), None)
        mfn = (int(r["first"], 16) + int(r["last"], 16)) // 2 if r else 0x64000
        off = cycle("dom0_page", mfn)
        s.detail = f"mfn {mfn:#x}"
        expect("dom0-page-offline", off, exit=1, stderr="DOM0: No suspend port, try live migration")
        expect("dom0-page-offline-failed-suspend", off,
               stderr=f"Failed to suspend guest 0 for mfn {mfn:x}")
        expect("dom0-page-pending", cmd("dom0_page.status_after_offline"), exit=0,
               stdout="Memory Status 8: [ PAGE_OFFLINE_PENDING  PAGE_ONLINED ]")
        expect("dom0-page-online", cmd("dom0_page.online"), exit=0,
               stdout=f"Memory mfn {mfn:x} onlined successfully")
        # a second dom0 frame: the one the earlier lab used, if it is dom0's here too
        cycle("dom0_page_2", 0x7fee0)

    with lab.Step("reserved-frames"):
        for case, mfn in (("vga_hole", 0xa0), ("bios_reserved_f0", 0xf0),
                          ("e820_reserved_above_max", mx + 0x10), ("beyond_e820_4g", 0x100000)):
            cycle(case, mfn)
        expect("vga-hole-status", cmd("vga_hole.status_before"), exit=1,
               stderr="Querying page mfn a0 failed, error 16")
        expect("vga-hole-offline", cmd("vga_hole.offline"), exit=1,
               stderr="Offlining page mfn a0 failed, error 16")
        expect("vga-hole-offline-xenpage-msg", cmd("vga_hole.offline"),
               stderr="XEN_PAGE is not permitted be offlined")
        expect("above-max-offline", cmd("e820_reserved_above_max.offline"), exit=1,
               stderr=f"Offlining page mfn {mx + 0x10:x} failed, error 16")

    with lab.Step("xen-image-frames"):
        img = lay.get("xen_image_frames") or ["0x7fa00", "0x7fda6"]
        first, last = int(img[0], 16), int(img[1], 16)
        cycle("xen_image_first", first)
        cycle("xen_image_last", last)
        if first != 0x7fa00:
            cycle("xen_image_7fa00", 0x7fa00)
        expect("xen-image-offline", cmd("xen_image_first.offline"), exit=1,
               stderr=f"Offlining page mfn {first:x} failed, error 1")
        expect("xen-image-last-offline", cmd("xen_image_last.offline"), exit=1,
               stderr=f"Offlining page mfn {last:x} failed, error 1")

    with lab.Step("domu"):
        domu_part(lay)

    run("xl-list-end", ["xl", "list"])
    dm = run("xl-dmesg-end", ["xl", "dmesg"], quiet=True)
    with open(os.path.join(OUT, "xl-dmesg-end.txt"), "w") as f:
        f.write(dm["stdout_full"])
    RESULT["commands"] = [c for c in RESULT["commands"] if not c["id"].startswith("xl-dmesg")]
    return 1 if lab.Step.failed else 0


if __name__ == "__main__":
    sys.exit(main())
