"""The simulated machine's memory errors: DRAM address map, the bank records, Xen's
machine-check handler for memory errors (mcaction.c ``mc_memerr_dhandler``), Xen's
``badpage=`` parser (page_alloc.c ``init_boot_pages``) and a boot honouring it, and the
field-data error model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from xenpage.abi import mca as A
from xenpage.abi import mm
from xenpage.abi import sysctl as S
from xenpage.abi.xen import SHUTDOWN_crash
from xenpage.backends.sim import field as F
from xenpage.backends.sim import ras as sim_ras
from xenpage.backends.sim import DefaultHostSpec, SimHypervisor, build_host
from xenpage.hypervisor import invariants, mce
from xenpage.ras.sources import decode_i10nm

SPEC = DefaultHostSpec(mem_mib=256, dom0_mib=64, pv_guests=(("pv1", 16),), hvm_guests=(("hvm1", 16),), pvh_guests=())


@pytest.fixture(scope="module")
def geom():
    return mce.DramGeometry(max_page=0x7FFE0)


@given(mfn=st.integers(0, 0x7FFDF), off=st.integers(0, 4095))
def test_geometry_roundtrip(geom, mfn, off):
    loc = geom.decode((mfn << 12) | off)
    assert geom.encode(loc.socket, loc.channel, loc.rank, loc.bankgroup, loc.bank, loc.row,
                       loc.column // 512) == mfn
    assert mfn in geom.row_mfns(loc)
    d = geom.decode_mfns(np.array([mfn]))
    assert (int(d["row"][0]), int(d["rank"][0]), int(d["channel"][0])) == (loc.row, loc.rank, loc.channel)
    assert loc.dimm == loc.rank // geom.ranks


def test_geometry_shape(geom):
    # a DRAM row is 8 KiB: two frames of one channel; four DIMMs of equal size
    loc = geom.decode(0x3F100 << 12)
    rows = geom.row_mfns(loc)
    assert len(rows) == 2 and len({geom.decode(m << 12).channel for m in rows}) == 1
    per = np.bincount(geom.decode_mfns(np.arange(0x7FFE0))["dimm_id"])
    assert per.size == 4 and per.max() - per.min() <= 64


@given(mfn=st.integers(0x100, 0x7FF00))
def test_misc_encodes_what_mcelog_decodes(geom, mfn):
    loc = geom.decode(mfn << 12)
    rec = A.McRecord(status=A.MCI_STATUS_VAL | A.MCI_STATUS_MISCV | A.MCI_STATUS_ADDRV
                     | A.mcacod_memory(A.MCACOD_MEM_READ, loc.channel % 3),
                     misc=geom.misc(loc), bank=geom.mc_bank(loc.channel), cpuvendor="Intel",
                     cpufamily=6, cpumodel=0x6A)
    decode_i10nm(rec)
    assert (rec.row, rec.dram_bank, rec.bankgroup, rec.rank, rec.channel) == (
        loc.row, loc.bank, loc.bankgroup, loc.rank, loc.channel)
    assert rec.column == loc.column & ~3


def frames(host):
    st_ = (host.ft.count_info.copy() >> np.uint64(mm.PGC_state_shift)) & np.uint64(3)
    free = int(np.flatnonzero(st_ == np.uint64(mm.STATE_FREE))[500])
    g = host.guests[1]
    return {"free": free, "pv": g.mfn(g.user_pages("private")[0]),
            "dom0": int(host.owned_frames(0)[300]), "hvm": int(host.owned_frames(2)[20]),
            "xenheap": host.xenheap_internal[3], "xen": host.xen_image[0] + 5}


def test_corrected_error_changes_nothing_in_xen():
    host = build_host(SPEC)
    hv = SimHypervisor(host)
    m = frames(host)["pv"]
    before = host.ft.count_info.copy()
    inj = sim_ras.SimMachineCheck(hv).inject(m, count=3, time=100.0)
    assert (host.ft.count_info.copy() == before).all()
    r = inj.record
    assert r.corrected and r.has_addr and r.mfn == m and r.corrected_count == 2 and r.memory
    assert r.bank in (13, 14) and r.misc & A.MCI_MISC_ADDRMODE_MASK == A.MCI_MISC_PHYSMOD
    assert inj.xen.effect == "none"


@pytest.mark.parametrize("kind,effect,state,crashed", [
    ("free", "offlined", mm.STATE_OFFLINED, False),
    ("pv", "crashed", mm.STATE_OFFLINING, True),     # unmmap_broken_page: -EOPNOTSUPP for PV
    ("dom0", "vmce", mm.STATE_OFFLINING, False),     # "always trust dom0's MCE handler"
    ("hvm", "vmce", mm.STATE_OFFLINING, False),      # HAP: p2m_ram_broken + vMCE
    ("xenheap", "xen", mm.STATE_OFFLINING, False),
])
def test_uncorrected_error_runs_xens_handler(kind, effect, state, crashed):
    host = build_host(SPEC)
    hv = SimHypervisor(host)
    m = frames(host)[kind]
    inj = sim_ras.SimMachineCheck(hv).inject(m, uncorrected=True, time=100.0)
    assert inj.record.uncorrected and inj.record.status & A.MCI_STATUS_S
    assert inj.xen.effect == effect
    assert host.ft.state(m) == state
    assert host.ft.count_info[m] & np.uint64(mm.PGC_broken)
    d1 = host.domains[1]
    assert (d1.is_shutting_down and d1.shutdown_code == SHUTDOWN_crash) == crashed
    problems = invariants.check(host)
    if kind == "free":
        # Xen 4.17's own offline of a free frame inside a buddy misaligns the pieces after
        # it (reserve_offlined_page); no toolstack stands between a machine check and that
        assert problems and all("misaligned" in p for p in problems) and host.heap.misaligned
    else:
        assert problems == []


def test_uncorrected_on_xen_image_fails_to_offline():
    host = build_host(SPEC)
    hv = SimHypervisor(host)
    inj = sim_ras.SimMachineCheck(hv).inject(frames(host)["xen"], uncorrected=True)
    assert inj.xen.effect == "failed" and inj.xen.rc == -1
    assert any("Failed to offline page" in l for l in host.log)


def test_second_uncorrected_on_owned_broken_frame_is_again():
    host = build_host(SPEC)
    hv = SimHypervisor(host)
    mc = sim_ras.SimMachineCheck(hv)
    m = frames(host)["hvm"]
    assert mc.inject(m, uncorrected=True).xen.effect == "vmce"
    act = mc.inject(m, uncorrected=True).xen
    assert act.effect == "again" and act.status == S.PG_OFFLINE_AGAIN
    assert host.domains[2].shutdown_code == SHUTDOWN_crash   # offline_page crashed the owner


def test_errors_only_in_ram():
    host = build_host(SPEC)
    with pytest.raises(ValueError):
        sim_ras.SimMachineCheck(SimHypervisor(host)).inject(0xA0)


def test_hard_offline_is_the_mce_path():
    host = build_host(SPEC)
    hv = SimHypervisor(host)
    res = sim_ras.hard_offline(hv, frames(host)["pv"])
    assert res["effect"] == "crashed" and res["owner"] == 1 and hv.dirty


# -- badpage= ---------------------------------------------------------------------------------

@pytest.mark.parametrize("opt,ranges", [
    ("0x3f100", [(0x3F100, 0x3F100)]),
    ("0x3f100,0x3f200-0x3f203", [(0x3F100, 0x3F100), (0x3F200, 0x3F203)]),
    ("16", [(16, 16)]),                       # decimal
    ("010", [(8, 8)]),                        # octal
    ("3f100", []),                            # no 0x: decimal "3", then 'f' stops the list
    ("0x10-0x5", [(0x10, 0x10)]),             # end < start: start alone
    ("0x10,,0x20", [(0x10, 0x10), (0, 0), (0x20, 0x20)]),   # an empty item is frame 0
    ("0x10,0x20", [(0x10, 0x10), (0x20, 0x20)]),
    ("0x10 0x20", []),                        # a blank stops the list before the item
    ("0xg", []),
    ("0x10,", [(0x10, 0x10)]),
])
def test_parse_badpage_like_xen(opt, ranges):
    assert mce.parse_badpage(opt) == ranges


def test_parse_badpage_keeps_99_characters():
    items = ",".join(f"{0x10000 + i:#x}" for i in range(20))   # 7 chars each + commas
    got = mce.parse_badpage(items)
    cut = items[:99]
    assert len(got) == cut.count(",") + 1
    assert got[-1][0] == int(cut.rsplit(",", 1)[1], 16)        # the last item is truncated


def test_simple_strtoul():
    assert mce.simple_strtoul("0x1fz") == (0x1F, 4)
    assert mce.simple_strtoul("0x") == (0, 1)          # "0" in octal, stops at 'x'
    assert mce.simple_strtoul("089") == (0, 1)         # octal: 8 is not a digit
    assert mce.simple_strtoul("42,") == (42, 2)


def test_boot_without_badpage_is_build_host():
    a, b = build_host(SPEC), sim_ras.boot(SPEC)
    assert (a.ft.count_info.copy() == b.ft.count_info.copy()).all() and (a.ft.owner1 == b.ft.owner1).all()
    assert a.heap.to_state() == b.heap.to_state()


def test_boot_with_badpage_withholds_frames():
    h0 = build_host(SPEC)
    pv = frames(h0)["pv"]
    free = frames(h0)["free"]
    host = sim_ras.boot(SPEC, badpage=f"{pv:#x},{free:#x}-{free + 2:#x}")
    bad = [pv, free, free + 1, free + 2]
    assert sorted(host.withheld) == sorted(bad)
    hv = SimHypervisor(host)
    for m in bad:
        assert host.ft.owner(m) is None and host.ft.state(m) == mm.STATE_INUSE
        rc, st_ = hv.page_offline_op(S.sysctl_query_page_offline, m, m)
        assert rc == 0 and st_[0] == 0                      # reads as online
    rc, st_ = hv.page_offline_op(S.sysctl_page_offline, pv, pv)
    assert st_[0] == 0x7FF40408                              # ANONYMOUS|FAILED, DOMID_INVALID
    assert invariants.check(host) == []
    # the PV guest got other memory and works
    assert host.guests[1].verify() == []


def test_reboot_keeps_shape_and_forgets_offlined():
    host = build_host(SPEC)
    hv = SimHypervisor(host)
    m = frames(host)["free"]
    hv.page_offline_op(S.sysctl_page_offline, m, m)
    assert host.ft.state(m) == mm.STATE_OFFLINED
    new = sim_ras.reboot(host)
    assert sim_ras.spec_of(new) == sim_ras.spec_of(host) == sim_ras.spec_of(build_host(SPEC))
    assert new.ft.state(m) == mm.STATE_FREE


def test_restart_domain():
    host = build_host(SPEC)
    hv = SimHypervisor(host)
    m = frames(host)["pv"]
    sim_ras.SimMachineCheck(hv).inject(m, uncorrected=True)
    new = sim_ras.restart_domain(host, 1)
    assert host.ft.state(m) == mm.STATE_OFFLINED           # freed with the domain
    assert host.domains[new].name == "pv1" and host.guests[new].verify() == []
    assert invariants.check(host) == []


# -- the field model --------------------------------------------------------------------------

def test_field_model_trace():
    host = build_host(SPEC)
    tr = F.FieldModel(host, params=F.FieldParams(days=30, median_errors=200), seed=5).generate()
    assert len(tr) > 0
    assert (np.diff(tr.t) >= 0).all() and tr.t.min() >= 0 and tr.t.max() < 30 * 86400
    ram = host.e820.ram_window(0, host.nframes)
    assert ram[tr.mfn].all()
    assert set(np.unique(tr.fault).tolist()) <= {f.id for f in tr.faults}
    dimms = tr.geometry.decode_mfns(tr.mfn)["dimm_id"]
    assert set(np.unique(dimms).tolist()) <= {f.dimm for f in tr.faults}
    assert np.unique(tr.mfn).size < len(tr)          # errors repeat on frames
    again = F.FieldModel(host, params=F.FieldParams(days=30, median_errors=200), seed=5).generate()
    assert (again.t == tr.t).all() and (again.mfn == tr.mfn).all()
    s = tr.summary()
    assert s["errors"] == len(tr) and sum(s["errors_per_dimm"].values()) == len(tr)


def test_field_model_concentrates_errors():
    host = build_host(SPEC)
    counts = []
    for seed in range(12):
        tr = F.FieldModel(host, params=F.FieldParams(days=365), seed=seed).generate()
        counts.append(len(tr))
    counts.sort(reverse=True)
    # heavy tail: the top quarter of host-years carries most errors
    assert sum(counts[:3]) > 0.6 * sum(counts)


def test_uncorrected_error_on_hvm_frame_reaches_the_guest():
    """mc_memerr_dhandler for a HAP guest: the gfn turns p2m_ram_broken and the guest's
    kernel, told by the vMCE, takes the page out of use; the rest of its memory is intact
    and it keeps running."""
    from xenpage.abi import hvm as H
    from xenpage.hypervisor import p2m as P2M
    host = build_host(SPEC)
    hv = SimHypervisor(host)
    m = frames(host)["hvm"]
    gfn = host.ft.m2p(m)
    assert sim_ras.SimMachineCheck(hv).inject(m, uncorrected=True).xen.effect == "vmce"
    assert int(P2M.get(host, 2).type[gfn]) == H.p2m_ram_broken
    g = host.guests[2]
    host.run_guests(1.0)
    assert gfn in g.poisoned and g.verify() == []
    assert not host.domains[2].is_shutting_down
    assert invariants.check(host) == []
