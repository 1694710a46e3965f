"""The ``Hypervisor`` protocol over the simulated host, in-process, as dom0 sees it.

A saved host lives in a state directory (default ``$XDG_STATE_HOME/xenpage``); commands open
it with :func:`open_host`, which takes an exclusive lock (two toolstacks never interleave),
creates the default host on first use, and saves it back when the command succeeds.
"""

from __future__ import annotations

import copy
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ...abi import errno as E
from ...abi import sysctl as S
from ...abi.kexec import KEXEC_RANGE_MA_XEN
from ...abi.memory import XENMEMF_address_bits
from ...abi.xen import DOMID_XEN, INVALID_M2P_ENTRY
from ...hypervisor import sysctl
from ...hypervisor.e820 import MiB
from ...hypervisor.host import DomainError, Host, HostConfig
from ...hypervisor import persist
from ...hypervisor.persist import HostFileError
from ...toolstack.journal import JOURNAL_NAME
from ...toolstack.hypervisor import (CAP_CHECKPOINT, CAP_HVM_INPLACE, CAP_MIGRATE, DomainInfo,
                                    MigrationReport, PhysInfo)
from .. import default_state_dir
from ... import statefiles
from ..locking import LockTimeout, locked

HOST_DIRNAME = "host"


class SimHypervisor:
    """dom0's privileged interface to a simulated :class:`Host`."""

    kind = "sim"
    #: live migration (the simulator's model of libxc's save/restore), the in-place
    #: retirement of translated guests' frames, and saving the host between two steps
    capabilities = frozenset({CAP_MIGRATE, CAP_HVM_INPLACE, CAP_CHECKPOINT})
    #: the migration model's link and fixed costs (None: its defaults -- loopback to the
    #: same host, 1 Gbit/s to another)
    migration_link = None
    migration_costs = None
    #: the model's full result of the last ``live_migrate`` (rounds, downtime parts)
    last_migration = None
    #: set by :func:`open_host`: the state directory (the journal lives there) and the host
    state_dir: Path | None = None
    path: Path | None = None

    def __init__(self, host: Host, caller: int = 0):
        self.host = host
        self.caller = caller
        self.dirty = False
        #: set when memory ran out *inside* a call of the simulated hypervisor: the simulated
        #: machine in this process may then be half-way through a hypercall -- something a
        #: real Xen never shows dom0 -- so it is never saved again (the host stays as last
        #: saved, the journal beside it, for 'xenpage recover')
        self.poisoned = False

    def checkpoint(self) -> None:
        """Save the host now: what a crash of the toolstack at this point leaves behind (a
        real machine keeps its state by itself; the write-ahead journal calls this before
        each record)."""
        if self.path is not None:
            self.refuse_if_poisoned()
            self.host.save(self.path)

    def refuse_if_poisoned(self) -> None:
        """``MemoryError`` when this process's simulated machine may be half-way through a
        hypercall (:attr:`poisoned`): it must not be saved."""
        if self.poisoned:
            raise MemoryError("the simulated host ran out of memory inside a hypercall: "
                              "its copy in this process is not saved")

    # -- host -------------------------------------------------------------------------------
    def physinfo(self) -> PhysInfo:
        h = self.host
        return PhysInfo(nr_cpus=h.nr_pcpus, total_pages=int(sum(t - s for s, t in h.e820.ram_frame_ranges())),
                        free_pages=h.heap.free_pages, max_mfn=h.max_page, backend="sim",
                        extra={"xen_commandline": h.cmdline})

    def max_mfn(self) -> int:
        return self.host.max_page

    def _calling_pcpu(self) -> int:
        """The physical CPU the calling dom0 vCPU runs on: the lowest one its hard affinity
        allows (the scheduler's choice is modelled deterministically)."""
        d = self.host.domains[self.caller]
        return min(d.affinity[0]) if d.affinity and d.affinity[0] else 0

    def split_misaligns(self) -> bool:
        return bool(self.host.quirks.reserve_misaligned)

    def xen_fixed_range(self) -> tuple[int, int] | None:
        rc, start, size = self._hc.kexec_get_range(KEXEC_RANGE_MA_XEN)
        if rc or not size:
            return None
        return start >> 12, (start + size + 0xFFF) >> 12

    def page_offline_op(self, cmd: int, start: int, end: int) -> tuple[int, np.ndarray | None]:
        if cmd != S.sysctl_query_page_offline:
            self.dirty = True  # a query changes nothing: no need to save the host
        return sysctl.page_offline_op(self.host, self.caller, cmd, start, end,
                                      pcpu=self._calling_pcpu())

    def page_offline_each(self, cmd: int, mfns) -> tuple[np.ndarray, np.ndarray]:
        if cmd != S.sysctl_query_page_offline:
            self.dirty = True
        return sysctl.page_offline_each(self.host, self.caller, cmd, mfns,
                                        pcpu=self._calling_pcpu())

    # -- domains ----------------------------------------------------------------------------
    def _info(self, d) -> DomainInfo:
        # a dying domain's name is what xenstore still says, as libxl reads it: gone after
        # ``xl destroy`` (``xl list`` shows "(null)"), kept after a bare XEN_DOMCTL_destroydomain
        # (seen in the lab)
        name = d.name
        if d.dying:
            name = self.host.xenstore.read(0, f"/local/domain/{d.domid}/name") \
                if self.host.xenstore.exists(f"/local/domain/{d.domid}/name") else ""
        return DomainInfo(domid=d.domid, flags=d.flags(), tot_pages=d.tot_pages,
                          max_pages=d.max_pages, nr_vcpus=d.vcpus, name=name)

    def domain_list(self) -> list[DomainInfo]:
        return [self._info(d) for d in self.host.guest_domains()]

    def domain_info(self, domid: int) -> DomainInfo | None:
        d = self.host.domains.get(domid)
        if d is None or d.is_system:
            return None
        return self._info(d)

    def _domctl(self, fn, domid: int) -> int:
        if not self.host.domains.get(self.caller) or not self.host.domains[self.caller].privileged:
            return -E.EPERM
        try:
            fn(domid)
        except DomainError as e:
            return e.errno if e.errno < 0 else -e.errno
        self.dirty = True
        return 0

    def pause(self, domid: int) -> int:
        rc = self._domctl(self.host.pause, domid)
        if rc == 0:  # simulated time: vcpu_sleep_sync of each vCPU
            self.host.clock += _costs().hypercall_s + _costs().pause_vcpu_s * self.host.domains[domid].vcpus
        return rc

    def unpause(self, domid: int) -> int:
        rc = self._domctl(self.host.unpause, domid)
        if rc == 0:
            self.host.clock += _costs().hypercall_s + _costs().unpause_s
        return rc

    def resume(self, domid: int, fast: bool = True) -> int:
        """``xc_domain_resume(fast=1)``: only a domain shut down for suspend; the guest's
        suspend hypercall returns 1 ("cancelled") and it carries on."""
        d = self.host.domains.get(domid)
        if d is None or d.is_system:
            return -E.ESRCH
        if not d.suspended:
            return -E.EINVAL
        d.suspend_cancelled = bool(fast)
        return self._domctl(self.host.resume, domid)

    def destroy(self, domid: int) -> int:
        return self._domctl(self.host.destroy_domain, domid)

    def vcpu_affinity(self, domid: int, vcpu: int) -> list[int]:
        return list(self.host.domain(domid).affinity[vcpu])

    def set_vcpu_affinity(self, domid: int, vcpu: int, cpus: list[int]) -> int:
        d = self.host.domains.get(domid)
        if d is None or d.is_system or not 0 <= vcpu < d.vcpus:
            return -E.EINVAL if d else -E.ESRCH
        cpus = sorted({c for c in cpus if 0 <= c < self.host.nr_pcpus})
        if not cpus:
            return -E.EINVAL
        d.affinity[vcpu] = cpus
        self.dirty = True
        return 0

    # -- xenstore ---------------------------------------------------------------------------
    def xs_read(self, path: str) -> str | None:
        try:
            return self.host.xenstore.read(self.caller, path)
        except Exception:
            return None

    def xs_write(self, path: str, value: str) -> int:
        try:
            self.host.xenstore.write(self.caller, path, value)
        except Exception as e:  # XenstoreError
            return -getattr(e, "errno", E.EINVAL)
        self.dirty = True
        return 0

    # -- guest memory -------------------------------------------------------------------------
    @property
    def _hc(self):
        return self.host.hypercalls(self.caller)

    def m2p(self, mfns) -> np.ndarray:
        """Read M2P entries as ``xc_map_m2p`` does: ``XENMEM_machphys_mfn_list`` names the
        2 MiB chunks holding the table, whose frames are mapped read-only as DOMID_XEN's."""
        mfns = np.asarray(mfns, dtype=np.int64).ravel()
        out = np.full(mfns.size, np.uint64(INVALID_M2P_ENTRY), dtype=np.uint64)
        ok = np.flatnonzero((mfns >= 0) & (mfns < self.host.nframes))
        if ok.size == 0:
            return out
        chunks = getattr(self, "_m2p_chunks", None)
        if chunks is None:  # fixed at boot: asked once, as xc_map_m2p maps it once
            chunks = self._m2p_chunks = np.array(self._hc.machphys_mfn_list(1 << 30), dtype=np.int64)
        frame = mfns[ok] // 512                      # which M2P frame holds the entry
        need, inv = np.unique(frame, return_inverse=True)
        m = self.map_foreign(DOMID_XEN, chunks[need // 512] + need % 512, False)
        if isinstance(m, int):
            return out
        out[ok] = m.array[inv, mfns[ok] % 512]
        m.unmap()
        return out

    def pv_p2m_frames(self, domid: int) -> tuple[int, np.ndarray, int]:
        """Follow shared_info's ``pfn_to_mfn_frame_list_list``: the list-of-lists frame, the
        frame-list frames, then the P2M frames (read through foreign mappings)."""
        d = self.host.domains.get(domid)
        if d is None or d.is_system:
            return -E.ESRCH, np.zeros(0, dtype=np.int64), 0
        if d.hvm or not d.p2m_fll_mfn:
            return -E.EINVAL, np.zeros(0, dtype=np.int64), 0
        n = d.p2m_max_pfn
        nframes = (n + 511) // 512
        nfl = (nframes + 511) // 512
        m = self.map_foreign(domid, [d.p2m_fll_mfn], False)
        if isinstance(m, int):
            return m, np.zeros(0, dtype=np.int64), 0
        fl = m.array[0, :nfl].astype(np.int64)
        m.unmap()
        m = self.map_foreign(domid, fl, False)
        if isinstance(m, int):
            return m, np.zeros(0, dtype=np.int64), 0
        frames = m.array.ravel()[:nframes].astype(np.int64)
        m.unmap()
        return 0, frames, n

    def pv_p2m_frame_lists(self, domid: int) -> tuple[int, np.ndarray, int]:
        d = self.host.domains.get(domid)
        if d is None or d.is_system:
            return -E.ESRCH, np.zeros(0, dtype=np.int64), 0
        if d.hvm or not d.p2m_fll_mfn:
            return -E.EINVAL, np.zeros(0, dtype=np.int64), 0
        nfl = ((d.p2m_max_pfn + 511) // 512 + 511) // 512
        m = self.map_foreign(domid, [d.p2m_fll_mfn], False)
        if isinstance(m, int):
            return m, np.zeros(0, dtype=np.int64), 0
        fl = m.array[0, :nfl].astype(np.int64)
        m.unmap()
        return 0, fl, d.p2m_fll_mfn

    def map_foreign(self, domid: int, mfns, writable: bool):
        mfns = np.asarray(mfns, dtype=np.int64).ravel()
        rc, handle = self._hc.foreign_map(domid, mfns, writable)
        if rc:
            return rc
        self.dirty = True
        return SimForeignMap(self, handle, mfns, writable)

    def page_types(self, domid: int, mfns) -> tuple[int, np.ndarray]:
        return self._hc.getpageframeinfo3(domid, mfns)

    def grant_entries(self, domid: int) -> tuple[int, np.ndarray]:
        from ...hypervisor import grant_table
        d = self.host.domains.get(domid)
        if d is None or d.is_system:
            return -E.ESRCH, np.zeros(0, dtype=np.uint64)
        return 0, grant_table.entries(self.host, domid)

    def mmu_update(self, reqs, foreigndom: int) -> tuple[int, int]:
        self.dirty = True
        return self._hc.mmu_update(reqs, foreigndom)

    def mmuext_op(self, ops, foreigndom: int) -> tuple[int, int]:
        self.dirty = True
        return self._hc.mmuext_op(ops, foreigndom)

    def memory_exchange(self, domid: int, in_mfns, out_gpfns, address_bits: int = 0
                        ) -> tuple[int, int, list[int]]:
        from ...hypervisor.memory import Reservation
        self.dirty = True
        r = self._hc.memory_exchange(Reservation([int(m) for m in in_mfns], 0, domid),
                                     Reservation([int(g) for g in out_gpfns], 0, domid,
                                                 XENMEMF_address_bits(address_bits)))
        return r.rc, r.nr_exchanged, r.out

    def wait(self, seconds: float) -> None:
        """Guests run while dom0 waits (see :mod:`xenpage.guests`)."""
        run = getattr(self.host, "run_guests", None)
        if run is not None:
            run(seconds)
            self.dirty = True


    # -- HVM guests and live migration (MigrationHypervisor) --------------------------------
    def now(self) -> float:
        return self.host.clock

    def _priv(self) -> bool:
        d = self.host.domains.get(self.caller)
        return bool(d and d.privileged)

    def _guest(self, domid: int):
        d = self.host.domains.get(domid)
        return None if d is None or d.is_system else d

    def shutdown_domain(self, domid: int, reason: int) -> int:
        if not self._priv():
            return -E.EPERM
        if self._guest(domid) is None:
            return -E.ESRCH
        self.host.shutdown(domid, reason)
        self.host.clock += _costs().hypercall_s + _costs().pause_vcpu_s
        self.dirty = True
        return 0

    def maximum_gpfn(self, domid: int) -> int:
        from ...hypervisor import hvm
        if self._guest(domid) is None:
            return -E.ESRCH
        return hvm.maximum_gpfn(self.host, domid)

    def logdirty_control(self, domid: int, op: int, pages: int = 0, mode: int = 0,
                         packed: bool = False):
        from ...hypervisor import paging
        from ...toolstack.hypervisor import LogDirtyStats
        rc, bm, st = paging.shadow_control(self.host, self.caller, domid, op, pages, mode, packed)
        self.dirty = True
        return rc, bm, (LogDirtyStats(st.fault_count, st.dirty_count) if st else None)

    def _frames_to_mfns(self, domid: int, frames) -> tuple[int, np.ndarray]:
        """What a foreign mapping would check (``foreign.map_frames``), vectorised: gfns of an
        HVM guest must have a readable frame of the guest; mfns of a PV guest must be its."""
        from ...abi import hvm as H
        from ...abi import mm
        from ...hypervisor import p2m as P
        d = self._guest(domid)
        if d is None:
            return -E.ESRCH, np.zeros(0, dtype=np.int64)
        if not self._priv():
            return -E.EPERM, np.zeros(0, dtype=np.int64)
        f = np.asarray(frames, dtype=np.int64).ravel()
        h = self.host
        if d.hvm:
            p = P.get(h, domid)
            if p is None or ((f < 0) | (f >= p.size)).any():
                return -E.EINVAL, np.zeros(0, dtype=np.int64)
            t = p.type[f]
            if not np.isin(t, (H.p2m_ram_rw, H.p2m_ram_logdirty, H.p2m_ram_ro)).all():
                return -E.EINVAL, np.zeros(0, dtype=np.int64)
            m = p.mfn[f].astype(np.int64)
        else:
            m = f
            if ((m < 0) | (m >= h.nframes)).any():
                return -E.EPERM, np.zeros(0, dtype=np.int64)
        own = h.ft.owner1[m].astype(np.int64) - 1
        cnt = h.ft.count_info[m] & np.uint64(mm.PGC_count_mask)
        if (own != domid).any() or (cnt == 0).any():
            return -E.EINVAL if d.hvm else -E.EBUSY, np.zeros(0, dtype=np.int64)
        return 0, m

    def read_pages(self, domid: int, frames):
        rc, m = self._frames_to_mfns(domid, frames)
        if rc:
            return rc, None
        from ...hypervisor.hvm import full_pages
        ft = self.host.ft
        c = _costs()
        self.host.clock += c.map_batch_s + m.size * 4096 / c.memcpy_bps
        fp = full_pages(ft, m)
        full = {int(i): ft.pages[int(m[i])].copy() for i in np.flatnonzero(np.isin(m, fp)).tolist()}
        return 0, SimPages(ft.content[m].copy(), full)

    def write_pages(self, domid: int, frames, data: "SimPages") -> int:
        rc, m = self._frames_to_mfns(domid, frames)
        if rc:
            return rc
        if len(data) != m.size:
            return -E.EINVAL
        from ...hypervisor.hvm import full_pages
        ft = self.host.ft
        c = _costs()
        self.host.clock += c.map_batch_s + m.size * 4096 / c.memcpy_bps
        for x in full_pages(ft, m).tolist():
            del ft.pages[x]
        ft.content[m] = data.fp
        for i, w in data.full.items():
            ft.write_page(int(m[i]), w)
        self.dirty = True
        return 0

    def domain_create(self, name: str, hvm: bool, max_pages: int, vcpus: int = 1, pvh: bool = False):
        if not self._priv():
            return -E.EPERM, -1
        try:
            d = self.host.create_domain(name, 0, hvm=hvm, vcpus=vcpus, max_pages=max_pages, pvh=pvh)
        except DomainError as e:
            return (e.errno if e.errno < 0 else -e.errno), -1
        self.host.pause(d.domid)  # a new domain stays paused until the toolstack unpauses it
        self.host.clock += _costs().hypercall_s
        self.dirty = True
        return 0, d.domid

    def populate_physmap(self, domid: int, gfns, address_bits: int = 0):
        """For a translated guest Xen writes no MFN back (``populate_physmap``:
        ``!paging_mode_translate(d)`` guards the copy): the extents come back as passed."""
        from ...hypervisor import hvm
        self.dirty = True
        c = _costs()
        rc, mfns = hvm.populate_physmap(self.host, self.caller, domid, gfns, address_bits)
        self.host.clock += c.hypercall_s + max(rc, 0) * (c.page_alloc_s + 4096 / c.memcpy_bps)
        d = self.host.domains.get(domid)
        if d is not None and d.hvm:
            return rc, np.asarray(gfns, dtype=np.int64).ravel().copy()
        return rc, mfns

    def decrease_reservation(self, domid: int, gfns) -> int:
        from ...hypervisor import hvm
        self.dirty = True
        c = _costs()
        rc = hvm.decrease_reservation(self.host, self.caller, domid, gfns)
        self.host.clock += c.hypercall_s + max(rc, 0) * c.page_alloc_s + (c.ept_flush_s if rc > 0 else 0)
        return rc

    def live_migrate(self, domid: int, destination=None) -> MigrationReport:
        """The simulator's engine: the model of libxc's save/restore as libxl drives it
        (:mod:`.migrate`, :mod:`.migrate_pv`), to ``destination`` (another
        :class:`SimHypervisor`) or to the same host."""
        info = self.domain_info(domid)
        if info is not None and not info.hvm:
            from .migrate_pv import migrate_pv as run
        else:
            from .migrate import migrate as run
        res = run(self, domid, destination, link=self.migration_link, costs=self.migration_costs)
        self.last_migration = res
        return res.report()

    def vcpu_getcontext(self, domid: int):
        """``XEN_DOMCTL_getvcpucontext`` of a PV guest's vCPU 0: its CR3s (mfns) and, in the
        simulator, the guest kernel model's own state (see ``hvm.HvmContext``)."""
        import copy
        from ...hypervisor.hvm import HvmContext
        d = self._guest(domid)
        if d is None:
            return -E.ESRCH, None
        if d.hvm:
            return -E.EINVAL, None
        g = self.host.guests.get(domid)
        ctx = HvmContext(d.vcpus, 5168 * d.vcpus,
                         copy.deepcopy(g.to_state()) if g is not None else None,
                         {k: np.array(v, copy=True) for k, v in g.arrays().items()} if g is not None else {})
        ctx.cr3 = d.guest_table[0] if d.guest_table else 0
        ctx.user_cr3 = d.guest_table_user[0] if d.guest_table_user else 0
        return 0, ctx

    def vcpu_setcontext(self, domid: int, ctx) -> int:
        """``XEN_DOMCTL_setvcpucontext``: load the (localised) CR3s -- each takes its L4
        references -- and the guest kernel model, which resumes on this domain."""
        import copy
        from ...hypervisor.mm import new_baseptr
        d = self._guest(domid)
        if d is None:
            return -E.ESRCH
        if d.hvm or not self._priv():
            return -E.EINVAL if d.hvm else -E.EPERM
        for user, m in ((False, getattr(ctx, "cr3", 0)), (True, getattr(ctx, "user_cr3", 0))):
            if m or not user:
                rc = new_baseptr(self.host, d, 0, int(m), user=user)
                if rc:
                    return rc
        if ctx.guest is not None:
            from ...guests import restore_guest
            g = restore_guest(self.host, domid, copy.deepcopy(ctx.guest),
                              {k: np.array(v, copy=True) for k, v in ctx.guest_arrays.items()})
            g.migrated_in = True
            self.host.guests[domid] = g
        self.dirty = True
        return 0

    def set_domain_name(self, domid: int, name: str) -> int:
        d = self._guest(domid)
        if d is None:
            return -E.ESRCH
        d.name = name
        self.host.xenstore.write(0, f"/local/domain/{domid}/name", name)
        self.dirty = True
        return 0

    def hvm_getcontext(self, domid: int):
        from ...hypervisor import hvm
        if not self._priv():
            return -E.EPERM, None
        return hvm.get_context(self.host, domid)

    def hvm_setcontext(self, domid: int, ctx) -> int:
        from ...hypervisor import hvm
        if not self._priv():
            return -E.EPERM
        self.dirty = True
        return hvm.set_context(self.host, domid, ctx)

    def hvm_p2m(self, domid: int, gfns):
        """``(rc, mfns, p2m types, leaf orders)`` of ``gfns``: the simulator can tell the frame
        behind a gfn (not part of the ``Hypervisor`` protocol: Xen 4.17 shows a dom0 process
        no translated guest's p2m; the toolstack uses it to verify where it is offered)."""
        from ...hypervisor import p2m as P
        z = np.zeros(0, dtype=np.int64)
        if not self._priv():
            return -E.EPERM, z, z, z
        if self._guest(domid) is None:
            return -E.ESRCH, z, z, z
        p = P.get(self.host, domid)
        if p is None:
            return -E.EOPNOTSUPP, z, z, z
        g = np.asarray(gfns, dtype=np.int64)
        if ((g < 0) | (g >= p.size)).any():
            return -E.EINVAL, z, z, z
        return 0, p.mfn[g].copy(), p.type[g].astype(np.int64), p.order[g].astype(np.int64)


def _costs():
    from ...hypervisor.costs import COSTS
    return COSTS


class SimPages:
    """Page contents copied out of a simulated guest: a 64-bit fingerprint per page, and the
    512 words of those pages that are not a fingerprint's expansion (page tables)."""

    def __init__(self, fp: np.ndarray, full: dict[int, np.ndarray] | None = None):
        self.fp = np.asarray(fp, dtype=np.uint64)
        self.full = full or {}

    def __len__(self) -> int:
        return int(self.fp.size)

    def words(self, i: int) -> np.ndarray:
        from ...hypervisor.frametable import expand_fingerprint
        w = self.full.get(i)
        return w.copy() if w is not None else expand_fingerprint(int(self.fp[i]))

    def set_words(self, i: int, words: np.ndarray) -> None:
        from ...hypervisor.frametable import expand_fingerprint
        words = np.asarray(words, dtype=np.uint64).reshape(512)
        fp = int(words[0])
        if np.array_equal(words, expand_fingerprint(fp)):
            self.full.pop(i, None)
            self.fp[i] = fp
        else:
            self.full[i] = words.copy()
            self.fp[i] = fp

    def select(self, idx) -> "SimPages":
        idx = np.asarray(idx, dtype=np.int64)
        pos = {int(j): k for k, j in enumerate(idx.tolist())}
        return SimPages(self.fp[idx].copy(), {pos[i]: w.copy() for i, w in self.full.items() if i in pos})


class SimForeignMap:
    """A foreign mapping on the simulated host: ``array`` holds the frames' contents as of
    the mapping (the guest is suspended while the toolstack works); ``flush`` writes a
    writable mapping's rows back to the frames."""

    def __init__(self, hv: SimHypervisor, handle: int, mfns: np.ndarray, writable: bool):
        self.hv, self.handle, self.mfns, self.writable = hv, handle, mfns, writable
        ft = hv.host.ft
        self.array = ft.read_pages(mfns) if mfns.size else np.zeros((0, 512), dtype=np.uint64)
        self._orig = self.array.copy() if writable else None

    def flush(self) -> None:
        if not self.writable:
            raise PermissionError("read-only foreign mapping")
        ft = self.hv.host.ft
        changed = np.flatnonzero((self.array != self._orig).any(axis=1))
        if changed.size:
            ft.write_pages(self.mfns[changed], self.array[changed])
        self._orig = self.array.copy()
        self.hv.dirty = True

    def unmap(self) -> None:
        if self.handle is not None:
            self.hv._hc.foreign_unmap(self.handle)
            self.handle = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unmap()


# -- the saved default host -----------------------------------------------------------------

@dataclass
class DefaultHostSpec:
    """The embedded default: a machine shaped like the lab's QEMU box (2 GiB, 2 pCPUs) with
    dom0 (1 GiB), a Linux-like PV guest, an HVM guest and a PVH guest (built in that order,
    so the earlier guests' frames are those of a host without the PVH guest)."""

    mem_mib: int = 2048
    dom0_mib: int = 1024
    pv_guests: tuple[tuple[str, int], ...] = (("domu1", 96),)
    hvm_guests: tuple[tuple[str, int], ...] = (("hvm1", 128),)
    pvh_guests: tuple[tuple[str, int], ...] = (("pvh1", 64),)
    nr_pcpus: int = 2
    seed: int = 1
    #: the HVM guests' workload (``xenpage.guests.hvm.Workload`` fields); idle by default
    hvm_workload: dict = field(default_factory=dict)
    #: the simulated Xen's defect switches (``hypervisor.quirks.Quirks``); 4.17's by default
    quirks: object = None


def build_host(spec: DefaultHostSpec | None = None) -> Host:
    spec = spec or DefaultHostSpec()
    cfg = HostConfig(mem_bytes=spec.mem_mib * MiB, nr_pcpus=spec.nr_pcpus)
    if spec.quirks is not None:
        cfg.quirks = copy.deepcopy(spec.quirks)  # each host its own switches
    host = Host.boot(cfg, dom0_pages=spec.dom0_mib * 256)
    from ...guests.linux_pv import LinuxPV
    for i, (name, mib) in enumerate(spec.pv_guests):
        d = host.create_domain(name, mib * 256, hvm=False)
        LinuxPV.boot(host, d.domid, seed=spec.seed + i)
    from ...guests.hvm import HvmGuest, PvhGuest, Workload
    for i, (name, mib) in enumerate(spec.hvm_guests):
        d = host.create_domain(name, mib * 256, hvm=True, max_pages=mib * 256 + LIBXL_MAXMEM_PAGES)
        HvmGuest.boot(host, d.domid, seed=spec.seed + 100 + i, workload=Workload(**spec.hvm_workload))
    for i, (name, mib) in enumerate(spec.pvh_guests):
        d = host.create_domain(name, mib * 256, pvh=True, max_pages=mib * 256 + LIBXL_MAXMEM_PAGES)
        PvhGuest.boot(host, d.domid, seed=spec.seed + 200 + i, workload=Workload(**spec.hvm_workload))
    return host


#: libxl's ``setmaxmem``: the guest's memory + ``libxl__arch_extra_memory`` (x86:
#: ``LIBXL_MAXMEM_CONSTANT``, 1 MiB) -- the head-room a translated guest's in-place
#: retirement repopulates into while a removed frame is still referenced
LIBXL_MAXMEM_PAGES = 256


def host_path(state_dir: Path | None = None) -> Path:
    return Path(state_dir or default_state_dir()) / HOST_DIRNAME


@contextmanager
def _state_lock(sd: Path, timeout: float | None, record: bool = True) -> Iterator[None]:
    try:
        with locked(sd / "lock", timeout, record=record):
            yield
    except LockTimeout as e:
        raise HostFileError(str(e)) from None


def _poison_on_memory_error(fn):
    def call(self, *args, **kw):
        try:
            return fn(self, *args, **kw)
        except MemoryError:
            self.poisoned = True
            raise
    call.__name__, call.__doc__, call.__wrapped__ = fn.__name__, fn.__doc__, fn
    return call


for _name, _fn in list(vars(SimHypervisor).items()):
    if not _name.startswith("_") and _name not in ("checkpoint", "refuse_if_poisoned") \
            and callable(_fn) and not isinstance(_fn, (staticmethod, classmethod, type)):
        setattr(SimHypervisor, _name, _poison_on_memory_error(_fn))
del _name, _fn


@contextmanager
def open_host(state_dir: Path | None = None, create: bool = True, save: bool = True,
              spec: DefaultHostSpec | None = None, timeout: float | None = None
              ) -> Iterator[SimHypervisor]:
    """Lock the state directory, load (or create) the saved host, yield dom0's view of it,
    and save it back if the body changed it and raised nothing.  ``timeout``: how long to
    wait for another xenpage holding the lock (None: for ever, saying so) before
    :class:`HostFileError` -- a second host opened while one is held (``--migrate-to``)
    must have one, or two processes migrating towards each other would wait for ever."""
    sd = Path(state_dir or default_state_dir())
    try:
        statefiles.state_dir(sd)
    except OSError as e:
        raise HostFileError(f"{sd}: {e.strerror or e}") from None
    with _state_lock(sd, timeout, record=save):  # a reader leaves the lock file as it was
        path = sd / HOST_DIRNAME
        created = False
        said = persist.tidy(path)  # what a killed save left: removed, or recovered
        if said:
            sys.stderr.write(f"xenpage: {said}\n")
        if (path / "host.json").exists():
            host = Host.load(path)
        elif path.is_dir() and any(path.iterdir()):
            # the rest of a saved host is there: it was damaged, not never created
            raise HostFileError(f"{path}: host.json is missing; the saved host is damaged")
        elif create:
            host = build_host(spec)
            created = True
        else:
            raise HostFileError(f"no saved host in {sd} (create one with 'xenpage host create')")
        hv = SimHypervisor(host)
        hv.state_dir, hv.path = sd, path
        yield hv
        if (save and hv.dirty) or created:  # first use creates the host, whatever reads it
            kept = ""
            if (sd / JOURNAL_NAME).exists():
                kept = (f"; it stays as last saved, with the journal of an interrupted exchange "
                        f"beside it: run 'xenpage recover' once this is fixed")
            if hv.poisoned:
                raise HostFileError(f"not saving the simulated host in {path}: memory ran out "
                                    f"inside one of its hypercalls{kept}")
            try:
                host.save(path)
            except OSError as e:  # a read-only or full state directory: say so, no traceback
                raise HostFileError(f"cannot save the simulated host in {path}: "
                                    f"{e.strerror or e}{kept}") from None
