"""The flagship: ``xenpage mem-offline`` retires frames of a running PV guest (the lab's
memtest: 16 MiB filled with a pattern and verified continuously) on real Xen 4.17.

* >= 32 of memtest's frames (pfn -> mfn through the guest's P2M), 8 per command, i.e. 8 per
  suspend; memtest reports no corruption, no moved PFN, and keeps running;
* each old frame reads offlined; P2M[pfn] and M2P[new] name the new frame;
* every page-table entry that mapped an old frame now maps the new one with the same flags
  (the L1 entries are read through foreign maps before and after);
* stock ``xen-hptool mem-offline`` of another memtest frame fails ("No suspend port"), and
  ``xenpage mem-offline`` of that same (now offline-pending) frame succeeds: side by side.
"""

from __future__ import annotations

import numpy as np

from helpers import AD, domid_of, flags, hptool, p2m, pte_refs, status, xenpage
from xenpage.abi import pte as P
from xenpage.abi import sysctl as S
from xenpage.toolstack.pcpu import off_pcpu0

PAGES = 40
PER_SUSPEND = 8


def test_backend_facts(xen, memtest, rec):
    pi = xen.physinfo()
    rc, kind, a = xen._p2m_layout(memtest.domid)
    rec.add("facts", physinfo=pi.__dict__, domains=[d.to_json() for d in xen.domain_list()],
            p2m_layout=kind, max_pfn=a.max_pfn if a else None,
            p2m_vaddr=hex(a.p2m_vaddr) if a else None, guest_width=xen.guest_width(memtest.domid),
            dom0_affinity=[xen.vcpu_affinity(0, v) for v in range(xen.domain_info(0).nr_vcpus)])
    assert rc == 0 and kind in ("linear", "tree")
    # Linux publishes both the 3-level tree and the linear list: the backend reads either
    rc, tree_frames, n = xen.pv_p2m_frames(memtest.domid)
    if a.p2m_cr3:
        rc2, lin = xen._linear_p2m_frames(memtest.domid, a)
        rec.add("p2m-linear-vs-tree", rc=rc2, frames=int(lin.size), equal=bool((lin == tree_frames).all())
                if lin.size == tree_frames.size else False)
        assert rc2 == 0 and (lin == tree_frames).all()
    assert "4.17" in pi.extra["xen_version"]
    assert pi.nr_cpus >= 2, "the lab needs 2 pCPUs to keep offlines off pCPU 0"


def test_owner_names_the_memtest_guest_and_changes_nothing(xen, memtest, rec):
    """``xenpage owner`` on real Xen 4.17: the guest's frames by the M2P and getpageframeinfo3,
    the VGA hole unqueryable; only read-only calls, so every frame is still plainly online."""
    from xenpage.toolstack.owner import frame_owners
    table = p2m(xen, memtest.domid)
    by_line = memtest.pfns()            # {memtest's line index: pfn}
    pfns = [by_line[i] for i in range(64, 68)]
    mfns = [int(table[p]) for p in pfns]
    res = frame_owners(xen, mfns + [0xA0])
    rec.add("owner", frames=[o.to_json() for o in res])
    for o, p in zip(res, pfns):
        assert (o.domid, o.type, o.pfn, o.state) == (memtest.domid, "pv", p, "online")
    assert res[-1].rc < 0 and res[-1].domid is None
    assert all(status(xen, m) == 0 for m in mfns)


