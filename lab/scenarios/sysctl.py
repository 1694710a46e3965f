#!/usr/bin/env python3
# The page-offline sysctl itself (libxenguest via ctypes): rc, errno and every status word.
"""Scenario "sysctl" (runs in the lab's dom0 with Debian's python3).

xen-hptool hides the hypervisor's answer behind its messages; the simulator models the answer
itself.  This scenario calls `xc_query_page_offline_status`, `xc_mark_page_offline` and
`xc_mark_page_online` (they live in libxenguest.so.4.17) on single frames and on ranges, and
records rc, errno and each 32-bit status word.  Output: $LAB_OUT/sysctl.json (+ sysctl.jsonl
streamed).  Every offline runs with dom0's vCPUs pinned to physical CPU 1 (4.17 hang).
"""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, "/xenpage/lab/dom0")
import labproto as lab  # noqa: E402

OUT = os.environ.get("LAB_OUT", "/tmp/lab-out")
stream = lab.Stream("sysctl.jsonl")
RESULT: dict = {"schema": 1, "calls": [], "checks": []}

ctl = ctypes.CDLL("libxenctrl.so.4.17", use_errno=True)
guest = ctypes.CDLL("libxenguest.so.4.17", use_errno=True)
ctl.xc_interface_open.restype = ctypes.c_void_p
ctl.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
ctl.xc_interface_close.argtypes = [ctypes.c_void_p]
ctl.xc_maximum_ram_page.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
FUNCS = {"query": guest.xc_query_page_offline_status, "offline": guest.xc_mark_page_offline,
         "online": guest.xc_mark_page_online}
for f in FUNCS.values():
    f.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(ctypes.c_uint32)]
    f.restype = ctypes.c_int
XCH = ctl.xc_interface_open(None, None, 0)


def pin(on: bool) -> None:
    subprocess.run(["xl", "vcpu-pin", "0", "all", "1" if on else "all"], check=True)


def call(op: str, start: int, end: int | None = None, tag: str = "") -> dict:
    """One sysctl through libxc; the status array is pre-filled with 0xdeadbeef so that slots
    libxc/Xen did not copy back are visible."""
    end = start if end is None else end
    n = max(end - start + 1, 1)
    st = (ctypes.c_uint32 * n)(*([0xDEADBEEF] * n))
    if op == "offline":
        pin(True)
    try:
        ctypes.set_errno(0)
        t = time.time()
        rc = FUNCS[op](XCH, start, end, st)
        err = ctypes.get_errno()
        dt = time.time() - t
    finally:
        if op == "offline":
            pin(False)
    rec = {"op": op, "start": hex(start), "end": hex(end), "rc": rc,
           "errno": err if rc < 0 else 0, "errno_name": os.strerror(err) if rc < 0 else "",
           "status": [f"0x{v:08x}" for v in st], "tag": tag, "elapsed_s": round(dt, 4)}
    RESULT["calls"].append(rec)
    stream.add(rec)
    print(f"{op} {start:#x}..{end:#x} -> rc={rc} errno={rec['errno']} status={rec['status'][:4]}",
          flush=True)
    return rec


def check(name: str, rec: dict, rc: int, errno: int, status: list[int] | None) -> None:
    got_status = [int(x, 16) for x in rec["status"]]
    bad = []
    if rec["rc"] != rc:
        bad.append(f"rc {rec['rc']} != {rc}")
    if rec["errno"] != errno:
        bad.append(f"errno {rec['errno']} != {errno}")
    if status is not None and got_status != status:
        bad.append(f"status {[hex(x) for x in got_status]} != {[hex(x) for x in status]}")
    ok = not bad
    RESULT["checks"].append({"name": name, "ok": ok, "detail": "; ".join(bad)})
    lab.step_begin(f"check:{name}")
    if ok:
        lab.step_ok(f"check:{name}", "as xen-semantics.md says")
    else:
        lab.Step.failed.append(name)
        lab.step_fail(f"check:{name}", "; ".join(bad))


def cycle(tag: str, mfn: int) -> tuple[dict, dict, dict, dict, dict]:
    q0 = call("query", mfn, tag=tag)
    off = call("offline", mfn, tag=tag)
    q1 = call("query", mfn, tag=tag)
    on = call("online", mfn, tag=tag)
    q2 = call("query", mfn, tag=tag)
    return q0, off, q1, on, q2


EINVAL, EPERM = 22, 1
UNTOUCHED = 0x01010101


def main() -> int:
    mx = ctypes.c_ulong()
    ctl.xc_maximum_ram_page(XCH, ctypes.byref(mx))
    RESULT["max_mfn"] = hex(mx.value)
    with lab.Step("sysctl-single-frames"):
        free = cycle("free", 0x20000)
        check("free-offline", free[1], 0, 0, [0x2])
        check("free-query-offlined", free[2], 0, 0, [0x2])
        check("free-online", free[3], 0, 0, [0x2])
        check("free-query-online", free[4], 0, 0, [0x0])
        d0 = cycle("dom0", 0x63fff)
        check("dom0-offline", d0[1], 0, 0, [0x00001004])
        check("dom0-query-pending", d0[2], 0, 0, [0x8])
        check("dom0-online", d0[3], 0, 0, [0x2])
        xen = cycle("xen-image", 0x7fa00)
        check("xen-image-offline", xen[1], -1, EPERM, [0x7FF20108])
        check("xen-image-online", xen[3], 0, 0, [0x0])
        vga = cycle("vga-hole", 0xa0)
        check("vga-query", vga[0], -1, EINVAL, [UNTOUCHED])
        check("vga-offline", vga[1], -1, EINVAL, [0x808])
        check("vga-online", vga[3], 0, 0, [0x0])
        bios = cycle("bios-reserved", 0xf0)
        check("bios-offline", bios[1], -1, EINVAL, [0x808])
        above = cycle("e820-reserved-above-max", mx.value + 0x10)
        check("above-max-query", above[0], -1, EINVAL, [UNTOUCHED])
        check("above-max-offline", above[1], -1, EINVAL, [UNTOUCHED])
        check("above-max-online", above[3], -1, EINVAL, [UNTOUCHED])
        cycle("beyond-e820-4g", 0x100000)
        cycle("frame-0", 0x0)
        cycle("frame-9e", 0x9e)
        cycle("frame-9f-partial-ram", 0x9f)
    with lab.Step("sysctl-ranges"):
        r = call("offline", 0x20000, 0x20003, tag="free-range")
        check("free-range-offline", r, 0, 0, [0x2] * 4)
        call("online", 0x20000, 0x20003, tag="free-range")
        call("query", 0x9c, 0xa2, tag="ram-into-vga-hole")
        r = call("offline", 0x20000, 0x20001, tag="free-range-2")
        call("online", 0x20000, 0x20001, tag="free-range-2")
        r = call("offline", 0x7f9fe, 0x7fa01, tag="into-xen-image")
        call("online", 0x7f9fe, 0x7f9ff, tag="into-xen-image")
        r = call("query", 0x20001, 0x20000, tag="end-before-start")
        check("end-before-start", r, -1, EINVAL, [0xDEADBEEF])
        r = call("offline", 0x20001, 0x20000, tag="end-before-start")
    ctl.xc_interface_close(XCH)
    RESULT["failed_checks"] = lab.Step.failed
    with open(os.path.join(OUT, "sysctl.json"), "w") as f:
        json.dump(RESULT, f, indent=1)
        f.write("\n")
    return 1 if lab.Step.failed else 0


if __name__ == "__main__":
    sys.exit(main())
