"""The ``Hypervisor`` protocol over real Xen 4.17, through Debian's libraries (ctypes).

What goes through which library:

* libxenctrl: physinfo, ``XENMEM_maximum_ram_page``, domain info (``xc_domain_getinfolist``),
  pause/unpause/destroy, vCPU hard affinity, ``getpageframeinfo3`` in batches, the v1 grant
  table (``GNTTABOP_setup_table`` for the foreign domain + a read-only map);
* libxenguest: ``XEN_SYSCTL_page_offline_op`` (``xc_mark_page_offline``/``online``/
  ``xc_query_page_offline_status``), ``xc_domain_resume``, the machine-wide M2P (``xc_map_m2p``,
  mapped read-only once);
* libxenforeignmemory: guest frames as an ``(n, 512)`` uint64 numpy view;
* libxenstore: reads and writes;
* translated (HVM/PVH) guests (:mod:`.physmap`): pages by gfn, ``XENMEM_decrease_reservation``
  and ``XENMEM_populate_physmap`` for the guest, gfn -> mfn through dom0's own page tables;
* live migration (:mod:`.migration`): ``xl migrate`` (libxl), both ends on this host;
* libxencall: ``mmu_update``, ``mmuext_op`` and ``XENMEM_exchange`` issued directly with
  hypercall buffers -- libxenctrl's wrappers cannot express what xenpage needs (the page-table
  owner field of ``foreigndom``, the real GPFN in the exchange's out list,
  ``MMU_MACHPHYS_UPDATE``), and upstream's ``xc_exchange_page`` is never used.

Return conventions are the simulator's (:mod:`xenpage.backends.sim`): negative errnos, numpy
batches.  An offline request is never issued from physical CPU 0 (see
:mod:`xenpage.toolstack.pcpu`): if the caller did not pin dom0 away from it, this backend does.
"""

from __future__ import annotations

import ctypes
import mmap
from array import array
import time
from contextlib import contextmanager
from ctypes import POINTER, byref, c_int, c_uint, c_uint32, c_uint64, c_ulong

from .lazynp import np

from ...abi import domctl as D
from ...abi import errno as E
from ...abi import hvm as H
from ...abi import memory as M
from ...abi import sysctl as S
from ...abi import xen as X
from ...abi.kexec import KEXEC_RANGE_MA_XEN
from ...toolstack.hypervisor import CAP_HVM_INPLACE, CAP_MIGRATE, DomainInfo, PhysInfo
from . import libs as L
from . import structs as T
from .migration import MigrationMixin
from .physmap import PhysmapMixin, XenPageData  # noqa: F401  (XenPageData: read_pages' result)

PAGE = X.PAGE_SIZE
#: frames per page-offline sysctl (Xen 4.17 handles the range without preemption)
OFFLINE_CHUNK = 1 << 14
FRAME_MASK = (1 << 40) - 1
_PRESENT, _PSE = 0x1, 0x80


class XenBackendError(OSError):
    """The real-Xen backend cannot start or a library call failed unexpectedly."""

    def __str__(self) -> str:
        return self.strerror if self.strerror else super().__str__()


def _u64ptr(a: np.ndarray):
    return a.ctypes.data_as(POINTER(c_uint64))


