"""Retiring a PV guest's page by exchanging it in place (``xenpage.toolstack.exchange``), on
the simulated Xen 4.17 host with the Linux 6.1-like PV guest.

For every kind of page a Linux PV guest has, the frame is marked offline (pending, owned),
the guest is suspended, ``exchange_pages`` runs, and the guest is resumed:

* exchanged (kernel-only data, private / shared / read-only user pages, kernel text mapped
  twice, a P2M frame, a free-pool page, L1/L2/L3 page-table frames incl. a user L1 and the
  unpinned kernel-image / fixmap tables): the new frame holds the old content, the P2M and
  M2P name it, every entry that mapped the old frame maps the new one with exactly its old
  flags (found by an independent scan of the guest's validated tables, not the tool's), no
  validated table names the old frame any more, the old frame reads offlined, the invariant
  checker is clean, and the guest reads and writes the same data at the same virtual
  addresses with the same permissions, and keeps running its workload;
* a grant-ring mapped by dom0's backend and a granted-but-unmapped buffer stay PENDING
  ("granted", with the grant ref) -- a granted page is never exchanged;
* the xenstore and console rings (foreign-mapped by dom0's daemons) are ROLLED_BACK
  ("referenced-elsewhere"), every touched word bit-identical again;
* L4 tables (vCPU roots and every pgd) and the P2M's frame lists are REFUSED up front.

Refusals (not suspended, dom0, HVM, no such domain, not pending, a frame of another domain,
an M2P entry that does not name the frame back) leave the host bit-identical.  A hypothesis
property exchanges random sets of pending frames of a booted guest in one batch.

Fault injection at every step of the exchange lives in ``test_exchange_faults.py``; the
``mem-offline`` flow and command in ``test_mem_offline.py``.  Both import the helpers below.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenpage.abi import mm
from xenpage.abi import pte as P
from xenpage.abi import sysctl as S
from xenpage.abi import xen as X
from xenpage.backends.sim import DefaultHostSpec, SimHypervisor, build_host
from xenpage.guests import linux_pv as L
from xenpage.hypervisor import invariants, sysctl
from xenpage.hypervisor.frametable import expand_fingerprint
from xenpage.hypervisor.mm import L4_XEN_FIRST, L4_XEN_LAST
from xenpage.toolstack.exchange import exchange_pages
from xenpage.toolstack.outcomes import Kind, Reason

_U = np.uint64
FRAME = P.PTE_FRAME_MASK
NOT_FRAME = ~FRAME & 0xFFFFFFFFFFFFFFFF
OWNED_PENDING = S.PG_OFFLINE_PENDING | S.PG_OFFLINE_OWNED

#: the default host (2 GiB like the lab's box, dom0 1 GiB, a 96 MiB Linux PV guest d1, an
#: HVM guest d2)
DEFAULT = DefaultHostSpec()
#: a small host for sweeps and properties: a 32 MiB Linux PV guest d1 and an HVM guest d2
SMALL = DefaultHostSpec(mem_mib=256, dom0_mib=64, pv_guests=(("pv", 32),), hvm_guests=(("hvm", 8),), pvh_guests=())

VMALLOC_BASE = 0xFFFF000000000000 | (L.VMALLOC_L4 << 39)
KTEXT_BASE = 0xFFFF000000000000 | (L.KERNEL_L4 << 39) | (L.KERNEL_L3 << 30)

_BLOBS: dict = {}


def _blob(spec: DefaultHostSpec) -> bytes:
    key = repr(spec)
    if key not in _BLOBS:
        _BLOBS[key] = pickle.dumps(build_host(spec))
    return _BLOBS[key]


# -- the world of one test: a fresh copy of a booted host -------------------------------------------

@dataclass
class World:
    h: object
    hv: SimHypervisor
    domid: int = 1

    @property
    def g(self) -> L.LinuxPV:
        return self.h.guests[self.domid]

    def mfn(self, pfn: int) -> int:
        return self.g.mfn(int(pfn))

    def mark(self, mfns, expect_owned: bool = True) -> None:
        """Mark frames offline from dom0's vCPU on pCPU 1 (as xenpage does)."""
        for m in mfns:
            rc, stt = sysctl.page_offline_op(self.h, 0, S.sysctl_page_offline, m, m, pcpu=1)
            if expect_owned:
                assert (rc, int(stt[0])) == (0, OWNED_PENDING | (self.domid << 16)), hex(m)

    def suspend(self) -> None:
        assert self.hv.xs_write(f"/local/domain/{self.domid}/control/shutdown", "suspend") == 0
        self.hv.wait(0)
        info = self.hv.domain_info(self.domid)
        assert info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend

    def resume(self) -> None:
        assert self.hv.resume(self.domid) == 0
        self.hv.wait(0)
        assert not self.g.suspended

    def status(self, mfn: int) -> int:
        rc, stt = sysctl.page_offline_op(self.h, 0, S.sysctl_query_page_offline, mfn, mfn, pcpu=1)
        assert rc == 0
        return int(stt[0])


def new_world(spec: DefaultHostSpec = DEFAULT, domid: int = 1, hold_fixed: bool = False) -> World:
    """A fresh copy of the host; ``hold_fixed``: Xen-heap allocations first take the free
    frames of Xen's fixed range, so that no exchange gets one (and is exchanged again)."""
    h = pickle.loads(_blob(spec))
    if hold_fixed:
        from simworld import occupy_freed_fixed_frames
        occupy_freed_fixed_frames(h)
    hv = SimHypervisor(h)
    assert hv.set_vcpu_affinity(0, 0, [1]) == 0  # off pCPU 0: Xen 4.17's PoD-lock hang
    return World(h, hv, domid)


@pytest.fixture
def world() -> World:
    return new_world(DEFAULT)


@pytest.fixture
def small() -> World:
    return new_world(SMALL)


