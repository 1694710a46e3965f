"""Stock ``xc_exchange_page`` (libxenguest 4.17) next to xenpage on the same kind of guest:

* as shipped it fails at its first mmu_update batch ("clear pte failed", EINVAL: no
  page-table owner in foreigndom);
* with only that fixed (tests_xen/pfdshim.so, LD_PRELOAD) it exchanges one frame per suspend
  -- the time the guest stays suspended per frame is the comparison point for xenpage, whose
  per-frame figures come from single-frame and batched commands on the same guest.
What happens to the guest afterwards (stripped PTE flags, wrong M2P entry) is recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import destroy_guest, p2m, run, start_guest, status, xenpage
from xenpage.abi import sysctl as S

HERE = Path(__file__).resolve().parent
SHIM = HERE / "pfdshim.so"


def _stock(domid, mfns, shim: bool):
    env = {"XENPAGE_XC_LOG": "debug"}
    if shim:
        env.update(LD_PRELOAD=str(SHIM), XENPAGE_PFD="1")
    r = run([sys.executable, str(HERE / "stock_exchange.py"), str(domid), *[f"{m:x}" for m in mfns]],
            timeout=300, env=env)
    return r, [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]


def test_stock_exchange_vs_xenpage(xen, rec):
    g = start_guest("memtest-stock")
    try:
        table = p2m(xen, g.domid)
        pfns = g.pfns()
        pick = [int(table[pfns[i]]) for i in (200, 1200, 2200, 3200, 3700, 3900, 500, 1500, 2500, 3500)]
        # xenpage, one frame per command (= per suspend), then 4 frames in one command
        single = []
        for m in pick[:2]:
            r = xenpage("mem-offline", f"{m:x}", as_json=True)
            assert r.rc == 0, r.stderr
            single.append(r.data["timings"]["guests"][str(g.domid)])
        r4 = xenpage("mem-offline", *[f"{m:x}" for m in pick[2:6]], as_json=True)
        assert r4.rc == 0, r4.stderr
        batch4 = r4.data["timings"]["guests"][str(g.domid)]
        mark = g.mark()
        # stock as shipped
        plain_run, plain = _stock(g.domid, pick[6:7], shim=False)
        hb_plain = g.wait_heartbeats(1, after=mark, timeout=30)
        # stock with only the foreigndom fix
        shim_run, shimmed = ([], [])
        if SHIM.exists():
            shim_run, shimmed = _stock(g.domid, pick[7:10], shim=True)
        g.wait_heartbeats(2, after=mark, timeout=30)
        rec.add("stock-vs-xenpage", domid=g.domid,
                xenpage_single=[{k: t[k] for k in ("pages", "suspended_s", "suspend_s", "toolstack_s", "resume_s")}
                                for t in single],
                xenpage_batch4={k: batch4[k] for k in ("pages", "suspended_s", "suspend_s", "toolstack_s", "resume_s")},
                stock_plain=plain, stock_plain_stderr=plain_run.stderr[-3000:],
                stock_pfdshim=shimmed, stock_pfdshim_stderr=getattr(shim_run, "stderr", "")[-6000:],
                guest_after_plain=hb_plain[-1:] if hb_plain else None,
                guest_console_after=g.tail(12), guest_bad_lines=g.bad_lines(mark)[:20],
                guest_alive=xen.domain_info(g.domid).to_json() if xen.domain_info(g.domid) else None)
        assert plain and plain[0]["result"] == -1 and plain[0]["errno"] == 22
        assert "clear pte failed" in plain_run.stderr
        assert status(xen, pick[6]) == 0          # left as it was
        if not SHIM.exists():
            pytest.skip("tests_xen/pfdshim.so not in the payload (built by tests_xen/run_lab.py)")
        assert shimmed and shimmed[0]["result"] == 0, shim_run.stderr[-2000:]
        assert int(shimmed[0]["old_status"], 16) == S.PG_OFFLINE_STATUS_OFFLINED
    finally:
        if xen.domain_info(g.domid) is not None:
            destroy_guest(xen, g)
