"""The page-retirement service's view of the *simulated* machine: its memory errors (what the
hardware reports and Xen does about them), the ``hard`` action (Xen's machine-check path,
as ``xen-mceinj -t 0 -p ADDR`` drives it on a real host), rebooting the machine with Xen's
``badpage=`` option, and restarting a guest Xen crashed.  Simulator only: on real Xen the
service reads dom0's machine-check log and marks frames broken with xen-mceinj.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...abi import mca as A
from ...hypervisor import mce
from ...hypervisor.e820 import E820Map, MiB
from ...hypervisor.host import Host, HostConfig
from .hypervisor import LIBXL_MAXMEM_PAGES, DefaultHostSpec, SimHypervisor


@dataclass
class Injected:
    record: A.McRecord
    xen: mce.XenAction


class SimMachineCheck:
    """Memory errors on a simulated host (the error injector)."""

    def __init__(self, hv: SimHypervisor, geometry: mce.DramGeometry | None = None):
        self.hv = hv
        self.geometry = geometry or mce.default_geometry(hv.host)

    def inject(self, mfn: int, uncorrected: bool = False, count: int = 1, time: float | None = None,
               offset: int = 0, scrub: bool = False) -> Injected:
        """An error at byte ``offset`` of frame ``mfn`` (``count`` corrected errors in one
        report).  An uncorrected error runs Xen's machine-check handler on the host."""
        rec, act = mce.memory_error(self.hv.host, self.geometry, (mfn << 12) | (offset & 0xFFF),
                                    uncorrected=uncorrected, count=count, time=time, scrub=scrub,
                                    cpu=self.hv.host.nr_pcpus - 1)
        if uncorrected:
            self.hv.dirty = True
        return Injected(rec, act)


def hard_offline(hv: SimHypervisor, mfn: int) -> dict:
    """Mark ``mfn`` broken through Xen's machine-check path (``offline_page(mfn, broken=1)``
    and the owner handling that follows), the way ``xen-mceinj -t 0 -p ADDR`` does on a
    real host: a PV owner is crashed, dom0 and HVM owners get a vMCE."""
    act = mce.mc_memerr_dhandler(hv.host, mfn)
    hv.dirty = True
    return act.to_json()


def geometry_of(hv: SimHypervisor) -> mce.DramGeometry:
    return mce.default_geometry(hv.host)


# -- reboot ---------------------------------------------------------------------------------

def mem_bytes_of(host: Host) -> int:
    """The machine's RAM size (inverse of :meth:`E820Map.qemu_pc`)."""
    low_end = max(t for s, t in host.e820.ram_frame_ranges() if t <= (1 << 20)) << 12
    high = sum(t - s for s, t in host.e820.ram_frame_ranges() if s >= (1 << 20)) << 12
    return low_end + 0x20000 + high


def spec_of(host: Host) -> DefaultHostSpec:
    """The :class:`DefaultHostSpec` that rebuilds a host shaped like ``host``."""
    doms = host.guest_domains()
    dom0 = next(d for d in doms if d.domid == 0)
    return DefaultHostSpec(
        mem_mib=mem_bytes_of(host) // MiB, dom0_mib=dom0.max_pages // 256,
        pv_guests=tuple((d.name, d.max_pages // 256) for d in doms if d.domid and not d.hvm),
        hvm_guests=tuple((d.name, _mib(d)) for d in doms if d.domid and d.hvm and not d.pvh),
        pvh_guests=tuple((d.name, _mib(d)) for d in doms if d.domid and d.pvh),
        nr_pcpus=host.nr_pcpus)


def _mib(d) -> int:
    """A translated guest's memory: its max_pages less libxl's head-room."""
    return max(1, (d.max_pages - LIBXL_MAXMEM_PAGES) // 256)


def boot(spec: DefaultHostSpec | None = None, badpage: str = "", quirks=None) -> Host:
    """Boot a simulated host as :func:`xenpage.backends.sim.build_host` does, with Xen's
    ``badpage=`` option honoured: the frames it names are taken out of the boot allocator
    before the heap is built (``bootmem_region_zap``), so they never reach a domain; they
    stay in use, unowned -- what ``offline_page`` then reports as ANONYMOUS."""
    spec = spec or DefaultHostSpec()
    cfg = HostConfig(mem_bytes=spec.mem_mib * MiB, nr_pcpus=spec.nr_pcpus)
    if quirks is not None:
        cfg.quirks = quirks
    h = Host(E820Map.qemu_pc(cfg.mem_bytes), cfg.nr_pcpus, cfg.quirks)
    zapped: list[int] = []
    if badpage:
        ram = h.e820.ram_window(0, h.nframes)
        bad = np.zeros(h.nframes, dtype=bool)
        for a, b in mce.parse_badpage(badpage):
            if a < h.nframes:
                bad[a:min(b, h.nframes - 1) + 1] = True
        bad &= ram
        orig = h.heap.rebuild

        def rebuild_without_bad(start: int, end: int) -> None:
            h.heap.rebuild = orig
            from ...abi import mm
            idx = np.flatnonzero(bad & (h.ft.states() == mm.STATE_FREE))
            h.ft.count_info[idx] = np.uint64(0)
            zapped.extend(idx.tolist())
            orig(start, end)
        h.heap.rebuild = rebuild_without_bad
    h._init_memory(cfg)
    h.anonymous.extend(zapped)
    h.withheld = list(zapped)  # for reports (not saved)
    h.cmdline = f"badpage={badpage}" if badpage else ""  # what XENVER_commandline reports
    if zapped:
        h.log.append(f"(XEN) badpage: {len(zapped)} frames withheld from the heap")
    h.create_domain("Domain-0", spec.dom0_mib * 256, domid=0)
    h._free_init_memory()
    from ...guests.linux_pv import LinuxPV
    for i, (name, mib) in enumerate(spec.pv_guests):
        d = h.create_domain(name, mib * 256, hvm=False)
        LinuxPV.boot(h, d.domid, seed=spec.seed + i)
    for name, mib in spec.hvm_guests:
        h.create_domain(name, mib * 256, hvm=True, max_pages=mib * 256 + LIBXL_MAXMEM_PAGES)
    for name, mib in spec.pvh_guests:
        h.create_domain(name, mib * 256, pvh=True, max_pages=mib * 256 + LIBXL_MAXMEM_PAGES)
    return h


def reboot(host: Host, badpage: str = "") -> Host:
    """The same machine after a reboot: Xen forgets every offlined frame; ``badpage=``
    keeps the named frames out of its heap."""
    return boot(spec_of(host), badpage, quirks=host.quirks)


def restart_domain(host: Host, domid: int, seed: int = 1) -> int:
    """``xl destroy`` + ``xl create`` of a crashed guest (same name, memory and type);
    returns the new domid.  Its offline-pending frames become offlined as they are freed."""
    d = host.domain(domid)
    name, pages, hvm, pvh = d.name, d.max_pages, d.hvm, d.pvh
    host.destroy_domain(domid)
    if hvm:
        nd = host.create_domain(name, _mib(d) * 256, hvm=True, pvh=pvh,
                                max_pages=_mib(d) * 256 + LIBXL_MAXMEM_PAGES)
    else:
        nd = host.create_domain(name, pages, hvm=False)
    if not hvm:
        from ...guests.linux_pv import LinuxPV
        LinuxPV.boot(host, nd.domid, seed=seed)
    return nd.domid