# -- bit-identical snapshots ---------------------------------------------------------------------------

@dataclass
class Snap:
    arrays: dict
    pages: dict
    p2m: np.ndarray
    expect: np.ndarray
    grants: np.ndarray = field(default=None)


def snapshot(w: World) -> Snap:
    """Frame-table arrays, the words of every frame that holds real words (page tables, P2M
    and its lists), the guest's P2M and what the guest expects each page to hold."""
    from xenpage.hypervisor import grant_table
    ft = w.h.ft
    arrays = {f: getattr(ft, f).copy() for f in ("count_info", "type_info", "owner1", "m2p_plus1", "content")}
    return Snap(arrays, {m: p.copy() for m, p in ft.pages.items()},
                np.asarray(w.h.pv_p2m(w.domid)).copy(), w.g.expect.copy(),
                grant_table.entries(w.h, w.domid).copy())


def snap_diff(a: Snap, b: Snap) -> list[str]:
    out = []
    for f, x in a.arrays.items():
        d = np.flatnonzero(x != b.arrays[f])
        if d.size:
            out.append(f"{f} differs at mfns {[hex(i) for i in d[:6].tolist()]}")

    def words(s: Snap, m: int) -> np.ndarray:
        p = s.pages.get(m)
        return p if p is not None else expand_fingerprint(int(s.arrays["content"][m]))
    bad = [m for m in sorted(a.pages.keys() | b.pages.keys()) if not np.array_equal(words(a, m), words(b, m))]
    if bad:
        out.append(f"words of frames {[hex(m) for m in bad[:6]]} differ")
    if not np.array_equal(a.p2m, b.p2m):
        out.append(f"P2M differs at pfns {np.flatnonzero(a.p2m != b.p2m)[:6].tolist()}")
    if not np.array_equal(a.expect, b.expect):
        out.append("the guest's expected content differs")
    if not np.array_equal(a.grants, b.grants):
        out.append("grant table differs")
    return out


# -- an independent oracle: the guest's validated page tables --------------------------------------------

def tables_of(h, domid: int) -> tuple[np.ndarray, np.ndarray]:
    ft = h.ft
    ti = ft.type_info
    lvl = ((ti & _U(mm.PGT_type_mask)) >> _U(61)).astype(np.int64)
    ok = (ft.owner1 == domid + 1) & ((ti & _U(mm.PGT_validated)) != 0) \
        & ((ti & _U(mm.PGT_count_mask)) != 0) & (lvl >= 1) & (lvl <= 4)
    tabs = np.flatnonzero(ok)
    return tabs, lvl[tabs]


