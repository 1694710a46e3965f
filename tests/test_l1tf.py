"""Xen 4.17's L1TF check of non-present page-table entries written into PV domains' tables
(issue 16, item 4; hypervisor/l1tf.py): ``pv-l1tf=`` as Xen parses it, the safe/unsafe rule
(``is_l1tf_safe_maddr``), each setting's outcome (nothing / the domain shadowed / crashed, or
a toolstack's hypercall restarted for ever), what upstream's ``xc_exchange_page`` -- which
clears only ``_PAGE_PRESENT`` -- costs, and that xenpage's exchange (entries cleared to 0)
is safe on every setting.

Measured on the lab (tests_xen/test_hang_guard.py, test_l1tf_boot_facts; the boot log of
every lab run, e.g. results/xenpage-xen-*/xl-dmesg.txt): QEMU/TCG's ``-cpu max`` is "CPU
Vendor: AMD, Family 15 (0xf), Model 107", Xen prints no "L1TF: believed ..." line (it does
only for a vulnerable CPU or a pv-l1tf setting) and "PV L1TF shadowing: Dom0 disabled, DomU
disabled": the simulated host's default CPU."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from xenpage.abi import pte as P
from xenpage.abi import sysctl as S
from xenpage.abi import xen as X
from xenpage.backends.sim import SimHypervisor
from xenpage.guests import linux_pv as L
from xenpage.hypervisor import invariants, l1tf
from xenpage.hypervisor.host import Host, HostConfig
from xenpage.hypervisor.mm import ptwr_emulated_update
from xenpage.hypervisor.quirks import HypercallLivelock, Quirks
from xenpage.toolstack.offline import mem_offline, resume_guest, suspend_guest
from xenpage.toolstack.outcomes import Kind
from xenpage.toolstack.upstream import Defects, xc_exchange_page

#: upstream's algorithm with every other defect fixed (the foreigndom fix is the lab's
#: pfdshim): what is left is its clear, which drops only _PAGE_PRESENT
CLEAR_ONLY = Defects(pfd=False, mask=False, out_gpfn=False, repin_index=False)


def world(**q):
    h = Host.boot(HostConfig(mem_bytes=128 << 20, quirks=Quirks(**q)), dom0_pages=32 * 256)
    d = h.create_domain("lin", 8 * 256)
    g = L.LinuxPV.boot(h, d.domid, seed=11)
    hv = SimHypervisor(h)
    hv.set_vcpu_affinity(0, 0, [1])  # offline from pCPU 1 (Xen 4.17's PoD-lock hang)
    return h, g, hv


def l1tf_lines(h):
    return [x for x in h.log if "L1TF" in x]


# -- pv-l1tf= and the rule -----------------------------------------------------------------

@pytest.mark.parametrize("s, want", [
    ("", (True, True)), ("1", (True, True)), ("on", (True, True)), ("0", (False, False)),
    ("no", (False, False)), ("dom0", (True, None)), ("no-domu", (None, False)),
    ("domu=0", (None, False)), ("dom0=1,domu=no", (True, False)), ("0,dom0", (True, False)),
])
def test_parse_pv_l1tf(s, want):
    assert l1tf.parse_pv_l1tf(s) == want


def test_parse_pv_l1tf_rejects_what_xen_rejects():
    with pytest.raises(ValueError):
        l1tf.parse_pv_l1tf("domU")  # names are case-sensitive in parse_boolean


def test_safe_maddr_rule():
    h = Host.boot(HostConfig(mem_bytes=128 << 20))
    # QEMU's E820 ends with the reserved window below 1 TiB; 40 address bits, L1D the same:
    # the top-quarter guess is 3 << 38, the E820 end 1 << 40
    assert l1tf.l1tf_safe_maddr(h) == 1 << 40
    assert l1tf.l1tf_addr_mask(h.quirks) == ((1 << 40) - 1) & ~0xFFF
    ram = P.make_pte(0x3F100, P._PAGE_RW | P._PAGE_ACCESSED)  # a RAM frame, present bit clear
    assert not l1tf.is_l1tf_safe_maddr(h, ram)
    assert l1tf.is_l1tf_safe_maddr(h, 0) and l1tf.is_l1tf_safe_maddr(h, P._PAGE_ACCESSED | P._PAGE_DIRTY)
    # address bits beyond the L1D's width are not looked at: still frame 0x3f100
    assert not l1tf.is_l1tf_safe_maddr(h, ram | (1 << 45))
    # a CPU whose L1D is wider than CPUID (Skylake client: 39 vs 46 bits): anything at or
    # above 2^39 is safe -- Linux's inverted PROT_NONE entries are
    k = Host.boot(HostConfig(mem_bytes=128 << 20, quirks=Quirks(cpu_l1tf=True, paddr_bits=39,
                                                                 l1d_maxphysaddr=46)))
    assert l1tf.l1tf_safe_maddr(k) == 1 << 40  # the E820 window still reaches 1 TiB
    inverted = (~(0x3F100 << 12)) & ((1 << 46) - 1) & ~0xFFF
    assert l1tf.is_l1tf_safe_maddr(k, inverted) and not l1tf.is_l1tf_safe_maddr(k, ram)
    arr = np.array([0, ram, inverted], dtype=np.uint64)
    assert l1tf.is_l1tf_safe_maddr(k, arr).tolist() == [True, False, True]


@pytest.mark.parametrize("cpu, dom0, domu, want", [
    (False, None, None, (False, False)),   # the lab: AMD, both off
    (True, None, None, (False, True)),     # vulnerable: domUs checked, dom0 not
    (True, False, False, (False, False)),  # pv-l1tf=0
    (False, True, True, (True, True)),     # pv-l1tf=1 on any CPU
    (True, True, None, (True, True)),      # pv-l1tf=dom0
])
def test_check_l1tf_per_domain(cpu, dom0, domu, want):
    h = Host.boot(HostConfig(mem_bytes=128 << 20, quirks=Quirks(cpu_l1tf=cpu, pv_l1tf_dom0=dom0,
                                                                 pv_l1tf_domu=domu)))
    pv = h.create_domain("pv", 256)
    hvm = h.create_domain("hvm", 1024, hvm=True)
    assert (l1tf.check_l1tf(h, 0), l1tf.check_l1tf(h, pv.domid)) == want
    assert not l1tf.check_l1tf(h, hvm.domid)  # only PV domains are checked


# -- what each setting does with an unsafe entry -----------------------------------------------

def _guest_l1_slot(g):
    """A present L1 entry of the guest mapping one of its data pages: (table, index, value)."""
    h = g.host
    for t in g.tables["direct_l1"]:
        tm = g.mfn(t)
        ents = h.ft.table(tm)
        for i in np.flatnonzero((ents & np.uint64(P._PAGE_PRESENT)) != 0).tolist():
            f = P.pte_frame(int(ents[i]))
            if h.ft.owner(f) == g.domid:
                return tm, i, int(ents[i])
    raise AssertionError("no L1 slot")


def test_guest_writing_an_unsafe_entry_is_shadowed_or_crashed():
    """The guest's own write of a non-present entry that keeps its frame (the emulated write of
    a read-only L1): checked on a vulnerable CPU by default; with shadow paging the guest is
    switched to shadow mode and the write done, without it the guest is crashed."""
    for shadow in (True, False):
        h, g, hv = world(cpu_l1tf=True, no_shadow_paging=not shadow)
        tm, i, v = _guest_l1_slot(g)
        rc = ptwr_emulated_update(h, g.domid, tm, i, v & ~P._PAGE_PRESENT)
        d = h.domains[g.domid]
        line = f"d{g.domid} L1TF-vulnerable L1e {v & ~P._PAGE_PRESENT:016x} - "
        if shadow:
            assert rc == 0 and d.sh_forced and not d.is_shutting_down
            assert int(h.ft.table(tm)[i]) == v & ~P._PAGE_PRESENT
            assert l1tf_lines(h) == [line + "Shadowing"]
        else:
            assert rc < 0 and not d.sh_forced
            assert d.is_shutting_down and d.shutdown_code == X.SHUTDOWN_crash
            assert int(h.ft.table(tm)[i]) == v  # not written
            assert l1tf_lines(h) == [line + "Crashing"]
        assert invariants.check(h) == []


def test_safe_entries_pass_every_setting():
    """Zero, and an entry whose address is safe, are written as on an unaffected CPU."""
    for shadow in (True, False):
        h, g, hv = world(cpu_l1tf=True, no_shadow_paging=not shadow)
        tm, i, v = _guest_l1_slot(g)
        assert ptwr_emulated_update(h, g.domid, tm, i, P._PAGE_ACCESSED) == 0
        assert not l1tf_lines(h) and not h.domains[g.domid].sh_forced
        assert invariants.check(h) == []


# -- upstream's clear vs xenpage's, across the settings -----------------------------------------

SETTINGS = [  # (cpu_l1tf, pv-l1tf=, shadow paging built in)
    (cpu, s, shadow) for cpu, s, shadow in itertools.product(
        (False, True), (None, "0", "1", "dom0", "domu=0"), (True, False))]


def _domu_checked(cpu, s):
    dom0, domu = l1tf.parse_pv_l1tf(s) if s is not None else (None, None)
    return bool(domu) if domu is not None else cpu


def _quirks(cpu, s, shadow):
    dom0, domu = l1tf.parse_pv_l1tf(s) if s is not None else (None, None)
    return dict(cpu_l1tf=cpu, pv_l1tf_dom0=dom0, pv_l1tf_domu=domu, no_shadow_paging=not shadow)


@pytest.mark.parametrize("cpu, s, shadow", SETTINGS)
def test_xenpage_exchange_is_safe_on_every_setting(cpu, s, shadow):
    h, g, hv = world(**_quirks(cpu, s, shadow))
    pfns = g.kernel_only_pages()[40:44] + g.user_pages("private")[2:4] + [g.tables["direct_l1"][3]]
    mfns = [g.mfn(p) for p in pfns]
    res = mem_offline(hv, mfns)
    assert [o.kind for o in res.outcomes] == [Kind.EXCHANGED] * len(mfns), res.report.stderr
    assert not l1tf_lines(h) and not h.domains[g.domid].sh_forced
    assert not h.domains[g.domid].is_shutting_down
    assert g.verify() == [] and invariants.check(h) == []


@pytest.mark.parametrize("cpu, s, shadow", SETTINGS)
def test_upstream_clear_on_every_setting(cpu, s, shadow):
    """Upstream's clear leaves the old frame's address in a non-present entry: unchecked,
    nothing happens; checked with shadow paging, the guest is switched to shadow paging for
    good (``PG_SH_forced``) and the exchange goes through; checked without it, Xen 'crashes'
    the suspended guest -- which changes nothing -- and continues the toolstack's
    mmu_update for ever: xc_exchange_page never returns and the guest stays suspended."""
    h, g, hv = world(**_quirks(cpu, s, shadow))
    m = g.mfn(g.kernel_only_pages()[50])
    hv.page_offline_op(S.sysctl_page_offline, m, m)
    assert suspend_guest(hv, g.domid)[0]
    d = h.domains[g.domid]
    checked = _domu_checked(cpu, s)
    if checked and not shadow:
        with pytest.raises(HypercallLivelock):
            xc_exchange_page(hv, g.domid, m, CLEAR_ONLY)
        info = hv.domain_info(g.domid)
        assert info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend  # not crashed
        lines = l1tf_lines(h)
        # the same entry refused on each continuation (Xen prints it each time, rate-limited)
        assert len(set(lines)) == 1 and lines[0].startswith(f"d{g.domid} L1TF-vulnerable L1e ")
        assert lines[0].endswith(" - Crashing") and not d.sh_forced
        assert f"domain_crash called from pv_l1tf_check_pte: d{g.domid}" in h.log
        return
    r = xc_exchange_page(hv, g.domid, m, CLEAR_ONLY)
    assert r.result == 0, r.log
    assert resume_guest(hv, g.domid) == 0
    assert g.verify() == [] and invariants.check(h) == []
    if checked:
        lines = l1tf_lines(h)
        assert lines and all(x.endswith(" - Shadowing") for x in lines)
        v = int(lines[0].split()[3], 16)
        assert P.pte_frame(v) == m and not v & P._PAGE_PRESENT  # the old frame, P cleared
        assert d.sh_forced
    else:
        assert not l1tf_lines(h) and not d.sh_forced
