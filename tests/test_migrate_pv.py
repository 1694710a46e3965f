"""Live migration of a Linux-like PV guest (xg_sr_save_x86_pv / xg_sr_restore_x86_pv): page
tables normalised and localised, pins and CR3 restored, the guest resuming in its new domain;
``mem-offline --fallback=migrate`` retiring a granted or dom0-mapped PV frame that the exchange
leaves pending."""

from __future__ import annotations

import pytest

from xenpage.abi import errno as E
from xenpage.abi import sysctl as S
from xenpage.backends.sim import DefaultHostSpec, SimHypervisor, build_host, host_path
from xenpage.guests.linux_pv import LinuxPV
from xenpage.hypervisor import invariants
from xenpage.hypervisor.host import Host, HostConfig
from xenpage.toolstack import hptool
from xenpage.backends.sim.migrate import MigrationError
from xenpage.backends.sim.migrate_pv import migrate_pv
from xenpage.toolstack.offline import mem_offline, resume_guest, suspend_guest
from xenpage.toolstack.outcomes import Kind, Reason
from xenpage.toolstack.retire import RetireOptions


def pv_host(cls=LinuxPV, mem_mib=160, guest_mib=16, seed=4):
    h = Host.boot(HostConfig(mem_bytes=mem_mib << 20), dom0_pages=32 * 256)
    d = h.create_domain("pv", guest_mib * 256)
    g = cls.boot(h, d.domid, seed=seed)
    return h, SimHypervisor(h), g


def status(hv, m):
    return int(hv.page_offline_op(S.sysctl_query_page_offline, m, m)[1][0])


def ok(h):
    assert invariants.check(h) == []
    for d, g in h.guests.items():
        assert g.verify() == [], d


def test_pv_guest_migrates_with_its_pending_frames_offlined():
    h, hv, g = pv_host()
    g.step(50)
    ring, xs = g.mfn(g.rings[0]["pfn"]), g.mfn(g.daemon_maps[0]["pfn"])
    data = g.mfn(g.kernel_only_pages()[5])
    for m in (ring, xs, data):
        hptool.mem_offline_mark(hv, m)
    r = migrate_pv(hv, 1, hook=lambda s, **k: s == "batch" and k["live"] and g.step(10))
    assert r.ok, r.error
    assert r.rounds[0].pages == 4096 - 2          # the two tables mapping Xen-heap frames: deferred
    assert r.rounds[-1].pages >= 2 and not r.rounds[-1].live
    new = r.dst_domid
    assert 1 not in h.domains and h.domains[new].name == "pv"
    for m in (ring, xs, data):
        assert status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED
    ng = h.guests[new]
    assert ng.domid == new and ng.migrations == 1 and not ng.suspended
    assert h.domains[new].guest_table[0] == ng.mfn(ng.procs[0].kpgd)
    ok(h)
    # it runs, can be suspended and resumed, and its pages exchanged, in its new domain
    ng.step(200)
    assert suspend_guest(hv, new)[0] and resume_guest(hv, new) == 0
    res = mem_offline(hv, [ng.mfn(ng.user_pages("shared")[0])])
    assert res.outcomes[0].kind == Kind.EXCHANGED
    ok(h)


def test_pv_migration_between_two_hosts_and_again():
    a, hva, g = pv_host()
    b = Host.boot(HostConfig(mem_bytes=128 << 20), dom0_pages=16 * 256)
    hvb = SimHypervisor(b)
    r = migrate_pv(hva, 1, hvb)
    assert r.ok and not r.same_host and a.guests == {}
    ok(a)
    ok(b)
    r2 = migrate_pv(hvb, r.dst_domid, hva)
    assert r2.ok and a.guests[r2.dst_domid].migrations == 2
    ok(a)
    ok(b)


class KeepsXenHeapMapped(LinuxPV):
    """A kernel that does not unmap its grant table and shared_info before suspending."""

    def _pre_suspend(self):
        self.unmapped = []


def test_a_guest_that_keeps_xen_heap_frames_mapped_cannot_be_migrated():
    """Once such a guest is suspended the save finds frames outside its pseudo-physical map
    (Xen: "Bad mfn for L1", ERANGE) and everything is given back."""
    h, hv, g = pv_host(cls=KeepsXenHeapMapped)
    doms, free = sorted(h.domains), h.heap.free_pages
    r = migrate_pv(hv, 1)
    assert r.rc == -34 and "Bad mfn for L1" in r.error
    assert sorted(h.domains) == doms and h.heap.free_pages == free
    assert not hv.domain_info(1).shutdown and g.resumes == 1
    ok(h)