class XenHypervisor(PhysmapMixin, MigrationMixin):
    """dom0's privileged interface to the Xen host it runs on."""

    kind = "xen"
    #: proved in the lab on Xen 4.17.7 (tests_xen/test_pvh.py): live migration through xl
    #: migrate, and the in-place retirement of a translated guest's frames with stock
    #: hypercalls (read_pages, decrease_reservation, populate_physmap, write_pages, hvm_p2m)
    capabilities: frozenset[str] = frozenset({CAP_MIGRATE, CAP_HVM_INPLACE})

    def __init__(self, libs: L.Libs | None = None, guard_pcpu0: bool = True):
        try:
            self.L = libs or L.load()
        except L.XenLibraryError as e:
            raise XenBackendError(str(e)) from None
        lib = self.L
        self.guard_pcpu0 = guard_pcpu0
        self._logger = lib.xtl_createlogger_stdiostream(lib.stderr(), L.log_level(), 0)
        L.clear_errno()
        self.xch = lib.xc_interface_open(self._logger, self._logger, 0)
        if not self.xch:
            e = L.errno()
            self.close()
            raise XenBackendError(e, f"xc_interface_open failed ({E.name(e)}): not a Xen control "
                                     "domain, not root, or /dev/xen/privcmd missing")
        self.fmem = lib.xenforeignmemory_open(self._logger, 0)
        self.xcall = lib.xencall_open(self._logger, 0)
        if not self.fmem or not self.xcall:
            e = L.errno()
            self.close()
            raise XenBackendError(e, f"cannot open libxenforeignmemory/libxencall ({E.name(e)})")
        self.xsh = None
        self._max_mfn: int | None = None
        self._fixed: tuple[int, ...] | None = None
        self._m2p: np.ndarray | None = None
        self._m2p_map: tuple[int, int] | None = None
        self._cpumap_size: int | None = None
        self._maps: set = set()

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        lib = self.L
        for m in list(getattr(self, "_maps", ())):
            m.unmap()
        if getattr(self, "_m2p_map", None):
            addr, size = self._m2p_map
            self._m2p = None
            lib.libc.munmap(addr, size)
            self._m2p_map = None
        if getattr(self, "xsh", None):
            lib.xs_close(self.xsh)
            self.xsh = None
        if getattr(self, "xcall", None):
            lib.xencall_close(self.xcall)
            self.xcall = None
        if getattr(self, "fmem", None):
            lib.xenforeignmemory_close(self.fmem)
            self.fmem = None
        if getattr(self, "xch", None):
            lib.xc_interface_close(self.xch)
            self.xch = None
        if getattr(self, "_logger", None):
            lib.xtl_logger_destroy(self._logger)
            self._logger = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- host -----------------------------------------------------------------------------------
    def _physinfo_raw(self) -> T.XenSysctlPhysinfo:
        pi = T.XenSysctlPhysinfo()
        L.clear_errno()
        if self.L.xc_physinfo(self.xch, byref(pi)):
            raise XenBackendError(L.errno(), "xc_physinfo failed")
        return pi

    def xen_version(self) -> str:
        """e.g. ``4.17.7`` (``XENVER_version`` + ``XENVER_extraversion``)."""
        v = self.L.xc_version(self.xch, X.XENVER_version, None)
        extra = ctypes.create_string_buffer(16)
        self.L.xc_version(self.xch, X.XENVER_extraversion, extra)
        return f"{v >> 16}.{v & 0xFFFF}{extra.value.decode(errors='replace')}" if v >= 0 else ""

    def xen_commandline(self) -> str:
        """Xen's command line as it booted (``XENVER_commandline``), "" when refused."""
        buf = ctypes.create_string_buffer(X.XEN_COMMANDLINE_LEN)
        if self.L.xc_version(self.xch, X.XENVER_commandline, buf) < 0:
            return ""
        return buf.value.decode(errors="replace")

    def physinfo(self) -> PhysInfo:
        pi = self._physinfo_raw()
        return PhysInfo(nr_cpus=pi.nr_cpus, total_pages=pi.total_pages, free_pages=pi.free_pages,
                        max_mfn=self.max_mfn(), backend="xen",
                        extra={"xen_version": self.xen_version(), "xen_commandline": self.xen_commandline(),
                               "max_cpu_id": pi.max_cpu_id, "cpu_khz": pi.cpu_khz,
                               "physinfo_max_mfn": pi.max_mfn, "scrub_pages": pi.scrub_pages,
                               "threads_per_core": pi.threads_per_core,
                               "cores_per_socket": pi.cores_per_socket})

    def max_mfn(self) -> int:
        if self._max_mfn is None:
            v = c_ulong()
            L.clear_errno()
            if self.L.xc_maximum_ram_page(self.xch, byref(v)):
                raise XenBackendError(L.errno(), "xc_maximum_ram_page failed")
            self._max_mfn = v.value
        return self._max_mfn

    def xen_fixed_range(self) -> tuple[int, int] | None:
        """``xc_kexec_get_range(KEXEC_RANGE_MA_XEN)``: Xen 4.17.7 in the lab answered
        0x7fa00000 + 0x3a6140, i.e. frames 0x7fa00-0x7fda6, the very frames whose offline it
        refused (EPERM)."""
        if self._fixed is None:
            size, start = c_uint64(), c_uint64()
            L.clear_errno()
            rc = self.L.xc_kexec_get_range(self.xch, KEXEC_RANGE_MA_XEN, 0, byref(size), byref(start))
            self._fixed = (start.value >> 12, (start.value + size.value + 0xFFF) >> 12) \
                if rc == 0 and size.value else ()
        return self._fixed or None

    def split_misaligns(self) -> bool:
        """Every released Xen up to 4.17.7 misaligns free buddies around an offlined frame
        (quirks.py); the fix (2026) is in no 4.17 release."""
        return True

    def page_offline_op(self, cmd: int, start: int, end: int) -> tuple[int, array | None]:
        """The status words come back as ``array('I')`` (uint32, buffer protocol): a query of
        one frame imports no numpy; ``np.asarray`` views it without a copy."""
        if not (0 <= start <= S.MFN_FIELD_MAX and 0 <= end <= S.MFN_FIELD_MAX):
            raise ValueError("page_offline_op: start and end are 32-bit fields")
        fn = {S.sysctl_page_offline: self.L.xc_mark_page_offline,
              S.sysctl_page_online: self.L.xc_mark_page_online,
              S.sysctl_query_page_offline: self.L.xc_query_page_offline_status}.get(cmd)
        if end < start:
            return -E.EINVAL, None
        status = array("I", [S.STATUS_UNTOUCHED]) * (end - start + 1)
        if fn is None:
            return -E.EINVAL, status
        words = (c_uint32 * len(status)).from_buffer(status)   # held until the calls are done
        base = ctypes.addressof(words)
        with self._offline_guard(cmd == S.sysctl_page_offline):
            for s in range(start, end + 1, OFFLINE_CHUNK):
                e = min(end, s + OFFLINE_CHUNK - 1)
                L.clear_errno()
                if fn(self.xch, s, e, ctypes.cast(base + (s - start) * 4, POINTER(c_uint32))):
                    return L.neg_errno(), status
        return 0, status

    def page_offline_each(self, cmd: int, mfns) -> tuple[np.ndarray, np.ndarray]:
        """One libxenctrl call of one frame (``start == end``) per MFN, in the order given,
        into preallocated arrays (no Python object per frame beyond the loop's)."""
        mfns = np.asarray(mfns, dtype=np.int64).ravel()
        if mfns.size and (mfns.min() < 0 or mfns.max() > S.MFN_FIELD_MAX):
            raise ValueError("page_offline_op: start and end are 32-bit fields")
        fn = {S.sysctl_page_offline: self.L.xc_mark_page_offline,
              S.sysctl_page_online: self.L.xc_mark_page_online,
              S.sysctl_query_page_offline: self.L.xc_query_page_offline_status}.get(cmd)
        rcs = np.zeros(mfns.size, dtype=np.int32)
        status = np.full(mfns.size, S.STATUS_UNTOUCHED, dtype=np.uint32)
        if fn is None:
            rcs[:] = -E.EINVAL
            return rcs, status
        one = c_uint32(S.STATUS_UNTOUCHED)
        ptr = ctypes.pointer(one)
        with self._offline_guard(cmd == S.sysctl_page_offline):
            for i, m in enumerate(mfns.tolist()):
                one.value = S.STATUS_UNTOUCHED
                L.clear_errno()
                if fn(self.xch, m, m, ptr):
                    rcs[i] = L.neg_errno()
                status[i] = one.value
        return rcs, status

    @contextmanager
    def _offline_guard(self, offline: bool):
        """Keep an offline off physical CPU 0 even when the caller forgot to (Xen 4.17's
        never-initialised PoD lock of PV domains, xen-lab.md)."""
        if not (offline and self.guard_pcpu0):
            yield
            return
        from ...toolstack.pcpu import off_pcpu0
        d0 = self.domain_info(0)
        nv = d0.nr_vcpus if d0 else 1
        if self.physinfo().nr_cpus < 2 or not any(0 in self.vcpu_affinity(0, v) for v in range(nv)):
            yield
            return
        with off_pcpu0(self):
            yield

    # -- domains --------------------------------------------------------------------------------
    def _getinfo(self, first: int, count: int) -> list[T.XenDomctlGetDomainInfo]:
        arr = (T.XenDomctlGetDomainInfo * count)()
        L.clear_errno()
        n = self.L.xc_domain_getinfolist(self.xch, first, count, arr)
        if n < 0:
            return []
        return [arr[i] for i in range(n)]

    def _raw_info(self, domid: int) -> T.XenDomctlGetDomainInfo | None:
        if not 0 <= domid < X.DOMID_FIRST_RESERVED:
            return None
        got = self._getinfo(domid, 1)
        return got[0] if got and got[0].domain == domid else None

    def _info(self, r: T.XenDomctlGetDomainInfo) -> DomainInfo:
        nv = 0 if r.max_vcpu_id == 0xFFFFFFFF else r.max_vcpu_id + 1
        return DomainInfo(domid=r.domain, flags=r.flags, tot_pages=r.tot_pages, max_pages=r.max_pages,
                          nr_vcpus=nv, name=self.xs_read(f"/local/domain/{r.domain}/name") or "")

    def domain_list(self) -> list[DomainInfo]:
        out, first = [], 0
        while first < X.DOMID_FIRST_RESERVED:
            got = self._getinfo(first, 256)
            out.extend(self._info(r) for r in got)
            if len(got) < 256:
                break
            first = got[-1].domain + 1
        return out

    def domain_info(self, domid: int) -> DomainInfo | None:
        r = self._raw_info(domid)
        return self._info(r) if r is not None else None

    def _rc(self, ret: int) -> int:
        return 0 if ret >= 0 else L.neg_errno()

    def pause(self, domid: int) -> int:
        L.clear_errno()
        return self._rc(self.L.xc_domain_pause(self.xch, domid))

    def unpause(self, domid: int) -> int:
        L.clear_errno()
        return self._rc(self.L.xc_domain_unpause(self.xch, domid))

    def resume(self, domid: int, fast: bool = True) -> int:
        """``xc_domain_resume``; like the simulator, only a domain shut down for suspend
        (anything else would have its vCPU 0's rax overwritten by the cooperative resume)."""
        r = self._raw_info(domid)
        if r is None:
            return -E.ESRCH
        if not (r.flags & D.XEN_DOMINF_shutdown and D.shutdown_reason(r.flags) == X.SHUTDOWN_suspend):
            return -E.EINVAL
        L.clear_errno()
        return self._rc(self.L.xc_domain_resume(self.xch, domid, 1 if fast else 0))

    def destroy(self, domid: int) -> int:
        L.clear_errno()
        return self._rc(self.L.xc_domain_destroy(self.xch, domid))

    def _cpumap_bytes(self) -> int:
        if self._cpumap_size is None:
            n = self.L.xc_get_cpumap_size(self.xch)
            if n <= 0:
                raise XenBackendError(L.errno(), "xc_get_cpumap_size failed")
            self._cpumap_size = n
        return self._cpumap_size

    def vcpu_affinity(self, domid: int, vcpu: int) -> list[int]:
        n = self._cpumap_bytes()
        hard, soft = (ctypes.c_uint8 * n)(), (ctypes.c_uint8 * n)()
        L.clear_errno()
        if self.L.xc_vcpu_getaffinity(self.xch, domid, vcpu, hard, soft, D.XEN_VCPUAFFINITY_HARD):
            raise XenBackendError(L.errno(), f"xc_vcpu_getaffinity(d{domid} v{vcpu}) failed")
        return [i for i in range(n * 8) if hard[i // 8] >> (i % 8) & 1]

    def set_vcpu_affinity(self, domid: int, vcpu: int, cpus: list[int]) -> int:
        n = self._cpumap_bytes()
        want = sorted({int(c) for c in cpus if 0 <= int(c) < n * 8})
        if not want:
            return -E.EINVAL
        hard, soft = (ctypes.c_uint8 * n)(), (ctypes.c_uint8 * n)()
        for c in want:
            hard[c // 8] |= 1 << (c % 8)
        for i in range(n):
            soft[i] = 0xFF
        L.clear_errno()
        return self._rc(self.L.xc_vcpu_setaffinity(self.xch, domid, vcpu, hard, soft,
                                                   D.XEN_VCPUAFFINITY_HARD))

    # -- xenstore -------------------------------------------------------------------------------
    def _xs(self):
        if self.xsh is None:
            L.clear_errno()
            self.xsh = self.L.xs_open(0)
            if not self.xsh:
                raise XenBackendError(L.errno(), "xs_open failed: is xenstored running?")
        return self.xsh

    def xs_read(self, path: str) -> str | None:
        n = c_uint()
        p = self.L.xs_read(self._xs(), T.XBT_NULL, path.encode(), byref(n))
        if not p:
            return None
        try:
            return ctypes.string_at(p, n.value).decode(errors="replace")
        finally:
            self.L.libc.free(p)

    def xs_write(self, path: str, value: str) -> int:
        data = value.encode()
        L.clear_errno()
        ok = self.L.xs_write(self._xs(), T.XBT_NULL, path.encode(), data, len(data))
        return 0 if ok else L.neg_errno()

    def wait(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def now(self) -> float:
        """The host's clock for the migration and in-place timings (``time.monotonic``)."""
        return time.monotonic()

    # -- guest memory -----------------------------------------------------------------------------
    def _m2p_table(self) -> np.ndarray:
        if self._m2p is None:
            mx = self.max_mfn()
            mfn0 = c_ulong()
            L.clear_errno()
            addr = self.L.xc_map_m2p(self.xch, mx, mmap.PROT_READ, byref(mfn0))
            if not addr:
                raise XenBackendError(L.errno(), "xc_map_m2p failed")
            size = -(-mx * 8 // M.M2P_CHUNK_SIZE) * M.M2P_CHUNK_SIZE
            self._m2p_map = (addr, size)
            buf = (c_uint64 * (size // 8)).from_address(addr)
            a = np.frombuffer(buf, dtype=np.uint64)
            a.flags.writeable = False
            self._m2p = a
        return self._m2p

    def m2p(self, mfns) -> np.ndarray:
        mfns = np.asarray(mfns, dtype=np.int64).ravel()
        out = np.full(mfns.size, np.uint64(X.INVALID_M2P_ENTRY), dtype=np.uint64)
        ok = (mfns >= 0) & (mfns < self.max_mfn())
        if ok.any():
            out[ok] = self._m2p_table()[mfns[ok]]
        return out

    def _shared_info(self, domid: int) -> tuple[int, T.ArchSharedInfo | None]:
        r = self._raw_info(domid)
        if r is None:
            return -E.ESRCH, None
        if r.flags & D.XEN_DOMINF_hvm_guest:
            return -E.EINVAL, None
        m = self.map_foreign(domid, [r.shared_info_frame], False)
        if isinstance(m, int):
            return m, None
        try:
            raw = m.array[0].tobytes()
        finally:
            m.unmap()
        off = T.SharedInfo.arch.offset
        return 0, T.ArchSharedInfo.from_buffer_copy(raw[off:off + ctypes.sizeof(T.ArchSharedInfo)])

    def guest_width(self, domid: int) -> int:
        w = c_uint()
        if self.L.xc_domain_get_guest_width(self.xch, domid, byref(w)):
            return 0
        return w.value

    def _p2m_layout(self, domid: int):
        """(rc, kind, arch_shared_info): kind is "tree" (pfn_to_mfn_frame_list_list) or
        "linear" (the virtually mapped list at p2m_vaddr in the address space p2m_cr3, which
        Linux uses when the toolstack sets SIF_VIRT_P2M_4TOOLS, as Xen 4.17's does)."""
        rc, a = self._shared_info(domid)
        if rc:
            return rc, None, None
        if self.guest_width(domid) != 8:
            return -E.EOPNOTSUPP, None, a
        fll = a.pfn_to_mfn_frame_list_list
        if fll not in (0, X.INVALID_MFN) and a.max_pfn:
            return 0, "tree", a
        if a.p2m_cr3 and a.max_pfn:
            return 0, "linear", a
        return -E.EINVAL, None, a

    def _read_entries(self, domid: int, tables: np.ndarray, idx: np.ndarray) -> tuple[int, np.ndarray]:
        """Entry ``idx[i]`` of table frame ``tables[i]`` (read-only foreign maps)."""
        uniq, inv = np.unique(tables, return_inverse=True)
        m = self.map_foreign(domid, uniq, False)
        if isinstance(m, int):
            return m, np.zeros(0, dtype=np.uint64)
        try:
            return 0, m.array[inv, idx].copy()
        finally:
            m.unmap()

    def _linear_p2m_frames(self, domid: int, a: T.ArchSharedInfo) -> tuple[int, np.ndarray]:
        nframes = -(-a.max_pfn // 512)
        va = np.uint64(a.p2m_vaddr) + np.arange(nframes, dtype=np.uint64) * np.uint64(PAGE)
        table = np.full(nframes, a.p2m_cr3 >> 12, dtype=np.uint64)
        for shift in (39, 30, 21, 12):
            rc, ent = self._read_entries(domid, table, ((va >> np.uint64(shift)) & np.uint64(511)).astype(np.int64))
            if rc:
                return rc, np.zeros(0, dtype=np.int64)
            if not ((ent & np.uint64(_PRESENT)) != 0).all():
                return -E.EFAULT, np.zeros(0, dtype=np.int64)
            if shift in (30, 21) and ((ent & np.uint64(_PSE)) != 0).any():
                return -E.EOPNOTSUPP, np.zeros(0, dtype=np.int64)
            table = (ent >> np.uint64(12)) & np.uint64(FRAME_MASK)
        return 0, table.astype(np.int64)

    def pv_p2m_frames(self, domid: int) -> tuple[int, np.ndarray, int]:
        empty = np.zeros(0, dtype=np.int64)
        for _ in range(5):
            rc, kind, a = self._p2m_layout(domid)
            if rc:
                return rc, empty, 0
            n = int(a.max_pfn)
            if kind == "tree":
                nframes = -(-n // 512)
                rc, fl, _ = self.pv_p2m_frame_lists(domid)
                if rc:
                    return rc, empty, 0
                m = self.map_foreign(domid, fl, False)
                if isinstance(m, int):
                    return m, empty, 0
                frames = m.array.ravel()[:nframes].astype(np.int64)
                m.unmap()
                return 0, frames, n
            if a.p2m_generation & 1:      # the guest is changing its P2M mappings
                time.sleep(0.01)
                continue
            rc, frames = self._linear_p2m_frames(domid, a)
            if rc:
                return rc, empty, 0
            rc2, a2 = self._shared_info(domid)
            if rc2 == 0 and a2.p2m_generation == a.p2m_generation:
                return 0, frames, n
        return -E.EAGAIN, empty, 0

    def pv_p2m_frame_lists(self, domid: int) -> tuple[int, np.ndarray, int]:
        """The 3-level tree's frame-list frames and list-of-lists frame.  A guest with a
        linear (virtually mapped) P2M has neither: ``(0, [], -1)`` -- its P2M frames are
        mapped by ordinary page tables, which the exchange re-points like any other."""
        rc, kind, a = self._p2m_layout(domid)
        if rc:
            return rc, np.zeros(0, dtype=np.int64), 0
        if kind == "linear":
            return 0, np.zeros(0, dtype=np.int64), -1
        nfl = -(-(-(-int(a.max_pfn) // 512)) // 512)
        fll = int(a.pfn_to_mfn_frame_list_list)
        m = self.map_foreign(domid, [fll], False)
        if isinstance(m, int):
            return m, np.zeros(0, dtype=np.int64), 0
        fl = m.array[0, :nfl].astype(np.int64)
        m.unmap()
        return 0, fl, fll

    def map_foreign(self, domid: int, mfns, writable: bool):
        mfns = np.ascontiguousarray(np.asarray(mfns, dtype=np.int64).ravel())
        n = mfns.size
        if n == 0:
            return XenForeignMap(self, None, mfns, writable)
        arr = mfns.astype(np.uint64)
        err = np.zeros(n, dtype=np.int32)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        L.clear_errno()
        addr = self.L.xenforeignmemory_map(self.fmem, domid, prot, n, _u64ptr(arr),
                                           err.ctypes.data_as(POINTER(c_int)))
        if not addr:
            return L.neg_errno(E.EINVAL)
        bad = np.flatnonzero(err)
        if bad.size:
            self.L.xenforeignmemory_unmap(self.fmem, addr, n)
            v = int(err[bad[0]])
            return v if v < 0 else -v
        return XenForeignMap(self, addr, mfns, writable)

    def page_types(self, domid: int, mfns) -> tuple[int, np.ndarray]:
        mfns = np.asarray(mfns, dtype=np.int64).ravel()
        out = np.zeros(mfns.size, dtype=np.uint32)
        step = D.GETPAGEFRAMEINFO3_MAX
        for s in range(0, mfns.size, step):
            part = mfns[s:s + step]
            buf = np.where(part < 0, np.uint64(X.INVALID_MFN), part.astype(np.uint64)).astype(np.uint64)
            L.clear_errno()
            if self.L.xc_get_pfn_type_batch(self.xch, domid, buf.size, _u64ptr(buf)):
                return L.neg_errno(), np.zeros(0, dtype=np.uint32)
            out[s:s + part.size] = buf.astype(np.uint32)
        return 0, out

    def grant_entries(self, domid: int) -> tuple[int, np.ndarray]:
        empty = np.zeros(0, dtype=np.uint64)
        if self._raw_info(domid) is None:
            return -E.ESRCH, empty
        if self.L.xc_gnttab_get_version(self.xch, domid) == 2:
            return -E.EOPNOTSUPP, empty
        n = c_int()
        L.clear_errno()
        p = self.L.xc_gnttab_map_table_v1(self.xch, domid, byref(n))
        if not p:
            return L.neg_errno(), empty
        nframes = -(-n.value // (PAGE // ctypes.sizeof(T.GrantEntryV1)))
        try:
            words = np.frombuffer((c_uint64 * n.value).from_address(p), dtype=np.uint64).copy()
        finally:
            self.L.libc.munmap(p, nframes * PAGE)
        return 0, words

    # -- log-dirty (XEN_DOMCTL_shadow_op) ------------------------------------------------------------
    def logdirty_control(self, domid: int, op: int, pages: int = 0, mode: int = 0,
                         packed: bool = False):
        """``xc_shadow_control`` (ENABLE_LOGDIRTY, OFF) and ``xc_logdirty_control`` (CLEAN,
        PEEK: the bitmap of ``pages`` pfns -- a PV guest's log-dirty is indexed by pfn -- into a
        hypercall buffer, then copied out).  ``(rc, bitmap, stats)`` as the simulator gives
        them: a bool array, or with ``packed`` Xen's bytes (bit ``p & 7`` of byte ``p >> 3``)."""
        from ...toolstack.hypervisor import LogDirtyStats
        if op not in (H.XEN_DOMCTL_SHADOW_OP_CLEAN, H.XEN_DOMCTL_SHADOW_OP_PEEK):
            L.clear_errno()
            r = self.L.xc_shadow_control(self.xch, domid, op, None, mode)
            return (0 if r >= 0 else L.neg_errno()), None, None
        nbytes = (int(pages) + 7) // 8
        npages = max(1, -(-nbytes // PAGE))
        buf = T.XcHypercallBuffer()
        stats = T.XcShadowOpStats()
        if not self.L.xc__hypercall_buffer_alloc_pages(self.xch, byref(buf), npages):
            return -E.ENOMEM, None, None
        try:
            ctypes.memset(buf.hbuf, 0, npages * PAGE)
            L.clear_errno()
            r = self.L.xc_logdirty_control(self.xch, domid, op, byref(buf), int(pages), mode, byref(stats))
            if r < 0:
                return L.neg_errno(), None, None
            bits = np.frombuffer((ctypes.c_uint8 * nbytes).from_address(buf.hbuf), dtype=np.uint8).copy() \
                if nbytes else np.zeros(0, dtype=np.uint8)
        finally:
            self.L.xc__hypercall_buffer_free_pages(self.xch, byref(buf), npages)
        if pages % 8 and nbytes:
            bits[-1] &= np.uint8((1 << (pages % 8)) - 1)
        st = LogDirtyStats(int(stats.fault_count), int(stats.dirty_count))
        if packed:
            return 0, bits, st
        return 0, np.unpackbits(bits, count=int(pages), bitorder="little").astype(bool), st

    # -- hypercalls through libxencall --------------------------------------------------------------
    @contextmanager
    def _hbuf(self, size: int):
        p = self.L.xencall_alloc_buffer(self.xcall, max(size, 8))
        if not p:
            raise MemoryError(f"xencall_alloc_buffer({size}) failed")
        try:
            yield p
        finally:
            self.L.xencall_free_buffer(self.xcall, p)

    def mmu_update(self, reqs, foreigndom: int) -> tuple[int, int]:
        reqs = np.ascontiguousarray(np.asarray(reqs, dtype=np.uint64).reshape(-1, 2))
        n = reqs.shape[0]
        if n == 0:
            return 0, 0
        with self._hbuf(n * 16 + 8) as buf:
            ctypes.memmove(buf, reqs.ctypes.data, n * 16)
            done = c_uint32.from_address(buf + n * 16)
            done.value = 0
            L.clear_errno()
            r = self.L.xencall4(self.xcall, X.HYPERVISOR_mmu_update, buf, n, buf + n * 16,
                                foreigndom & 0xFFFFFFFF)
            return (0 if r >= 0 else L.neg_errno()), int(done.value)

    def mmuext_op(self, ops, foreigndom: int) -> tuple[int, int]:
        ops = [(int(c), int(m)) for c, m in ops]
        n = len(ops)
        if n == 0:
            return 0, 0
        sz = ctypes.sizeof(T.MmuextOp)
        with self._hbuf(n * sz + 8) as buf:
            arr = (T.MmuextOp * n).from_address(buf)
            for i, (c, m) in enumerate(ops):
                arr[i].cmd = c
                arr[i].arg1.mfn = m
                arr[i].arg2.src_mfn = 0
            done = c_uint32.from_address(buf + n * sz)
            done.value = 0
            L.clear_errno()
            r = self.L.xencall4(self.xcall, X.HYPERVISOR_mmuext_op, buf, n, buf + n * sz,
                                foreigndom & 0xFFFFFFFF)
            return (0 if r >= 0 else L.neg_errno()), int(done.value)

    def memory_exchange(self, domid: int, in_mfns, out_gpfns, address_bits: int = 0
                        ) -> tuple[int, int, list[int]]:
        ins = np.ascontiguousarray(np.asarray(list(in_mfns), dtype=np.uint64))
        outs = np.ascontiguousarray(np.asarray(list(out_gpfns), dtype=np.uint64))
        n = ins.size
        if outs.size != n:
            return -E.EINVAL, 0, []
        esz = ctypes.sizeof(T.XenMemoryExchange)
        with self._hbuf(esz + 16 * max(n, 1)) as buf:
            pin, pout = buf + esz, buf + esz + 8 * max(n, 1)
            ctypes.memmove(pin, ins.ctypes.data, 8 * n)
            ctypes.memmove(pout, outs.ctypes.data, 8 * n)
            ex = T.XenMemoryExchange.from_address(buf)
            ctypes.memset(buf, 0, esz)
            for res, p in ((ex.in_, pin), (ex.out, pout)):
                res.extent_start.p = p
                res.nr_extents = n
                res.extent_order = 0
                res.mem_flags = 0
                res.domid = domid
            ex.out.mem_flags = M.XENMEMF_address_bits(address_bits)
            ex.nr_exchanged = 0
            L.clear_errno()
            r = self.L.xencall2(self.xcall, X.HYPERVISOR_memory_op, M.XENMEM_exchange, buf)
            rc = 0 if r >= 0 else L.neg_errno()
            nr = int(ex.nr_exchanged)
            out = np.frombuffer((c_uint64 * n).from_address(pout), dtype=np.uint64).astype(np.int64)
            return rc, nr, [int(v) for v in out.tolist()]


class XenForeignMap:
    """Frames of a guest mapped into this process: ``array`` is a live ``(n, 512)`` uint64
    view (read-only unless ``writable``); writes land in the frames directly, so
    :meth:`flush` has nothing to do.  :meth:`unmap` replaces ``array`` with a copy of the
    contents before unmapping, so a stray read afterwards never touches unmapped memory."""

    def __init__(self, hv: XenHypervisor, addr: int | None, mfns: np.ndarray, writable: bool):
        self.hv, self.addr, self.mfns, self.writable = hv, addr, mfns, writable
        n = mfns.size
        if addr is None:
            self.array = np.zeros((0, 512), dtype=np.uint64)
        else:
            buf = (c_uint64 * (n * 512)).from_address(addr)
            self.array = np.frombuffer(buf, dtype=np.uint64).reshape(n, 512)
            if not writable:
                self.array.flags.writeable = False
            hv._maps.add(self)

    def flush(self) -> None:
        if not self.writable:
            raise PermissionError("read-only foreign mapping")

    def unmap(self) -> None:
        if self.addr is not None:
            self.array = self.array.copy()
            self.hv.L.xenforeignmemory_unmap(self.hv.fmem, self.addr, self.mfns.size)
            self.addr = None
            self.hv._maps.discard(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unmap()
