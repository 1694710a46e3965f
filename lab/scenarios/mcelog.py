#!/usr/bin/env python3
# Machine checks raised by QEMU's monitor (the emulated hardware) -> Xen's poller -> dom0's /dev/mcelog.
# lab-options: cpu=Haswell-noTSX xen_args=mce_verbosity=verbose monitor=1 timeout=420
"""Scenario "mcelog" (issue 14): does a machine check that QEMU's monitor writes into an MCi
bank of the emulated CPU reach Xen's machine-check poller, and dom0's ``/dev/mcelog``?

dom0 asks the host (console notes ``mce-inject CPU BANK STATUS MCGSTATUS ADDR MISC``, which
``xenlab.py`` turns into the monitor's ``mce`` command while Xen runs), then reads the device
with xenpage's native reader (``xenpage.ras.devmcelog``) and Xen's console.  Environment:
``LAB_MCE_BANKS`` (default all), ``LAB_MCE_WAIT`` (seconds to wait for the poller, default 60),
``LAB_MCE_ADDR`` (machine address, default 0x20000040), ``LAB_MCE_GAP`` (seconds between
injections, default 1).  Output: ``mcelog.json``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, "/xenpage/lab/dom0")
sys.path.insert(0, "/xenpage/src")
import labproto as lab  # noqa: E402

OUT = os.environ.get("LAB_OUT", "/tmp/lab-out")
CE = 0x9C0000000000009F   # VAL|EN|MISCV|ADDRV, MCACOD memory read, channel unspecified
RES: dict = {"schema": 1, "injected": [], "records": [], "reads": []}


def sh(cmd: str) -> str:
    return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout


def dump() -> None:
    with open(os.path.join(OUT, "mcelog.json"), "w") as f:
        json.dump(RES, f, indent=1, default=str)


def main() -> int:
    from xenpage.ras.devmcelog import DevMcelog
    RES["xl_dmesg_boot"] = [l for l in sh("xl dmesg").splitlines()
                            if any(k in l.lower() for k in ("mce", "mca", "machine check", "mcheck", "cmci"))]
    RES["cpuinfo_flags"] = [l for l in sh("grep -m1 flags /proc/cpuinfo").split()
                            if l in ("mce", "mca", "hypervisor")]
    RES["dmesg_mcelog"] = [l for l in sh("dmesg").splitlines() if "mcelog" in l.lower()]
    with lab.Step("open-dev-mcelog") as s:
        dev = DevMcelog()
        RES["record_len"], RES["log_len"] = dev.record_len, dev.log_len
        s.detail = f"record_len={dev.record_len} log_len={dev.log_len}"
    first = dev.read()
    RES["records_at_boot"] = [r.to_json() for r in first]
    addr = int(os.environ.get("LAB_MCE_ADDR", "0x20000040"), 0)
    banks = [int(b) for b in os.environ.get("LAB_MCE_BANKS", "0 1 2 3 4 5 6 7 8 9").split()]
    with lab.Step("inject") as s:
        for b in banks:
            cmd = f"0 {b} {CE:#x} 0 {addr:#x} 0x86"
            lab.note(f"mce-inject {cmd}")
            RES["injected"].append({"cmd": cmd, "t": time.time()})
            time.sleep(float(os.environ.get("LAB_MCE_GAP", "1")))
        s.detail = f"{len(banks)} corrected errors at {addr:#x}"
    t0 = time.time()
    wait = float(os.environ.get("LAB_MCE_WAIT", "60"))
    with lab.Step("wait-dev-mcelog") as s:
        while time.time() - t0 < wait:
            recs = dev.read()
            if recs:
                RES["reads"].append({"t": round(time.time() - t0, 1), "n": len(recs)})
                RES["records"] += [r.to_json() for r in recs]
                if len(RES["records"]) >= len(banks):
                    break
            time.sleep(2)
        s.detail = f"{len(RES['records'])} records in {time.time() - t0:.0f} s"
        for r in RES["records"]:
            lab.note(f"record cpu={r['cpu']} bank={r['bank']} status={r['status_hex']} "
                     f"addr={r.get('addr_hex')} misc={r['misc']} tsc={r['tsc']}")
        if not RES["records"]:
            s.fail(f"no record on /dev/mcelog within {wait:.0f} s")
    RES["xl_dmesg_after"] = sh("xl dmesg").splitlines()[-80:]
    RES["dmesg_after"] = [l for l in sh("dmesg").splitlines()
                          if any(k in l.lower() for k in ("mce", "mcelog", "machine check", "apicid"))]
    dump()
    return 0 if RES["records"] else 1


if __name__ == "__main__":
    try:
        rc = main()
    finally:
        dump()
    sys.exit(rc)
