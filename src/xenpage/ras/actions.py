"""The ``hard`` action on a real Xen host: mark a frame broken through Xen's machine-check
path.  dom0 has no hypercall for ``offline_page(mfn, broken=1)``; the MCE handler is the
only caller.  ``xen-mceinj`` (xen-utils, ``tools/tests/mce-test/tools/xen-mceinj.c``) makes
the CPU report an error: ``-t 0`` is MCE_SRAO_MEM (bank 7, MCi_STATUS 0xBD2000008000017A,
MISC 0x86: a physical address), ``-p`` the machine address when no ``-d`` is given (the
target is then Xen itself, so the address is not translated).  Xen's
``mc_memerr_dhandler`` then offlines the frame with ``broken=1``: a free frame is offlined at
once, a PV owner is crashed, dom0 and HAP HVM owners get a vMCE.
"""

from __future__ import annotations

import shutil
import subprocess

from ..abi import sysctl as S


def xen_mceinj_hard(hv, mfn: int, cpu: int = 0, exe: str = "xen-mceinj", timeout: float = 30.0) -> dict:
    """``xen-mceinj -t 0 -c CPU -p ADDR`` for ``mfn``, then what Xen reports about it."""
    path = shutil.which(exe)
    if path is None:
        return {"effect": "failed", "error": f"{exe} not found (package xen-utils-4.17)"}
    addr = mfn << 12
    try:
        p = subprocess.run([path, "-t", "0", "-c", str(cpu), "-p", f"{addr:#x}"],
                           capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"effect": "failed", "error": str(e)}
    rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    status = int(st[0]) if st is not None else None
    out = {"rc": p.returncode, "stdout": p.stdout[-2000:], "stderr": p.stderr[-2000:],
           "query_rc": rc, "query_status": status}
    if p.returncode != 0 or rc < 0 or status is None:
        out["effect"] = "failed"
        out["error"] = (p.stderr or p.stdout).strip().splitlines()[-1:] or [f"exit {p.returncode}"]
        out["error"] = out["error"][0]
    elif status & S.PG_OFFLINE_STATUS_OFFLINED:
        out["effect"] = "offlined"
    elif status & S.PG_OFFLINE_STATUS_BROKEN:
        out["effect"] = "pending"
    else:
        out["effect"] = "failed"
        out["error"] = "xen-mceinj ran but Xen did not mark the frame broken"
    return out