def test_mem_offline_retires_memtest_frames(xen, memtest, rec):
    g = memtest
    pfns = g.pfns()
    assert len(pfns) >= 4096, f"memtest printed {len(pfns)} PFN lines"
    table = p2m(xen, g.domid)
    idx = [int(i) for i in np.linspace(64, len(pfns) - 64, PAGES)]
    targets = [(i, pfns[i], int(table[pfns[i]])) for i in idx]
    olds = [m for _, _, m in targets]
    assert len(set(olds)) == PAGES and all(m < xen.max_mfn() for m in olds)
    assert all(status(xen, m) == 0 for m in olds)
    before = pte_refs(xen, g.domid, olds)
    # Xen 4.17 splits a free buddy around an offlined frame without keeping alignment
    # (backends/xen/quirks.py): the old frame only merges into a free buddy when its order-0
    # buddy is free -- record how often the guest itself holds it.
    rc, bt = xen.page_types(g.domid, [m ^ 1 for m in olds])
    buddy_held = int((bt != 0xF0000000).sum()) if rc == 0 else None
    assert all(before[m] for m in olds), "every memtest page is mapped"
    start_mark = g.mark()
    hb_start = g.heartbeats()[-1]
    runs = []
    for k in range(0, PAGES, PER_SUSPEND):
        batch = targets[k:k + PER_SUSPEND]
        mark = g.mark()
        r = xenpage("mem-offline", *[f"{m:x}" for _, _, m in batch], as_json=True)
        rec.add("mem-offline", batch=[{"page": i, "pfn": hex(p), "mfn": hex(m)} for i, p, m in batch],
                run=r.to_json(), data=r.data)
        assert r.rc == 0, f"exit {r.rc}: {r.stderr[-2000:]}"
        assert r.data is not None
        outs = r.data["outcomes"]
        assert [o["kind"] for o in outs] == ["exchanged"] * len(batch), outs
        gt = r.data["timings"]["guests"][str(g.domid)]
        assert gt["pages"] == len(batch)          # one suspend for the whole batch
        runs.append((batch, outs, gt, r))
        hb = g.wait_heartbeats(1, after=mark, timeout=60)
        assert hb, f"memtest silent after batch {k // PER_SUSPEND}: {g.tail()}"
    # memtest keeps running and verifying, with nothing corrupt or moved
    end_mark = g.mark()
    hb = g.wait_heartbeats(2, after=end_mark, timeout=90)
    assert len(hb) >= 2 and hb[-1][0] > hb_start[0]
    assert all(c == 0 and mv == 0 for _, _, c, mv in hb), hb
    assert g.bad_lines(start_mark) == []
    # old frames offlined; P2M and M2P name the new ones; flags kept
    table2 = p2m(xen, g.domid)
    pairs = []
    for batch, outs, gt, r in runs:
        for (i, pfn, old), o in zip(batch, outs):
            assert o["mfn"] == old and o["gpfn"] == pfn
            pairs.append((pfn, old, int(o["new_mfn"])))
    news = [n for _, _, n in pairs]
    assert len(set(news)) == PAGES and not set(news) & set(olds)
    # issue 16: no new frame in Xen's fixed range (KEXEC_RANGE_MA_XEN); those Xen handed out
    # from its freed init region (the heads of its free lists) were exchanged again
    fixed = xen.xen_fixed_range()
    moved = [int(o["extra"]["moved_off_fixed"]) for _, outs, _, _ in runs for o in outs
             if "moved_off_fixed" in o.get("extra", {})]
    rec.add("fixed-range", fixed=[hex(x) for x in fixed] if fixed else None,
            moved_off=[hex(m) for m in moved])
    assert fixed is not None and not [n for n in news if fixed[0] <= n < fixed[1]]
    assert moved and all(fixed[0] <= m < fixed[1] for m in moved), \
        "no new frame came from the freed init region this time"
    after = pte_refs(xen, g.domid, news)
    pte_report = []
    exact = 0
    for pfn, old, new in pairs:
        assert status(xen, old) == S.PG_OFFLINE_STATUS_OFFLINED, f"{old:#x}"
        assert status(xen, new) == 0
        assert int(table2[pfn]) == new, f"P2M[{pfn:#x}] = {int(table2[pfn]):#x}, want {new:#x}"
        assert int(xen.m2p([new])[0]) == pfn, f"M2P[{new:#x}]"
        b = {(r.table, r.index): r.value for r in before[old]}
        a = {(r.table, r.index): r.value for r in after[new]}
        assert set(a) == set(b), f"pfn {pfn:#x}: entries {sorted(b)} before, {sorted(a)} after"
        for key, v0 in b.items():
            v1 = a[key]
            assert P.pte_frame(v0) == old and P.pte_frame(v1) == new
            assert flags(v0) & ~AD == flags(v1) & ~AD, f"{key}: {v0:#x} -> {v1:#x}"
            exact += flags(v0) == flags(v1)
            pte_report.append({"pfn": hex(pfn), "table": hex(key[0]), "index": key[1],
                               "before": hex(v0), "after": hex(v1), "flags": P.flag_names(v1)})
    per_page = [gt["suspended_s"] / gt["pages"] for _, _, gt, _ in runs]
    rec.add("memtest-result", pages=PAGES, old_buddy_held_by_guest=buddy_held, per_suspend=PER_SUSPEND, pairs=[[hex(a) for a in p] for p in pairs],
            ptes=len(pte_report), ptes_exactly_equal=exact, pte_sample=pte_report[:12],
            suspended_s=[gt["suspended_s"] for _, _, gt, _ in runs],
            toolstack_s=[gt["toolstack_s"] for _, _, gt, _ in runs],
            suspend_s=[gt["suspend_s"] for _, _, gt, _ in runs],
            resume_s=[gt["resume_s"] for _, _, gt, _ in runs],
            suspended_s_per_page=per_page, heartbeats_after=hb[-2:], console_tail=g.tail(6))


def test_stock_hptool_fails_where_xenpage_succeeds(xen, memtest, rec):
    """Same frame: stock xen-hptool (dom0 pinned off pCPU 0 by this test) cannot suspend a
    Linux PV guest; xenpage then retires the very frame hptool left offline-pending."""
    g = memtest
    table = p2m(xen, g.domid)
    pfn = g.pfns()[4000]
    mfn = int(table[pfn])
    assert status(xen, mfn) == 0
    mark = g.mark()
    with off_pcpu0(xen):
        stock = hptool("mem-offline", f"{mfn:x}")
    pending = status(xen, mfn)
    ours = xenpage("mem-offline", f"{mfn:x}")
    after = status(xen, mfn)
    rec.add("side-by-side-domu-page", domid=g.domid, pfn=hex(pfn), mfn=hex(mfn), stock=stock.to_json(),
            status_after_stock=hex(pending), xenpage=ours.to_json(), status_after_xenpage=hex(after))
    assert stock.rc == 1
    assert f"DOM{g.domid}: No suspend port, try live migration" in stock.stderr
    assert f"Failed to suspend guest {g.domid} for mfn {mfn:x}" in stock.stderr
    assert pending == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    assert ours.rc == 0, ours.stderr
    assert (f"Memory mfn {mfn:x} offlined successfully, this page is DOM{g.domid} page and being swapped "
            "successfully, current state is [PG_OFFLINE_OFFLINED, PG_OFFLINE_OWNED]") in ours.stdout
    assert after == S.PG_OFFLINE_STATUS_OFFLINED
    hb = g.wait_heartbeats(2, after=mark, timeout=60)
    assert len(hb) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in hb)
    assert g.bad_lines(mark) == []
    assert domid_of(g.name) == g.domid
