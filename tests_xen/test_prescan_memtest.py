"""The pre-scan (``toolstack/prescan.py``) on real Xen 4.17: log-dirty of the running memtest PV
guest through ``XEN_DOMCTL_shadow_op`` (``xc_shadow_control`` / ``xc_logdirty_control``), its
bitmap indexed by pfn, and ``xenpage mem-offline`` with the pre-scan next to the full scan in
one run (batches alternate: default, then ``XENPAGE_PRESCAN=0``): suspended and toolstack time
per page, the pre-scan's own running time and dirty tables; memtest sees nothing corrupt or
moved; log-dirty is off afterwards.

Debian's Xen 4.17.7 (group ``stock``) answers ENABLE_LOGDIRTY for a PV guest with
-EOPNOTSUPP: it is built without shadow paging (``# CONFIG_SHADOW_PAGING is not set``; a PV
guest's log-dirty lives in the shadow code), so a PV guest has no log-dirty there (nor PV live
migration).  Then the pre-scan must fall back to the full path with that reason, and the tests
that need a bitmap are skipped.  The group ``prescan-shadow`` boots the lab's rebuilt Xen 4.17
(``lab/xen-rebuilt/build.sh``: ``CONFIG_SHADOW_PAGING=y``) with ``XENPAGE_LAB_PV_LOGDIRTY=1``:
there log-dirty must work, and nothing is skipped."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from helpers import p2m, run, status, xenpage, xenpage_cmd
from xenpage.abi import errno as E
from xenpage.abi import hvm as H
from xenpage.abi import sysctl as S
from xenpage.toolstack import prescan as PS
from xenpage.toolstack.exchange import load_guest, scan
from xenpage.toolstack.offline import resume_guest, suspend_guest
from xenpage.toolstack.prescan import dirty_pfns

PAGES = 48
PER_SUSPEND = 8
#: set by run_lab.py for the group ``prescan-shadow`` (the rebuilt Xen): log-dirty must work
REQUIRED = os.environ.get("XENPAGE_LAB_PV_LOGDIRTY") == "1"


def _pv_logdirty(xen, domid: int, rec) -> int:
    """0 if this Xen gives a PV guest log-dirty (turned off again), else its errno."""
    rc = xen.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)[0]
    off = xen.logdirty_control(domid, H.XEN_DOMCTL_SHADOW_OP_OFF)[0]
    rec.add("prescan-pv-logdirty-support", enable_rc=rc, off_rc=off, required=REQUIRED)
    assert rc in (0, -E.EOPNOTSUPP), f"ENABLE_LOGDIRTY of a PV guest: {rc}"
    assert rc or off == 0
    if REQUIRED:
        assert rc == 0, f"this Xen was to give a PV guest log-dirty (shadow paging): {E.name(rc)}"
    return rc


def test_logdirty_bitmap_is_indexed_by_pfn(xen, memtest, rec):
    g = memtest
    table = p2m(xen, g.domid)
    n = int(table.size)
    if _pv_logdirty(xen, g.domid, rec):
        pytest.skip("this Xen has no PV log-dirty (built without shadow paging): EOPNOTSUPP")
    rc, _, _ = xen.logdirty_control(g.domid, H.XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY)
    assert rc == 0, f"ENABLE_LOGDIRTY: {rc}"
    try:
        time.sleep(2)
        rc, bits, st = xen.logdirty_control(g.domid, H.XEN_DOMCTL_SHADOW_OP_CLEAN, n, packed=True)
        assert rc == 0 and bits is not None and bits.size == (n + 7) // 8
        dirty = dirty_pfns(bits, n)
        rc2, bits2, st2 = xen.logdirty_control(g.domid, H.XEN_DOMCTL_SHADOW_OP_PEEK, n)
    finally:
        off = xen.logdirty_control(g.domid, H.XEN_DOMCTL_SHADOW_OP_OFF)[0]
    mine = set(g.pfns().values())  # memtest's pfns (pfns() maps its page index to the pfn)
    rec.add("prescan-logdirty", p2m_size=n, dirty=int(dirty.size), dirty_memtest=len(mine & set(dirty.tolist())),
            stats=[st.fault_count, st.dirty_count], peek_after_clean=int(bits2.sum()) if bits2 is not None else None,
            sample=[hex(p) for p in dirty[:16].tolist()], off_rc=off)
    assert off == 0
    assert dirty.size > 0 and int(dirty.max()) < n
    assert rc2 == 0 and bits2.dtype == bool and bits2.size == n


def test_prescan_finds_what_a_full_scan_finds(xen, memtest, rec):
    """The pre-scan's entries equal a full scan's, on real Xen: log-dirty on and every table
    scanned while memtest runs (for 3 s more), then the guest suspended, the bitmap read and
    cleaned, the dirtied tables scanned again -- against every table of the suspended guest
    scanned afresh.  Nothing is exchanged; the guest resumes, memtest clean, log-dirty off."""
    g = memtest
    if _pv_logdirty(xen, g.domid, rec):
        pytest.skip("this Xen has no PV log-dirty (built without shadow paging): EOPNOTSUPP")
    pfns = g.pfns()
    table = p2m(xen, g.domid)
    targets = np.array([int(table[pfns[i]]) for i in range(0, len(pfns), max(1, len(pfns) // 256))],
                       dtype=np.int64)
    start_mark = g.mark()
    t0 = time.perf_counter()
    pre = PS.start(xen, g.domid, targets)
    running_s = time.perf_counter() - t0
    assert pre.enabled, pre.stats
    try:
        time.sleep(3)
        t1 = time.perf_counter()
        ok, ours, msg = suspend_guest(xen, g.domid)
        assert ok and ours, msg
        t2 = time.perf_counter()
        try:
            got = PS.finish(pre)
            t3 = time.perf_counter()
            assert got is not None, pre.stats
            view, refs = got
            full, err = load_guest(xen, g.domid)
            assert err is None, err
            rc, frefs = scan(xen, full, targets)
            t4 = time.perf_counter()
            assert rc == 0
        finally:
            rrc = resume_guest(xen, g.domid)
    finally:
        PS.stop(pre)
    assert rrc == 0
    key = sorted((r.table, r.index, r.value, r.level) for r in refs)
    fkey = sorted((r.table, r.index, r.value, r.level) for r in frefs)
    rec.add("prescan-equivalence", targets=int(targets.size), entries=len(fkey), same=key == fkey,
            running_s=running_s, suspend_s=t2 - t1, finish_s=t3 - t2, full_load_and_scan_s=t4 - t3,
            tables=int(full.table_pfns()[0].size), stats=pre.stats,
            only_prescan=[list(map(hex, k)) for k in sorted(set(key) - set(fkey))][:8],
            only_full=[list(map(hex, k)) for k in sorted(set(fkey) - set(key))][:8])
    assert len(fkey) >= targets.size  # every memtest page is mapped at least once
    assert key == fkey
    assert pre.stats["dirty_pfns"] > 0  # memtest wrote its pages meanwhile: the bitmap is real
    hb = g.wait_heartbeats(2, after=start_mark, timeout=90)
    assert len(hb) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in hb), hb
    assert g.bad_lines(start_mark) == []
    # log-dirty was left off: it can be turned on (and off) again
    assert _pv_logdirty(xen, g.domid, rec) == 0


def _offline(mfns: list[int], prescan: bool):
    args = ["mem-offline", *[f"{m:x}" for m in mfns]]
    if prescan:
        return xenpage(*args, as_json=True)
    r = run(xenpage_cmd() + ["--backend", "xen", *args, "--json"], env={"XENPAGE_PRESCAN": "0"})
    r.data = json.loads(r.stdout) if r.stdout.strip() else None
    return r


def test_mem_offline_with_and_without_prescan(xen, memtest, rec):
    g = memtest
    pfns = g.pfns()
    table = p2m(xen, g.domid)
    idx = [int(i) for i in np.linspace(96, len(pfns) - 96, PAGES)]
    targets = [(pfns[i], int(table[pfns[i]])) for i in idx]
    assert len({m for _, m in targets}) == PAGES and all(status(xen, m) == 0 for _, m in targets)
    supported = _pv_logdirty(xen, g.domid, rec) == 0
    start_mark = g.mark()
    rows, outs_all = [], []
    for k in range(0, PAGES, PER_SUSPEND):
        batch = targets[k:k + PER_SUSPEND]
        pre = (k // PER_SUSPEND) % 2 == 0
        mark = g.mark()
        r = _offline([m for _, m in batch], pre)
        rec.add("prescan-mem-offline", prescan=pre, run=r.to_json(), data=r.data)
        assert r.rc == 0, f"exit {r.rc}: {r.stderr[-2000:]}"
        outs = r.data["outcomes"]
        assert [o["kind"] for o in outs] == ["exchanged"] * len(batch), outs
        outs_all += outs
        gt = r.data["timings"]["guests"][str(g.domid)]
        ps = gt["prescan"]
        assert ps["path"] == ("prescan" if pre and supported else "full"), ps
        if pre and not supported:
            assert ps["fallback"] == "log-dirty could not be enabled (EOPNOTSUPP)", ps
        if pre and supported:
            assert ps["dirty_tables"] >= 0 and ps["tables"] > 0 and ps["running_scan_s"] > 0, ps
        rows.append({"prescan": pre, "pages": gt["pages"], "suspended_s": gt["suspended_s"],
                     "toolstack_s": gt["toolstack_s"], "survey_s": gt["survey_s"],
                     "suspend_s": gt["suspend_s"], "resume_s": gt["resume_s"],
                     "suspended_per_page_s": gt["suspended_s"] / gt["pages"],
                     "toolstack_per_page_s": gt["toolstack_s"] / gt["pages"], "stats": ps})
        hb = g.wait_heartbeats(1, after=mark, timeout=60)
        assert hb, f"memtest silent after batch {k // PER_SUSPEND}: {g.tail()}"
    end_mark = g.mark()
    hb = g.wait_heartbeats(2, after=end_mark, timeout=90)
    assert len(hb) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in hb), hb
    assert g.bad_lines(start_mark) == []
    table2 = p2m(xen, g.domid)
    for (pfn, old), o in zip(targets, outs_all):
        assert o["mfn"] == old and status(xen, old) == S.PG_OFFLINE_STATUS_OFFLINED
        assert int(table2[pfn]) == int(o["new_mfn"])
    # log-dirty was left off: it can be turned on (and off) again
    assert _pv_logdirty(xen, g.domid, rec) == (0 if supported else -E.EOPNOTSUPP)
    on = [r for r in rows if r["prescan"]]
    full = [r for r in rows if not r["prescan"]]
    rec.add("prescan-memtest-result", pv_logdirty=supported, rows=rows,
            suspended_per_page_prescan=[r["suspended_per_page_s"] for r in on],
            suspended_per_page_full=[r["suspended_per_page_s"] for r in full],
            toolstack_per_page_prescan=[r["toolstack_per_page_s"] for r in on],
            toolstack_per_page_full=[r["toolstack_per_page_s"] for r in full],
            console_tail=g.tail(6))