@pytest.mark.parametrize("step", ["created", "batch", "suspended", "stream-end", "before-unpause"])
def test_a_failure_at_any_step_gives_everything_back(step):
    h, hv, g = pv_host()
    doms, free = sorted(h.domains), h.heap.free_pages

    def hook(s, **kw):
        if s == step:
            raise MigrationError(-E.EIO, f"injected at {step}")
    r = migrate_pv(hv, 1, hook=hook)
    assert r.rc == -E.EIO
    assert sorted(h.domains) == doms and h.heap.free_pages == free
    assert not hv.domain_info(1).shutdown and h.domains[1].name == "pv"
    g.step(50)
    ok(h)
    assert migrate_pv(hv, 1).ok


def test_mem_offline_fallback_migrates_a_pv_guest_whose_frames_stay_pending():
    spec = DefaultHostSpec(mem_mib=512, dom0_mib=128, pv_guests=(("pv", 24),), hvm_guests=(), pvh_guests=())
    h = build_host(spec)
    hv = SimHypervisor(h)
    g = h.guests[1]
    ring, xs = g.mfn(g.rings[0]["pfn"]), g.mfn(g.daemon_maps[0]["pfn"])
    data = g.mfn(g.kernel_only_pages()[3])
    res = mem_offline(hv, [ring, xs, data])
    got = {o.mfn: (o.kind, o.reason) for o in res.outcomes}
    assert got == {ring: (Kind.PENDING, Reason.GRANTED), xs: (Kind.ROLLED_BACK, Reason.REFERENCED),
                   data: (Kind.EXCHANGED, Reason.NONE)}
    res = mem_offline(hv, [ring, xs], retire=RetireOptions(fallback="migrate"))
    assert [o.kind for o in res.outcomes] == [Kind.MIGRATED, Kind.MIGRATED]
    assert res.report.exit_code == 0
    assert "live-migrated d1 to d2" in res.outcomes[0].detail
    assert all(status(hv, m) == S.PG_OFFLINE_STATUS_OFFLINED for m in (ring, xs))
    ok(h)


def test_cli_fallback_migrate(tmp_path, xenpage_cli):
    spec = DefaultHostSpec(mem_mib=512, dom0_mib=128, pv_guests=(("domu1", 24),), hvm_guests=(), pvh_guests=())
    state = tmp_path / "s"
    build_host(spec).save(host_path(state))
    g = Host.load(host_path(state)).guests[1]
    ring = g.mfn(g.rings[0]["pfn"])
    r = xenpage_cli(state, "mem-offline", f"{ring:x}", "--fallback=migrate")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[1].startswith(f"Memory mfn {ring:x} offlined successfully, this page is DOM1 page")
    assert "granted to d0" in out[2] and "live-migrated d1 to d2" in out[2]
    h = Host.load(host_path(state))
    assert h.ft.state(ring) == 2 and 1 not in h.domains
    ok(h)


def test_cli_fallback_migrate_on_the_default_host(tmp_path, xenpage_cli):
    """The default host (created by the command itself): domu1's granted ring is left pending
    by the exchange, so ``--fallback=migrate`` live-migrates domu1 and the frame is offlined."""
    state = tmp_path / "s"
    h = build_host()
    g = h.guests[1]
    ring = g.mfn(g.rings[0]["pfn"])
    r = xenpage_cli(state, "mem-offline", f"{ring:x}", "--fallback=migrate")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[1].startswith(f"Memory mfn {ring:x} offlined successfully, this page is DOM1 page")
    assert "granted to d0" in out[2] and "live-migrated d1 to d" in out[2]
    h = Host.load(host_path(state))
    assert h.ft.state(ring) == 2 and 1 not in h.domains
    new = [d for d, dd in h.domains.items() if dd.name == "domu1"]
    assert len(new) == 1 and h.guests[new[0]].migrations == 1
    ok(h)


def test_mem_offline_fallback_migrates_domu1_on_the_default_host():
    h = build_host()
    hv = SimHypervisor(h)
    g = h.guests[1]
    g.step(100)
    ring = g.mfn(g.rings[0]["pfn"])
    assert mem_offline(hv, [ring]).outcomes[0].kind == Kind.PENDING
    res = mem_offline(hv, [ring], retire=RetireOptions(fallback="migrate"))
    o = res.outcomes[0]
    assert o.kind == Kind.MIGRATED and res.report.exit_code == 0, o.detail
    assert status(hv, ring) == S.PG_OFFLINE_STATUS_OFFLINED
    assert 1 not in h.domains
    ng = h.guests[o.extra["new_domid"]]
    assert h.domains[ng.domid].name == "domu1" and ng.migrations == 1 and not ng.suspended
    ok(h)
