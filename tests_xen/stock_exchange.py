#!/usr/bin/env python3
"""Stock libxenguest ``xc_exchange_page`` on a suspended PV guest, one frame per suspend,
timed -- the comparison point for xenpage (run by test_stock_exchange.py in a subprocess, so
that LD_PRELOAD=pfdshim.so can take effect).

    [LD_PRELOAD=.../pfdshim.so XENPAGE_PFD=1] stock_exchange.py DOMID MFN [MFN ...]

Per frame: mark it offline (dom0 off pCPU 0), suspend the guest through xenstore, call
``xc_exchange_page``, fast-resume; one JSON line per frame on stdout.  libxc's own messages
go to stderr ($XENPAGE_XC_LOG, default debug here)."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time

os.environ.setdefault("XENPAGE_XC_LOG", "debug")

from xenpage.abi import sysctl as S  # noqa: E402
from xenpage.abi import xen as X  # noqa: E402
from xenpage.backends.xen import XenHypervisor  # noqa: E402
from xenpage.toolstack.pcpu import off_pcpu0  # noqa: E402


def p2m_entry(hv, domid, pfn):
    rc, frames, n = hv.pv_p2m_frames(domid)
    if rc or pfn >= n:
        return None
    m = hv.map_foreign(domid, [int(frames[pfn // 512])], False)
    if isinstance(m, int):
        return None
    v = int(m.array[0, pfn % 512])
    m.unmap()
    return v


def one(hv, domid: int, mfn: int) -> dict:
    out = {"domid": domid, "mfn": hex(mfn), "shim": bool(os.environ.get("LD_PRELOAD")),
           "pfd": bool(os.environ.get("XENPAGE_PFD"))}
    info = hv.domain_info(domid)
    if info is None or info.shutdown:
        out["error"] = "guest not running"
        return out
    gpfn = int(hv.m2p([mfn])[0])
    out["gpfn"] = hex(gpfn)
    with off_pcpu0(hv):
        rc, st = hv.page_offline_op(S.sysctl_page_offline, mfn, mfn)
    out["mark"] = {"rc": rc, "status": hex(int(st[0])) if st is not None else None}
    t0 = time.perf_counter()
    hv.xs_write(f"/local/domain/{domid}/control/shutdown", "suspend")
    while time.perf_counter() - t0 < 10:
        info = hv.domain_info(domid)
        if info and info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend:
            break
        time.sleep(0.01)
    t1 = time.perf_counter()
    out["suspend_s"] = round(t1 - t0, 4)
    if not (info and info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend):
        out["error"] = "guest did not suspend"
        return out
    sys.stderr.flush()
    ctypes.set_errno(0)
    r = hv.L.xc_exchange_page(hv.xch, domid, mfn)
    e = ctypes.get_errno()
    t2 = time.perf_counter()
    rr = hv.resume(domid, True)
    t3 = time.perf_counter()
    out.update(result=r, errno=e, errno_name=os.strerror(e) if e else "", exchange_s=round(t2 - t1, 4),
               resume_rc=rr, resume_s=round(t3 - t2, 4), suspended_s=round(t3 - t0, 4))
    _, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    out["old_status"] = hex(int(st[0]))
    new = p2m_entry(hv, domid, gpfn)
    out["p2m_after"] = hex(new) if new is not None else None
    if new is not None and new != mfn:
        out["m2p_of_new"] = hex(int(hv.m2p([new])[0]))
    if r != 0 and int(st[0]) & S.PG_OFFLINE_STATUS_OFFLINE_PENDING:
        hv.page_offline_op(S.sysctl_page_online, mfn, mfn)       # leave it as it was
    return out


def main(argv) -> int:
    domid = int(argv[0])
    with XenHypervisor() as hv:
        for m in argv[1:]:
            res = one(hv, domid, int(m, 16))
            sys.stderr.flush()
            print(json.dumps(res), flush=True)
            time.sleep(2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