def entries_naming(h, domid: int, mfns) -> dict[int, list[tuple[int, int, int, int]]]:
    """{mfn: [(table, index, value, level)]}: present entries of the guest's validated tables
    (Xen's private L4 slots aside) whose frame field names ``mfn``."""
    want = {int(m) for m in mfns}
    out: dict[int, list] = {m: [] for m in want}
    tabs, lvls = tables_of(h, domid)
    for t, lv in zip(tabs.tolist(), lvls.tolist()):
        w = h.ft.read_page(t)
        if lv == 4:
            w[L4_XEN_FIRST:L4_XEN_LAST + 1] = 0
        fr = ((w >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)
        hit = np.flatnonzero(((w & _U(P._PAGE_PRESENT)) != 0) & np.isin(fr, list(want)))
        for i in hit.tolist():
            out[int(fr[i])].append((t, i, int(w[i]), lv))
    return out


def pfinfo(w: World, mfn: int) -> int:
    rc, t = w.hv.page_types(w.domid, np.array([mfn], dtype=np.int64))
    assert rc == 0
    return int(t[0])


# -- the guest's view: what it reads at each virtual address, and with which permissions ----------------

def guest_vas(g: L.LinuxPV, pfns=()) -> list[tuple[int, int]]:
    """(root pfn, va) pairs: every user page of every process through both its pgds, and for
    ``pfns`` their direct-map address (and kernel-image / vmalloc alias where they have one)."""
    out = []
    for pr in g.procs:
        for root in (pr.upgd, pr.kpgd):
            out += [(root, g.user_va(vp)) for vp in sorted(pr.pages)]
    sw = g.tables["swapper"]
    kt0, ktn = g.tables["ktext"]
    p2m = g.tables["p2m"]
    for pf in pfns:
        pf = int(pf)
        out.append((sw, g.direct_va(pf)))
        if kt0 <= pf < kt0 + ktn:
            out.append((sw, KTEXT_BASE + (pf - kt0) * 4096))
        if pf in p2m:
            out.append((sw, VMALLOC_BASE + p2m.index(pf) * 4096))
    return out


def logical_words(g: L.LinuxPV, mfn: int) -> bytes:
    """The 512 words of a frame as the guest means them: in page tables and in the P2M and
    its lists, machine frames of the guest are named by their pseudo-physical number (the
    frame field of a page-table entry naming a moved table changes, what it means does not)."""
    ft = g.host.ft
    w = ft.read_page(mfn)
    pf = ft.m2p(mfn)
    role = int(g.role[pf]) if pf < g.role.size else -1
    mine = lambda fr: (fr < ft.nframes) & (ft.owner1[np.minimum(fr, ft.nframes - 1)] == g.domid + 1)  # noqa: E731
    if role in L.TABLE_ROLES:
        fr = ((w >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)
        sel = ((w & _U(P._PAGE_PRESENT)) != 0) & mine(fr)
        w[sel] = (w[sel] & _U(NOT_FRAME)) | (ft.m2p_array(fr[sel]) << _U(12))
    elif role in (L.P2M, L.P2M_FL, L.P2M_FLL):
        fr = w.astype(np.int64)
        sel = (w < _U(ft.nframes)) & mine(np.where(w < _U(ft.nframes), fr, 0))
        w[sel] = ft.m2p_array(fr[sel])
    return w.tobytes()


def guest_view(g: L.LinuxPV, vas) -> dict:
    """{(root, va): (flags of the leaf entry, the words read there)} -- independent of which
    machine frames hold the pages."""
    m2 = g.p2m()
    out = {}
    for root, va in vas:
        r = g.walk(int(m2[root]), va)
        out[(root, va)] = None if r is None else (r[1] & NOT_FRAME, logical_words(g, r[0]))
    return out


# -- the page kinds of a Linux PV guest --------------------------------------------------------------------

def _nth(seq, i):
    return int(list(seq)[i])


#: name -> (pfn selector, expected kind, expected reason)
KINDS = {
    "kernel-data": (lambda g: _nth(g.kernel_only_pages(), 17), Kind.EXCHANGED, Reason.NONE),
    "user-private": (lambda g: _nth(g.user_pages("private"), 5), Kind.EXCHANGED, Reason.NONE),
    "user-shared": (lambda g: _nth(g.user_pages("shared"), 1), Kind.EXCHANGED, Reason.NONE),
    "user-ro": (lambda g: _nth(g.user_pages("ro"), 2), Kind.EXCHANGED, Reason.NONE),
    "kernel-text": (lambda g: _nth(g.pfns_of(L.KTEXT), 7), Kind.EXCHANGED, Reason.NONE),
    "free-pool": (lambda g: g.free[3], Kind.EXCHANGED, Reason.NONE),
    "p2m": (lambda g: g.tables["p2m"][1], Kind.EXCHANGED, Reason.NONE),
    "direct-l1": (lambda g: g.tables["direct_l1"][3], Kind.EXCHANGED, Reason.NONE),
    "user-l1": (lambda g: g.procs[1].ul1[0], Kind.EXCHANGED, Reason.NONE),
    "vmalloc-l1": (lambda g: g.tables["vmalloc_l1"][0], Kind.EXCHANGED, Reason.NONE),
    "kernel-image-l1": (lambda g: g.tables["kernel_l1"][0], Kind.EXCHANGED, Reason.NONE),
    "fixmap-l1": (lambda g: g.tables["fixmap_l1"][0], Kind.EXCHANGED, Reason.NONE),
    "direct-l2": (lambda g: g.tables["direct_l2"][0], Kind.EXCHANGED, Reason.NONE),
    "user-l2": (lambda g: g.procs[0].ul2, Kind.EXCHANGED, Reason.NONE),
    "kernel-l2": (lambda g: g.tables["kernel_l2"], Kind.EXCHANGED, Reason.NONE),
    "fixmap-l2": (lambda g: g.tables["fixmap_l2"], Kind.EXCHANGED, Reason.NONE),
    "direct-l3": (lambda g: g.tables["direct_l3"][0], Kind.EXCHANGED, Reason.NONE),
    "user-l3": (lambda g: g.procs[2].ul3, Kind.EXCHANGED, Reason.NONE),
    "kernel-l3": (lambda g: g.tables["kernel_l3"], Kind.EXCHANGED, Reason.NONE),
    "vsyscall-l3": (lambda g: g.tables["vsyscall_l3"], Kind.EXCHANGED, Reason.NONE),
    "grant-ring-mapped-by-dom0": (lambda g: g.rings[0]["pfn"], Kind.PENDING, Reason.GRANTED),
    "granted-unmapped": (lambda g: g.granted[1]["pfn"], Kind.PENDING, Reason.GRANTED),
    "xenstore-ring": (lambda g: g.daemon_maps[0]["pfn"], Kind.ROLLED_BACK, Reason.REFERENCED),
    "console-ring": (lambda g: g.daemon_maps[1]["pfn"], Kind.ROLLED_BACK, Reason.REFERENCED),
    "l4-cr3": (lambda g: g.procs[0].kpgd, Kind.REFUSED, Reason.CR3_ROOT),
    "l4-user-cr3": (lambda g: g.procs[0].upgd, Kind.REFUSED, Reason.CR3_ROOT),
    "l4-pgd": (lambda g: g.procs[2].kpgd, Kind.REFUSED, Reason.CR3_ROOT),
    "l4-swapper": (lambda g: g.tables["swapper"], Kind.REFUSED, Reason.CR3_ROOT),
    "p2m-frame-list": (lambda g: g.tables["fl"][0], Kind.REFUSED, Reason.P2M_FRAME),
    "p2m-frame-list-list": (lambda g: g.tables["fll"], Kind.REFUSED, Reason.P2M_FRAME),
}
EXCHANGEABLE = [k for k, v in KINDS.items() if v[1] == Kind.EXCHANGED]
NOT_EXCHANGEABLE = [k for k, v in KINDS.items() if v[1] != Kind.EXCHANGED]


@dataclass
class Before:
    """What a test needs to know about targets before the exchange."""

    pfns: list[int]
    mfns: list[int]
    refs: dict
    content: dict
    types: dict
    vas: list
    view: dict
    snap: Snap
    #: the guest's view while it still ran (a guest may change its own tables around a
    #: suspend -- e.g. unmap its grant frames and shared_info -- and undo that on resume)
    view0: dict | None = None


def before(w: World, pfns) -> Before:
    pfns = [int(p) for p in pfns]
    mfns = [w.mfn(p) for p in pfns]
    vas = guest_vas(w.g, pfns)
    return Before(pfns, mfns, entries_naming(w.h, w.domid, mfns),
                  {m: w.h.ft.read_page(m) for m in mfns}, {m: pfinfo(w, m) for m in mfns},
                  vas, guest_view(w.g, vas), snapshot(w))


def prepare(w: World, pfns) -> Before:
    """What the guest sees while running; mark the frames, suspend the guest; then what the
    toolstack will find (the state a rollback must return to)."""
    pfns = [int(p) for p in pfns]
    vas = guest_vas(w.g, pfns)
    view0 = guest_view(w.g, vas)
    w.mark([w.mfn(p) for p in pfns])
    w.suspend()
    b = before(w, pfns)
    b.view0 = view0
    return b


def assert_exchanged(w: World, b: Before, outs, check_view: bool = True) -> None:
    """Everything an exchanged frame must satisfy (the guest is still suspended)."""
    p2m = np.asarray(w.h.pv_p2m(w.domid)).astype(np.int64)
    ft = w.h.ft
    newof = {}
    for pf, old, o in zip(b.pfns, b.mfns, outs):
        assert o.kind == Kind.EXCHANGED, (hex(old), o)
        new = o.new_mfn
        newof[old] = new
        assert o.gpfn == pf and new != old and int(p2m[pf]) == new
        assert ft.m2p(new) == pf and ft.m2p(old) == X.INVALID_M2P_ENTRY
        assert ft.owner(new) == w.domid and ft.owner(old) is None
        # the old frame reads offlined
        assert ft.state(old) == mm.STATE_OFFLINED and old in w.h.heap.offlined_list
        assert w.status(old) == S.PG_OFFLINE_STATUS_OFFLINED
        assert o.status == S.PG_OFFLINE_STATUS_OFFLINED and o.extra["offlined"]
        # same type (level and pin) as before
        assert pfinfo(w, new) == b.types[old]
        assert o.ptes == len(b.refs[old])
    for old, new in newof.items():
        # same content: the new frame holds what the old one held (page-table words name the
        # new homes of frames that moved in the same batch)
        want = b.content[old]
        if int(ft.type_info[new] & _U(mm.PGT_type_mask)) in (mm.PGT_l1_page_table, mm.PGT_l2_page_table,
                                                              mm.PGT_l3_page_table):
            fr = ((want >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)
            pres = (want & _U(P._PAGE_PRESENT)) != 0
            want = want.copy()
            for o2, n2 in newof.items():
                sel = pres & (fr == o2)
                want[sel] = (want[sel] & _U(NOT_FRAME)) | _U(n2 << 12)
        elif int(w.g.role[ft.m2p(new)]) in (L.P2M, L.P2M_FL, L.P2M_FLL):
            # a P2M frame may hold its own entry (and those of other moved frames)
            want = want.copy()
            for o2, n2 in newof.items():
                want[want == _U(o2)] = _U(n2)
        assert np.array_equal(ft.read_page(new), want), f"content of {old:#x} -> {new:#x}"
        # every entry that mapped the old frame maps the new one, flags unchanged, in the
        # table's (possibly new) home
        for t, i, v, _ in b.refs[old]:
            got = int(ft.read_page(newof.get(t, t))[i])
            assert got & NOT_FRAME == v & NOT_FRAME, (hex(t), i, P.flag_names(v), P.flag_names(got))
            assert P.pte_frame(got) == new
    # nothing in the guest's validated tables names an old frame
    left = entries_naming(w.h, w.domid, list(newof))
    assert all(not v for v in left.values()), {hex(k): v[:3] for k, v in left.items() if v}
    assert invariants.check(w.h) == []
    if check_view:
        assert guest_view(w.g, b.vas) == b.view


def exchange_one(w: World, pfn: int):
    b = prepare(w, [pfn])
    outs = exchange_pages(w.hv, w.domid, b.mfns)
    assert len(outs) == 1 and outs[0].mfn == b.mfns[0]
    return b, outs[0]


# -- every kind of page ---------------------------------------------------------------------------------

def test_the_guest_has_every_kind_of_page(world):
    """The selectors pick distinct frames, each of the kind its name says."""
    g = world.g
    picks = {k: v[0](g) for k, v in KINDS.items()}
    assert len(set(picks.values())) == len(picks)
    roles = {k: L.ROLE_NAMES[int(g.role[p])] for k, p in picks.items()}
    assert roles["kernel-text"] == "kernel-text" and roles["p2m"] == "p2m"
    assert {roles[k] for k in KINDS if k.endswith("-l1")} == {"L1"}
    assert {roles[k] for k in KINDS if k.endswith("-l2")} == {"L2"}
    assert {roles[k] for k in KINDS if k.endswith("-l3")} == {"L3"}
    assert {roles[k] for k in KINDS if k.startswith("l4-")} == {"L4"}
    # kernel text is mapped twice (direct map + kernel image), a shared user page by two
    # processes and the direct map, a read-only page by three processes
    ms = [world.mfn(picks[k]) for k in ("kernel-text", "user-shared", "user-ro")]
    refs = entries_naming(world.h, 1, ms)
    assert [len(refs[m]) for m in ms] == [2, 3, 4]
    lp = world.h.domains[1]
    assert world.mfn(picks["l4-cr3"]) in lp.guest_table
    assert world.mfn(picks["l4-user-cr3"]) in lp.guest_table_user


@pytest.mark.parametrize("kind", EXCHANGEABLE)
def test_exchange_each_kind_of_page(world, kind):
    w = world
    sel, _, _ = KINDS[kind]
    pfn = sel(w.g)
    b, o = exchange_one(w, pfn)
    assert o.reason == Reason.NONE and o.errno == 0
    assert o.extra["toolstack_s"] > 0 and o.extra["level"] == (b.types[b.mfns[0]] >> 28) & 7
    assert_exchanged(w, b, [o])
    w.resume()
    assert w.g.verify() == []
    # the guest reads the same data at the same addresses with the same permissions ...
    assert guest_view(w.g, b.vas) == b.view0
    # ... writes through them (user pages: through the process's own page tables) ...
    for pr in w.g.procs:
        for vp, (pf, fl) in pr.pages.items():
            if pf == pfn and fl & P._PAGE_RW:
                w.g._proc_write(pr, vp, 0x1234_5678_9ABC + vp)
                assert w.h.ft.content[o.new_mfn] == 0x1234_5678_9ABC + vp
    assert w.g.faults == []
    # ... and keeps running
    w.g.step(300)
    assert w.g.verify() == [] and invariants.check(w.h) == []


@pytest.mark.parametrize("kind", NOT_EXCHANGEABLE)
def test_pages_that_are_not_exchanged_leave_everything_bit_identical(world, kind):
    w = world
    sel, kind_want, reason = KINDS[kind]
    pfn = sel(w.g)
    b, o = exchange_one(w, pfn)
    m = b.mfns[0]
    assert (o.kind, o.reason) == (kind_want, reason), o
    assert o.new_mfn is None
    assert snap_diff(b.snap, snapshot(w)) == []
    assert w.status(m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
    assert invariants.check(w.h) == []
    if kind_want == Kind.PENDING:  # granted: the grant ref is named
        ref = next(r["ref"] for r in w.g.rings + w.g.granted if r["pfn"] == pfn)
        assert f"(grant ref {ref})" in o.detail and ref in o.extra["grant_refs"]
        assert o.ptes == 0  # nothing was touched
    if kind_want == Kind.ROLLED_BACK:
        assert o.errno == 22 and o.ptes == len(b.refs[m]) >= 1  # cleared, then restored
    w.resume()
    assert w.g.verify() == []
    assert guest_view(w.g, b.vas) == b.view0
    w.g.step(100)
    assert w.g.verify() == [] and invariants.check(w.h) == []


def test_a_granted_page_is_never_exchanged_even_when_dom0_unmaps_it(world):
    """The grant check reads the grant table, not the mappings: a live grant entry keeps the
    frame pending even with no mapping at all (dom0's backend unmapped the ring)."""
    w = world
    ring = w.g.rings[1]
    h0 = w.h.hypercalls(0)
    from xenpage.abi import grant as G
    assert h0.grant_unmap(ring["handle"]) == G.GNTST_okay
    m = w.mfn(ring["pfn"])
    w.mark([m])
    w.suspend()
    s = snapshot(w)
    (o,) = exchange_pages(w.hv, 1, [m])
    assert (o.kind, o.reason) == (Kind.PENDING, Reason.GRANTED) and f"grant ref {ring['ref']}" in o.detail
    assert snap_diff(s, snapshot(w)) == []


# -- refusals ---------------------------------------------------------------------------------------------------

def test_refused_unless_suspended(world):
    w = world
    m = w.mfn(w.g.kernel_only_pages()[3])
    w.mark([m])
    s = snapshot(w)
    (o,) = exchange_pages(w.hv, 1, [m])
    assert (o.kind, o.reason) == (Kind.REFUSED, Reason.NOT_SUSPENDED)
    assert snap_diff(s, snapshot(w)) == [] and w.g.suspends == 0
    # paused is not suspended either
    assert w.hv.pause(1) == 0
    (o,) = exchange_pages(w.hv, 1, [m])
    assert (o.kind, o.reason) == (Kind.REFUSED, Reason.NOT_SUSPENDED)
    assert w.hv.unpause(1) == 0
    assert snap_diff(s, snapshot(w)) == []


def test_refused_for_dom0_hvm_system_and_missing_domains(world):
    w = world
    d0 = int(w.h.owned_frames(0)[len(w.h.owned_frames(0)) // 2])
    hvm = int(w.h.owned_frames(2)[100])
    assert w.h.domains[2].hvm
    for m, d in ((d0, 0), (hvm, 2)):
        rc, stt = sysctl.page_offline_op(w.h, 0, S.sysctl_page_offline, m, m, pcpu=1)
        assert (rc, int(stt[0])) == (0, OWNED_PENDING | (d << 16))
    w.suspend()
    s = snapshot(w)
    assert [(o.kind, o.reason) for o in exchange_pages(w.hv, 0, [d0])] == [(Kind.REFUSED, Reason.DOM0)]
    assert [(o.kind, o.reason) for o in exchange_pages(w.hv, 2, [hvm])] == [(Kind.REFUSED, Reason.HVM)]
    assert [(o.kind, o.reason) for o in exchange_pages(w.hv, 77, [hvm])] == [(Kind.REFUSED, Reason.NO_DOMAIN)]
    assert exchange_pages(w.hv, X.DOMID_XEN, [hvm])[0].kind == Kind.REFUSED
    assert snap_diff(s, snapshot(w)) == []
    assert w.status(d0) == w.status(hvm) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING


def test_refused_when_not_offline_pending(world):
    w = world
    online = w.mfn(w.g.kernel_only_pages()[4])
    done = w.mfn(w.g.kernel_only_pages()[5])
    w.mark([done])
    w.suspend()
    assert exchange_pages(w.hv, 1, [done])[0].kind == Kind.EXCHANGED
    s = snapshot(w)
    o1, o2 = exchange_pages(w.hv, 1, [online, done])
    assert (o1.kind, o1.reason) == (Kind.REFUSED, Reason.NOT_PENDING) and "online" in o1.detail
    assert (o2.kind, o2.reason) == (Kind.REFUSED, Reason.NOT_PENDING) and "offlined" in o2.detail
    assert snap_diff(s, snapshot(w)) == []
    # an MFN beyond the frame table, and one that does not even fit the sysctl's 32-bit field
    for m in (w.h.nframes + 5, 1 << 33):
        (o,) = exchange_pages(w.hv, 1, [m])
        assert o.kind == Kind.REFUSED
    assert snap_diff(s, snapshot(w)) == []


def test_refused_for_a_frame_of_another_domain(world):
    """Asked to exchange dom0's or the HVM guest's pending frame as if it were d1's: the M2P
    names a GPFN whose entry in d1's P2M is another frame."""
    w = world
    d0 = int(w.h.owned_frames(0)[1000])
    hvm = int(w.h.owned_frames(2)[50])
    for m in (d0, hvm):
        sysctl.page_offline_op(w.h, 0, S.sysctl_page_offline, m, m, pcpu=1)
    w.suspend()
    s = snapshot(w)
    outs = exchange_pages(w.hv, 1, [d0, hvm])
    assert [(o.kind, o.reason) for o in outs] == [(Kind.REFUSED, Reason.M2P_MISMATCH)] * 2
    assert snap_diff(s, snapshot(w)) == []
    assert invariants.check(w.h) == []


def test_refused_when_the_m2p_does_not_name_the_frame_back(world):
    """The guest rewrote the M2P entry of one of its frames (MMU_MACHPHYS_UPDATE) to another
    GPFN: M2P and P2M disagree, and the frame is left alone."""
    w = world
    pf, other = w.g.kernel_only_pages()[6], w.g.kernel_only_pages()[7]
    m = w.mfn(pf)
    rc, _ = w.g.hc.mmu_update(np.array([[(m << 12) | X.MMU_MACHPHYS_UPDATE, other]], dtype=np.uint64))
    assert rc == 0 and w.h.ft.m2p(m) == other
    w.mark([m])
    w.suspend()
    s = snapshot(w)
    (o,) = exchange_pages(w.hv, 1, [m])
    assert (o.kind, o.reason) == (Kind.REFUSED, Reason.M2P_MISMATCH) and f"{other:#x}" in o.detail
    assert snap_diff(s, snapshot(w)) == []


def test_refusals_do_not_stop_the_rest_of_a_batch(world):
    w = world
    g = w.g
    good = [g.kernel_only_pages()[20], g.user_pages("private")[9]]
    ring, l4 = g.rings[0]["pfn"], g.procs[1].upgd
    online = g.kernel_only_pages()[21]
    pfns = [good[0], ring, l4, good[1]]
    b = prepare(w, pfns)
    outs = exchange_pages(w.hv, 1, b.mfns[:2] + [w.mfn(online)] + b.mfns[2:])
    assert [o.kind for o in outs] == [Kind.EXCHANGED, Kind.PENDING, Kind.REFUSED, Kind.REFUSED, Kind.EXCHANGED]
    sub = Before([good[0], good[1]], [b.mfns[0], b.mfns[3]], b.refs, b.content, b.types, b.vas, b.view, b.snap)
    assert_exchanged(w, sub, [outs[0], outs[4]])
    w.resume()
    assert w.g.verify() == []


# -- batches -------------------------------------------------------------------------------------------------------

def test_every_exchangeable_kind_in_one_batch():
    """One call for all of them: data frames share one scan, page-table frames follow one by
    one (upper levels last); every frame ends exchanged and the guest is whole."""
    # (Xen-heap allocations hold the free frames of its fixed range: one exchange per page)
    w = new_world(DEFAULT, hold_fixed=True)
    pfns = [KINDS[k][0](w.g) for k in EXCHANGEABLE]
    b = prepare(w, pfns)
    steps = []
    outs = exchange_pages(w.hv, 1, b.mfns, hook=lambda step, **kw: steps.append(step))
    assert [o.mfn for o in outs] == b.mfns
    assert_exchanged(w, b, outs)
    n_tables = sum(1 for k in EXCHANGEABLE if k[-3:] in ("-l1", "-l2", "-l3"))
    assert not [o for o in outs if "moved_off_fixed" in o.extra]
    assert steps.count("scanned") == 1 + n_tables
    assert steps.count("exchanged") == 1 + n_tables
    w.resume()
    assert w.g.verify() == []
    w.g.step(300)
    assert w.g.verify() == [] and invariants.check(w.h) == []


def test_a_batch_of_data_pages_is_one_scan_and_one_exchange_call():
    # (Xen-heap allocations hold the free frames of its fixed range: one exchange per page)
    w = new_world(DEFAULT, hold_fixed=True)
    pfns = w.g.kernel_only_pages()[100:164] + w.g.user_pages("private")[:16] + w.g.user_pages("shared")
    b = prepare(w, pfns)
    calls = []

    class Counting(SimHypervisor):
        def memory_exchange(self, domid, ins, outs):
            calls.append(("memory_exchange", len(ins)))
            return super().memory_exchange(domid, ins, outs)

        def mmu_update(self, reqs, fd):
            calls.append(("mmu_update", len(reqs)))
            return super().mmu_update(reqs, fd)

    hv = Counting(w.h)
    steps = []
    outs = exchange_pages(hv, 1, b.mfns, hook=lambda step, **kw: steps.append(step))
    assert steps.count("scanned") == 1
    assert [c for c in calls if c[0] == "memory_exchange"] == [("memory_exchange", len(pfns))]
    nrefs = sum(len(v) for v in b.refs.values())
    # one batch clears every entry, one re-points them all (plus the M2P check)
    assert calls[0] == ("mmu_update", nrefs) and ("mmu_update", nrefs) in calls[2:]
    assert_exchanged(w, b, outs)
    assert len({o.new_mfn for o in outs}) == len(pfns)
    w.resume()
    assert w.g.verify() == []


def test_duplicate_mfns_in_a_batch(world):
    w = world
    m = w.mfn(w.g.kernel_only_pages()[30])
    w.mark([m])
    w.suspend()
    o1, o2 = exchange_pages(w.hv, 1, [m, m])
    assert o1.kind == o2.kind == Kind.EXCHANGED and o1.new_mfn == o2.new_mfn
    assert invariants.check(w.h) == []
    w.resume()
    assert w.g.verify() == []


def test_a_page_table_and_the_pages_it_maps_in_one_batch(world):
    """A user L1, its L2 and L3 and pages the L1 maps: each moves, the tables' words name the
    new homes, the process still sees its memory."""
    w = world
    pr = w.g.procs[1]
    mapped = sorted({pf for pf, _ in pr.pages.values()})[:6]
    pfns = [pr.ul1[0], pr.ul2, pr.ul3] + mapped
    b = prepare(w, pfns)
    outs = exchange_pages(w.hv, 1, b.mfns)
    assert_exchanged(w, b, outs)
    w.resume()
    assert w.g.verify() == []
    w.g.step(200)
    assert w.g.verify() == []


# -- a property: random sets of pending frames, one batch -----------------------------------------------------------



def _prop_world() -> World:
    return new_world(SMALL)


def _pool(g: L.LinuxPV) -> list[int]:
    special = [v[0](g) for v in KINDS.values()]
    special += [r["pfn"] for r in g.rings + g.granted + g.daemon_maps]
    special += g.tables["direct_l1"] + g.tables["p2m"] + g.tables["vmalloc_l1"]
    return sorted(set(int(p) for p in special))


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
          deadline=None)
@given(data=st.data(), warmup=st.integers(0, 40), surveyed=st.booleans())
def test_property_random_pending_frames_in_one_batch(data, warmup, surveyed):
    """``surveyed``: as mem-offline does, the guest is surveyed before it runs ``warmup``
    workload steps (mapping and unmapping pages) and is suspended."""
    from xenpage.toolstack.exchange import load_guest
    w = _prop_world()
    g = w.g
    survey = load_guest(w.hv, 1)[0] if surveyed else None
    n = int(np.asarray(w.h.pv_p2m(1)).size)
    pool = _pool(g)
    pick = st.one_of(st.sampled_from(pool), st.integers(0, n - 1))
    pfns = data.draw(st.lists(pick, min_size=1, max_size=12, unique=True), label="pfns")
    g.step(warmup)
    mfns = [w.mfn(p) for p in pfns]
    w.mark(mfns)
    w.suspend()
    p2m0 = np.asarray(w.h.pv_p2m(1)).copy()
    outs = exchange_pages(w.hv, 1, mfns, survey=survey)
    assert [o.mfn for o in outs] == mfns
    kinds = {o.kind for o in outs}
    assert kinds <= {Kind.EXCHANGED, Kind.PENDING, Kind.REFUSED, Kind.ROLLED_BACK}, outs
    assert invariants.check(w.h) == []
    p2m1 = np.asarray(w.h.pv_p2m(1))
    for pf, m, o in zip(pfns, mfns, outs):
        if o.kind == Kind.EXCHANGED:
            assert int(p2m1[pf]) == o.new_mfn != m and w.status(m) == S.PG_OFFLINE_STATUS_OFFLINED
        else:
            assert p2m1[pf] == p2m0[pf] and w.status(m) == S.PG_OFFLINE_STATUS_OFFLINE_PENDING
        role = int(g.role[pf])
        if role in (L.RING,) or pf in {r["pfn"] for r in g.granted}:
            assert o.kind == Kind.PENDING and o.reason == Reason.GRANTED
        if role == L.L4T:
            assert o.kind == Kind.REFUSED
        if role in (L.DATA, L.KTEXT, L.FREE, L.P2M, L.L1T, L.L2T, L.L3T) and \
                pf not in {r["pfn"] for r in g.granted}:
            assert o.kind == Kind.EXCHANGED, (L.ROLE_NAMES[role], o)
    w.resume()
    assert g.verify() == []
    g.step(50)
    assert g.verify() == [] and invariants.check(w.h) == []


# -- a survey taken while the guest ran (mem-offline types every pfn before suspending it) ------------------

class CountingTypes(SimHypervisor):
    """Counts how many frames getpageframeinfo3 is asked about."""

    def __init__(self, host):
        super().__init__(host)
        self.typed = 0

    def page_types(self, domid, mfns):
        self.typed += len(mfns)
        return super().page_types(domid, mfns)


def test_a_survey_types_only_the_page_tables_under_the_suspend(world):
    """With a survey the suspended guest's frames are not all typed again: only its page
    tables and the targets; the result is the same as with a full view."""
    from xenpage.toolstack.exchange import load_guest
    w = world
    pfns = [KINDS[k][0](w.g) for k in ("kernel-data", "user-shared", "user-l1", "p2m", "direct-l2")]
    survey, err = load_guest(w.hv, 1)
    assert err is None
    b = prepare(w, pfns)
    hv = CountingTypes(w.h)
    outs = exchange_pages(hv, 1, b.mfns, survey=survey)
    assert_exchanged(w, b, outs)
    n = survey.p2m.size
    ntab = survey.table_mfns()[0].size
    # the survey refreshed (tables + targets), and again after each of the 2 table groups
    assert hv.typed <= 3 * (ntab + len(pfns)) + 3 * 2 < n
    w.resume()
    assert w.g.verify() == []


def _guest_makes_an_l1(w: World, maps_pfn: int) -> int:
    """The guest turns a free page into a pinned L1 mapping ``maps_pfn`` (as Linux does:
    zero it, map it read-only, pin it) -- a page table the survey has never seen."""
    g = w.g
    pf = g.free.pop(0)
    m = w.mfn(pf)
    words = np.zeros(512, dtype=np.uint64)
    words[7] = P.make_pte(w.mfn(maps_pfn), L.KERNEL_RO)
    w.h.ft.write_page(m, words)  # the guest writes its own (still writable) page
    l1 = w.mfn(g.tables["direct_l1"][pf // 512])
    rc, _ = g.hc.mmu_update(np.array([[(l1 << 12) | (pf % 512) * 8, P.make_pte(m, L.KERNEL_RO)]], dtype=np.uint64))
    assert rc == 0
    rc, _ = g.hc.mmuext_op([(X.MMUEXT_PIN_L1_TABLE, m)])
    assert rc == 0
    g.role[pf], g.expect[pf], g.kflags[pf] = L.L1T, 0, L.KERNEL_RO  # what the guest now knows
    return pf


def test_a_table_made_after_the_survey_is_found_by_a_second_full_look():
    """The new L1 holds a reference the survey cannot know: XENMEM_exchange refuses the frame,
    it is rolled back, and retried with a full view -- which finds the new entry."""
    from xenpage.toolstack.exchange import load_guest
    # (Xen-heap allocations hold the free frames of its fixed range: one exchange per page)
    w = new_world(DEFAULT, hold_fixed=True)
    target = w.g.kernel_only_pages()[40]
    survey, _ = load_guest(w.hv, 1)
    new_l1 = _guest_makes_an_l1(w, target)
    assert invariants.check(w.h) == [] and w.g.verify() == []
    b = prepare(w, [target])
    assert len(b.refs[b.mfns[0]]) == 2 and w.mfn(new_l1) in [t for t, *_ in b.refs[b.mfns[0]]]
    steps = []
    (o,) = exchange_pages(w.hv, 1, b.mfns, survey=survey, hook=lambda s, **kw: steps.append(s))
    assert steps.count("loaded") == 2 and steps.count("exchanged") == 2
    assert_exchanged(w, b, [o])
    w.resume()
    assert w.g.verify() == []


def test_a_table_dropped_after_the_survey_is_never_written(world):
    """Process 2 exits after the survey: its L1 is unlinked and unpinned (no longer a table,
    its stale entries still name the process's pages).  Refreshed, the survey leaves it out,
    so no "entry" in it is cleared or re-pointed (Xen would write such a frame raw)."""
    from xenpage.toolstack.exchange import load_guest
    w = world
    g = w.g
    pr = g.procs[2]
    target = next(pf for pf, fl in pr.pages.values() if pf in g.user_pages("private"))
    survey, _ = load_guest(w.hv, 1)
    ul1, ul2 = w.mfn(pr.ul1[0]), w.mfn(pr.ul2)
    rc, _ = g.hc.mmu_update(np.array([[(ul2 << 12) | L.USER_BASE_L2 * 8, 0]], dtype=np.uint64))
    assert rc == 0
    assert g.hc.mmuext_op([(X.MMUEXT_UNPIN_TABLE, ul1)])[0] == 0
    pr.pages.clear()
    assert pfinfo(w, ul1) == 0  # NOTAB
    words = w.h.ft.read_page(ul1)
    assert any(P.pte_frame(int(x)) == w.mfn(target) for x in words)
    b = prepare(w, [target])
    assert len(b.refs[b.mfns[0]]) == 1  # the direct map only
    (o,) = exchange_pages(w.hv, 1, b.mfns, survey=survey)
    assert_exchanged(w, b, [o])
    assert np.array_equal(w.h.ft.read_page(ul1), words)  # untouched
    w.resume()
    assert w.g.verify() == []


def test_the_scan_in_small_chunks_finds_the_same_entries(world, monkeypatch):
    """The scan maps the tables SCAN_CHUNK at a time: with tiny chunks (entries found in
    every chunk, L4 rows among them) the result is the same, and a chunk that cannot be
    mapped refuses the batch with nothing changed."""
    import xenpage.toolstack.exchange as XC
    from xenpage.toolstack.faults import FaultPlan, FaultyHypervisor
    monkeypatch.setattr(XC, "SCAN_CHUNK", 5)
    w = world
    pfns = [KINDS[k][0](w.g) for k in ("kernel-data", "user-ro", "kernel-text", "user-l3", "vsyscall-l3")]
    b = prepare(w, pfns)
    view, _ = XC.load_guest(w.hv, 1)
    assert view.table_mfns()[0].size > 10 * XC.SCAN_CHUNK
    rc, refs = XC.scan(w.hv, view, np.array(b.mfns[:3]))
    assert rc == 0 and sorted((r.table, r.index, r.value) for r in refs) == \
        sorted((t, i, v) for m in b.mfns[:3] for t, i, v, _ in b.refs[m])
    s = snapshot(w)
    fh = FaultyHypervisor(w.hv, FaultPlan.fail_at(2, "map_foreign"))  # the scan's second chunk
    outs = exchange_pages(fh, 1, b.mfns[:3], view=view)
    assert {(o.kind, o.reason) for o in outs} == {(Kind.REFUSED, Reason.CLEAR_FAILED)}
    assert snap_diff(s, snapshot(w)) == []
    outs = exchange_pages(w.hv, 1, b.mfns)
    assert_exchanged(w, b, outs)
    w.resume()
    assert w.g.verify() == []


# -- status words of many frames ---------------------------------------------------------------

_STATUS_HOST: list = []


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(picks=st.lists(st.one_of(st.integers(-3, 1 << 19), st.integers(0, 1 << 40),
                                st.integers(0x9F, 0xA2)), max_size=60),
       near=st.lists(st.tuples(st.integers(0, 1 << 19), st.integers(0, 70)), max_size=20))
def test_statuses_of_many_frames_are_each_frames_own(picks, near):
    """The range queries of the exchange's status look-up answer for every frame what a query
    of that frame alone answers (-1 for a frame the sysctl cannot name, a hole asked frame by
    frame), whatever the spacing of the frames: runs within 64 of each other, spans past 1000,
    frames outside any field."""
    from xenpage.toolstack.exchange import _status, _statuses
    if not _STATUS_HOST:
        _STATUS_HOST.append(SimHypervisor(build_host()))
    hv = _STATUS_HOST[0]
    mfns = picks + [a + k * d for a, d in near for k in range(4)]
    got = _statuses(hv, mfns)
    assert set(got) == {int(m) for m in mfns}
    for m in set(mfns):
        want = _status(hv, m) if 0 <= m <= S.MFN_FIELD_MAX else -1
        assert got[m] == want, (m, got[m], want)
