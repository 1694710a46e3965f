"""A Linux 6.1-like x86-64 PV guest kernel, acting on the simulated host only through
hypercalls, xenstore and writes to its own memory.

What it builds at boot, as Linux does on Xen PV (arch/x86/xen/mmu_pv.c, p2m.c, grant-table.c),
for a guest of N pages (P = ceil(N/512) P2M pages, K kernel-image pages):

==========  ==========================================================  =====================
level       tables                                                      pinned by the guest
==========  ==========================================================  =====================
L4          ``init_top_pgt`` (swapper_pg_dir); per process a kernel      all (MMUEXT_PIN_L4)
            and a user pgd (``xen_pgd_alloc``)
L3          direct map ceil(N/2^27) (``level3_ident_pgt``);              none
            ``level3_kernel_pgt``; vmalloc 1; ``level3_user_vsyscall``
            (slot 511 of every user pgd); per process 1
L2          direct map ceil(N/2^18); ``level2_kernel_pgt``;               none
            ``level2_fixmap_pgt``; vmalloc 1; per process 1
L1          direct map ceil(N/512) and vmalloc ceil((P+1+G)/512)          direct map, vmalloc and
            (``xen_alloc_pte_init`` / ``xen_alloc_ptpage`` pin each);    user L1s (MMUEXT_PIN_L1);
            kernel image ceil(K/512) and ``level1_fixmap_pgt`` x2       not the image/fixmap
            (from the domain builder / .bss); per process the user L1s   ones
==========  ==========================================================  =====================

* the direct map of all its RAM through L1 tables (no superpages in PV) at
  ``0xffff888000000000`` (L4 slot 273); frames used as page tables are mapped read-only,
  everything else read-write and NX;
* the kernel image mapped a second time at ``0xffffffff80000000`` (L4 slot 511, L3 slot
  510), the fixmap at L3 slot 511 (L2 slots 506-507), holding the read-write mapping of
  shared_info (``FIX_PARAVIRT_BOOTMAP``);
* the P2M list in its own frames (plus the 3-level frame list that the toolstack follows
  from shared_info), also mapped virtually (vmalloc area, L4 slot 402), and the G grant-table
  frames mapped read-write after it (``arch_gnttab_map_shared``);
* processes with private, shared and read-only user pages; vCPU0's CR3 and user CR3 point
  at the first process's pair;
* ring pages granted to dom0 and mapped by its backends; granted-but-unmapped buffers; the
  xenstore and console rings mapped by dom0's daemons (foreign mappings);
* vcpu_info placement (``VCPUOP_register_vcpu_info``) and the FIFO event-channel control
  block and first event-array page (``EVTCHNOP_init_control`` / ``expand_array``): pages
  Xen maps for itself, holding a general and a writable type reference each.

Every data frame's content is a 64-bit fingerprint; the guest knows what each page should
hold (``expect``) and can verify all of it at any time.  It answers the xenstore suspend
protocol: ``control/shutdown`` = ``suspend`` makes it clear the node and call
``SCHEDOP_shutdown(SHUTDOWN_suspend)``, doing around it what Linux does so that it can be
live-migrated (``drivers/xen/manage.c`` ``xen_suspend``, ``arch/x86/xen/suspend_pv.c``,
``grant-table.c``):

* before the hypercall: ``gnttab_suspend`` unmaps the grant-table frames and
  ``xen_pre_suspend`` the shared_info fixmap -- Xen-heap frames that are not in the guest's
  pseudo-physical map, which a migration's save side could not canonicalise ("Bad mfn for
  L1");
* when the hypercall returns *cancelled* (a fast resume on the same domain): both mapped
  again, and the kernel carries on;
* when it returns in a *new* domain (restored after a migration): ``xen_post_suspend`` and
  friends -- rebuild the P2M frame lists from the P2M the restorer wrote and publish them in
  the new shared_info, map that shared_info, ``gnttab_resume`` (the new domain's grant
  frames), re-grant the rings to the (new) backends, which map them again; the xenstore and
  console daemons map their rings; vcpu_info and the FIFO event-channel pages are registered
  again; the xenstore watch is set again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..abi import grant as G
from ..abi import pte as P
from ..abi import xen as X
from ..hypervisor import grant_table
from ..hypervisor.memory import Reservation

_U = np.uint64

# Page roles
DATA, KTEXT, L1T, L2T, L3T, L4T, P2M, P2M_FL, P2M_FLL, RING, XS_RING, CONS_RING, FREE, XEN_MAPPED = range(14)
ROLE_NAMES = ["data", "kernel-text", "L1", "L2", "L3", "L4", "p2m", "p2m-frame-list",
              "p2m-frame-list-list", "grant-ring", "xenstore-ring", "console-ring", "free",
              "xen-mapped"]
#: pages registered with Xen, which maps them itself: vcpu_info (xen_vcpu_setup), the FIFO
#: event-channel control block and first event-array page (evtchn_fifo_init)
XEN_MAPPED_PAGES = ("vcpu_info", "evtchn_fifo_control", "evtchn_fifo_array")
TABLE_ROLES = (L1T, L2T, L3T, L4T)

DIRECT_L4 = 273
VMALLOC_L4 = 402
KERNEL_L4 = 511
KERNEL_L3 = 510
FIXMAP_L3 = 511            # level3_kernel_pgt[511] -> level2_fixmap_pgt
FIXMAP_L2 = (506, 507)     # level2_fixmap_pgt[506..507] -> level1_fixmap_pgt[0..1]
FIX_SHARED_INFO = 0x1E0    # FIX_PARAVIRT_BOOTMAP, an entry of level1_fixmap_pgt[0]
VSYSCALL_L4 = 511          # user pgd slot of level3_user_vsyscall
USER_BASE_L2 = 2  # user pages from 4 MiB

KERNEL_RW = P._PAGE_PRESENT | P._PAGE_RW | P._PAGE_ACCESSED | P._PAGE_DIRTY | P._PAGE_NX
KERNEL_RO = P._PAGE_PRESENT | P._PAGE_ACCESSED | P._PAGE_NX
KERNEL_TEXT = P._PAGE_PRESENT | P._PAGE_ACCESSED
TABLE_LINK = P._PAGE_PRESENT | P._PAGE_RW | P._PAGE_ACCESSED | P._PAGE_DIRTY | P._PAGE_USER
USER_RW = P._PAGE_PRESENT | P._PAGE_RW | P._PAGE_USER | P._PAGE_ACCESSED | P._PAGE_DIRTY | P._PAGE_NX
USER_RO = P._PAGE_PRESENT | P._PAGE_USER | P._PAGE_ACCESSED | P._PAGE_NX


class GuestError(Exception):
    pass


@dataclass
class Process:
    pid: int
    kpgd: int        # pfn of the kernel L4
    upgd: int        # pfn of the user L4
    ul3: int
    ul2: int
    ul1: list[int]   # pfns of user L1 tables (512 pages each, from 4 MiB)
    #: virtual page index (from 4 MiB) -> (pfn, flags)
    pages: dict[int, list[int]] = field(default_factory=dict)

    def to_state(self) -> dict:
        d = dict(self.__dict__)
        d["pages"] = {str(k): v for k, v in self.pages.items()}
        return d

    @classmethod
    def from_state(cls, st: dict) -> "Process":
        st = dict(st)
        st["pages"] = {int(k): v for k, v in st["pages"].items()}
        return cls(**st)


@dataclass
class Layout:
    nr_pages: int
    nr_procs: int = 3
    user_pages: int = 48
    shared_pages: int = 4
    ro_pages: int = 4
    rings: int = 2
    granted_unmapped: int = 2
    free_pool: int = 64


class LinuxPV:
    kind = "linux-pv"

    def __init__(self, host, domid: int, seed: int = 1):
        self.host = host
        self.domid = domid
        self.seed = seed
        self.hc = host.hypercalls(domid)
        self.rng = np.random.default_rng(seed)
        self.role = np.zeros(0, dtype=np.int8)
        self.expect = np.zeros(0, dtype=np.uint64)   # fingerprint each data pfn must hold
        self.kflags = np.zeros(0, dtype=np.uint64)   # intended direct-map flags per pfn
        self.procs: list[Process] = []
        self.tables: dict[str, object] = {}
        self.rings: list[dict] = []       # {"pfn", "ref", "handle"}
        self.granted: list[dict] = []     # {"pfn", "ref"}
        self.daemon_maps: list[dict] = []  # {"pfn", "handle", "what"}
        self.free: list[int] = []
        self.suspended = False
        self.suspends = 0
        self.resumes = 0
        self.log: list[str] = []
        self.steps = 0
        self.scrub_pos = 0
        self.faults: list[str] = []
        #: PTEs unmapped before the suspend: [[index in _suspend_ptrs(), value], ...]
        self.unmapped: list[list[int]] = []
        #: set by the restore (vcpu_setcontext): the next resume is in a new domain
        self.migrated_in = False
        self.migrations = 0
        #: the kernel checks all its memory when it resumes (what the tests rely on; a real
        #: guest does not: benchmarks of big guests switch it off and check once at the end)
        self.verify_on_resume = True

    # -- P2M ----------------------------------------------------------------------------
    def _words(self, mfns) -> np.ndarray:
        """The concatenated words of some of the guest's own frames (no copies per frame)."""
        ft = self.host.ft
        return np.concatenate([ft.pages[m] if m in ft.pages else ft.read_page(m)
                               for m in (int(x) for x in mfns)])

    def p2m_frames(self) -> np.ndarray:
        """MFNs of the P2M frames, through the frame-list-list named in shared_info and the
        frame lists (what the toolstack follows, and may rewrite)."""
        d = self.host.domains[self.domid]
        nframes = (d.p2m_max_pfn + 511) // 512
        nfl = (nframes + 511) // 512
        fl = self.host.ft.read_page(d.p2m_fll_mfn)[:nfl]
        return self._words(fl)[:nframes].astype(np.int64)

    def p2m(self) -> np.ndarray:
        """The guest's own P2M, read from its P2M frames (what the toolstack may rewrite)."""
        n = self.host.domains[self.domid].p2m_max_pfn
        return self._words(self.p2m_frames())[:n].astype(np.int64)

    def mfns(self, pfns) -> np.ndarray:
        """P2M entries of a few pfns, reading only the P2M frames that hold them."""
        pfns = np.asarray(pfns, dtype=np.int64)
        frames = self.p2m_frames()
        out = np.empty(pfns.size, dtype=np.int64)
        for i, pf in enumerate(pfns.tolist()):
            m = int(frames[pf // 512])
            p = self.host.ft.pages.get(m)
            out[i] = int(p[pf % 512]) if p is not None else int(self.host.ft.read_page(m)[pf % 512])
        return out

    def mfn(self, pfn: int) -> int:
        return int(self.mfns([pfn])[0])

    def _data_pfns(self) -> np.ndarray:
        c = getattr(self, "_data_cache", None)
        if c is None or c[0] is not self.role:
            c = (self.role, np.flatnonzero(self.role == DATA))
            self._data_cache = c
        return c[1]

    # -- boot -----------------------------------------------------------------------------
    @classmethod
    def boot(cls, host, domid: int, seed: int = 1, layout: Layout | None = None) -> "LinuxPV":
        g = cls(host, domid, seed)
        g._boot(layout or Layout(nr_pages=host.domains[domid].tot_pages))
        host.guests[domid] = g
        return g

    def _boot(self, lay: Layout) -> None:
        h = self.host
        d = h.domains[self.domid]
        n = lay.nr_pages
        builder_p2m = h.p2m[self.domid].astype(np.int64)  # from the domain builder
        if builder_p2m.size != n:
            raise GuestError("layout does not match the domain's memory")
        role = np.full(n, DATA, dtype=np.int8)
        cursor = [0]

        def take(k: int, r: int) -> np.ndarray:
            a = np.arange(cursor[0], cursor[0] + k, dtype=np.int64)
            if a.size and a[-1] >= n:
                raise GuestError("guest too small for its layout")
            role[a] = r
            cursor[0] += k
            return a

        from ..hypervisor.grant_table import DEFAULT_FRAMES
        ktext_n = max(8, min(4096, n // 16))
        ktext = take(ktext_n, KTEXT)
        nl1 = (n + 511) // 512
        nl2 = (nl1 + 511) // 512
        nl3 = (nl2 + 511) // 512
        d_l1, d_l2, d_l3 = take(nl1, L1T), take(nl2, L2T), take(nl3, L3T)
        np2m = (n + 511) // 512
        nfl = (np2m + 511) // 512
        p2m_pfns, fl_pfns, fll_pfn = take(np2m, P2M), take(nfl, P2M_FL), take(1, P2M_FLL)
        k_l3, k_l2 = take(1, L3T), take(1, L2T)
        k_l1 = take((ktext_n + 511) // 512, L1T)
        fix_l2, fix_l1 = take(1, L2T), take(len(FIXMAP_L2), L1T)
        v_l3, v_l2 = take(1, L3T), take(1, L2T)
        # the P2M list, a guard page, then the grant frames (arch_gnttab_map_shared)
        gnt_vslot = np2m + 1
        v_l1 = take((gnt_vslot + DEFAULT_FRAMES + 511) // 512, L1T)
        swapper = take(1, L4T)
        vsyscall_l3 = take(1, L3T)
        procs_pt = []
        for _ in range(lay.nr_procs):
            nul1 = 1 + (lay.user_pages + lay.shared_pages + lay.ro_pages) // 512
            procs_pt.append((int(take(1, L4T)[0]), int(take(1, L4T)[0]), int(take(1, L3T)[0]),
                             int(take(1, L2T)[0]), take(nul1, L1T).tolist()))
        xs_ring, cons_ring = int(take(1, XS_RING)[0]), int(take(1, CONS_RING)[0])
        ring_pfns = take(lay.rings, RING)
        granted_pfns = take(lay.granted_unmapped, DATA)
        xen_pfns = take(len(XEN_MAPPED_PAGES), XEN_MAPPED)
        user_pfns = take(lay.nr_procs * lay.user_pages, DATA)
        shared_pfns = take(lay.shared_pages, DATA)
        ro_pfns = take(lay.ro_pages, DATA)
        free_pfns = take(lay.free_pool, FREE)

        mfn = builder_p2m
        ft = h.ft
        zero = np.zeros(512, dtype=np.uint64)
        for pf in np.flatnonzero(np.isin(role, TABLE_ROLES)).tolist():
            ft.write_page(int(mfn[pf]), zero)
            ft.table(int(mfn[pf]))
        # Content: a fingerprint for every data-like page.
        fp = self.rng.integers(1, 2**63, size=n, dtype=np.int64).view(np.uint64)
        datalike = np.isin(role, (DATA, KTEXT, RING, XS_RING, CONS_RING, FREE, XEN_MAPPED))
        ft.set_fingerprint(mfn[datalike], fp[datalike])
        fp[~datalike] = 0
        expect, fp = fp, None  # the same array: a big guest's memory is not held twice

        # P2M frames, frame list, frame-list-list (guest memory).
        for i, pf in enumerate(p2m_pfns.tolist()):
            row = np.full(512, _U(X.INVALID_MFN), dtype=np.uint64)
            part = mfn[i * 512:(i + 1) * 512]
            row[:part.size] = part.astype(np.uint64)
            ft.write_page(int(mfn[pf]), row)
            ft.table(int(mfn[pf]))
        fl_words = np.zeros(nfl * 512, dtype=np.uint64)
        fl_words[:np2m] = mfn[p2m_pfns].astype(np.uint64)
        for i, pf in enumerate(fl_pfns.tolist()):
            ft.write_page(int(mfn[pf]), fl_words[i * 512:(i + 1) * 512])
            ft.table(int(mfn[pf]))
        fll = np.zeros(512, dtype=np.uint64)
        fll[:nfl] = mfn[fl_pfns].astype(np.uint64)
        ft.write_page(int(mfn[fll_pfn[0]]), fll)
        ft.table(int(mfn[fll_pfn[0]]))
        d.p2m_fll_mfn = int(mfn[fll_pfn[0]])
        d.p2m_max_pfn = n

        # Direct map: every pfn, page tables read-only.
        is_table = np.isin(role, TABLE_ROLES)
        kflags = np.where(is_table, _U(KERNEL_RO), _U(KERNEL_RW))
        self._fill_l1s(mfn, d_l1, mfn, kflags)
        self._fill_upper(mfn, d_l2, mfn[d_l1])
        self._fill_upper(mfn, d_l3, mfn[d_l2])
        # Kernel image mapping (text read-only, executable) and the fixmap beside it.
        self._fill_l1s(mfn, k_l1, mfn[ktext], np.full(ktext.size, _U(KERNEL_TEXT)))
        self._fill_upper(mfn, k_l2, mfn[k_l1])
        self._set(mfn, k_l3[0], KERNEL_L3, int(mfn[k_l2[0]]), TABLE_LINK)
        self._set(mfn, k_l3[0], FIXMAP_L3, int(mfn[fix_l2[0]]), TABLE_LINK)
        for slot, l1pf in zip(FIXMAP_L2, fix_l1.tolist()):
            self._set(mfn, fix_l2[0], slot, int(mfn[l1pf]), TABLE_LINK)
        shared_info = d.xenheap_pages[0]  # xen_start_info->shared_info
        self._set(mfn, fix_l1[0], FIX_SHARED_INFO, shared_info, KERNEL_RW)
        # The P2M list mapped in the vmalloc area.
        self._fill_l1s(mfn, v_l1, mfn[p2m_pfns], np.full(np2m, _U(KERNEL_RW)))
        self._fill_upper(mfn, v_l2, mfn[v_l1])
        self._fill_upper(mfn, v_l3, mfn[v_l2])

        def kernel_l4(pf: int) -> None:
            ft.write_page(int(mfn[pf]), np.zeros(512, dtype=np.uint64))
            self._set(mfn, pf, DIRECT_L4, int(mfn[d_l3[0]]), TABLE_LINK)
            self._set(mfn, pf, VMALLOC_L4, int(mfn[v_l3[0]]), TABLE_LINK)
            self._set(mfn, pf, KERNEL_L4, int(mfn[k_l3[0]]), TABLE_LINK)

        kernel_l4(int(swapper[0]))

        # Processes.
        procs: list[Process] = []
        upos = 0
        for pid, (kpgd, upgd, ul3, ul2, ul1) in enumerate(procs_pt):
            kernel_l4(kpgd)
            for pf in (ul3, ul2, *ul1):
                ft.write_page(int(mfn[pf]), np.zeros(512, dtype=np.uint64))
            for j, l1pf in enumerate(ul1):
                self._set(mfn, ul2, USER_BASE_L2 + j, int(mfn[l1pf]), TABLE_LINK)
            self._set(mfn, ul3, 0, int(mfn[ul2]), TABLE_LINK)
            for pgd in (kpgd, upgd):
                self._set(mfn, pgd, 0, int(mfn[ul3]), TABLE_LINK)
            # xen_pgd_alloc: the user pgd reaches the vsyscall page through a shared L3
            self._set(mfn, upgd, VSYSCALL_L4, int(mfn[vsyscall_l3[0]]), TABLE_LINK)
            pr = Process(pid, kpgd, upgd, ul3, ul2, list(ul1))
            vp = 0
            for pf in user_pfns[upos:upos + lay.user_pages].tolist():
                pr.pages[vp] = [pf, USER_RW]
                vp += 1
            upos += lay.user_pages
            if pid < 2:
                for pf in shared_pfns.tolist():
                    pr.pages[vp] = [pf, USER_RW]
                    vp += 1
            for pf in ro_pfns.tolist():
                pr.pages[vp] = [pf, USER_RO]
                vp += 1
            for v, (pf, fl) in pr.pages.items():
                self._set(mfn, ul1[v // 512], v % 512, int(mfn[pf]), fl)
            procs.append(pr)

        self.role, self.expect, self.kflags, self.procs = role, expect, kflags, procs
        self.tables = {"direct_l1": d_l1.tolist(), "direct_l2": d_l2.tolist(),
                       "direct_l3": d_l3.tolist(), "ktext": [int(ktext[0]), int(ktext.size)],
                       "kernel_l3": int(k_l3[0]), "kernel_l2": int(k_l2[0]),
                       "kernel_l1": k_l1.tolist(), "fixmap_l2": int(fix_l2[0]),
                       "fixmap_l1": fix_l1.tolist(), "vmalloc_l3": int(v_l3[0]),
                       "vmalloc_l2": int(v_l2[0]), "vmalloc_l1": v_l1.tolist(),
                       "vsyscall_l3": int(vsyscall_l3[0]), "gnt_vslot": int(gnt_vslot),
                       "swapper": int(swapper[0]),
                       "p2m": p2m_pfns.tolist(), "fl": fl_pfns.tolist(), "fll": int(fll_pfn[0])}
        self.free = free_pfns.tolist()

        # Pin as Linux does: every L1 of the direct map and of the vmalloc area
        # (xen_alloc_pte_init / xen_alloc_ptpage with split PTE locks) and the user L1s
        # (xen_pgd_pin), then the L4s (which validates the rest of each tree); finally load
        # CR3 of process 0.
        l1_pins = np.concatenate([d_l1, v_l1] + [np.array(pr.ul1, dtype=np.int64) for pr in procs])
        pins = [(X.MMUEXT_PIN_L1_TABLE, int(m)) for m in mfn[l1_pins].tolist()]
        l4s = [int(mfn[swapper[0]])]
        for pr in procs:
            l4s += [int(mfn[pr.kpgd]), int(mfn[pr.upgd])]
        pins += [(X.MMUEXT_PIN_L4_TABLE, m) for m in l4s]
        rc, done = self.hc.mmuext_op(pins)
        if rc:
            raise GuestError(f"pinning the kernel's page tables failed ({rc}) after {done}")
        cur = procs[0] if procs else None
        if cur is not None:
            for cmd, pf in ((X.MMUEXT_NEW_BASEPTR, cur.kpgd), (X.MMUEXT_NEW_USER_BASEPTR, cur.upgd)):
                rc, _ = self.hc.mmuext_op([(cmd, int(mfn[pf]))])
                if rc:
                    raise GuestError(f"loading CR3 failed ({rc})")

        # The builder's P2M is no longer the truth: the guest's own frames are.
        h.p2m.pop(self.domid, None)

        # Grants: the grant frames mapped in the vmalloc area; rings to dom0's backends
        # (mapped), buffers granted but not mapped.
        gframes = grant_table.setup_table(h, self.domid)
        reqs = [[(int(mfn[v_l1[(gnt_vslot + i) // 512]]) << 12) | (((gnt_vslot + i) % 512) * 8),
                 P.make_pte(g, KERNEL_RW)] for i, g in enumerate(gframes)]
        rc, done = self.hc.mmu_update(np.array(reqs, dtype=np.uint64))
        if rc:
            raise GuestError(f"mapping the grant table failed ({rc}) after {done}")
        ref = 8  # the first refs are reserved, as in Linux
        for pf in ring_pfns.tolist():
            grant_table.write_entry(h, self.domid, ref, G.GTF_permit_access, 0, int(mfn[pf]))
            st, handle = h.hypercalls(0).grant_map(self.domid, ref, G.GNTMAP_host_map)
            if st != G.GNTST_okay:
                raise GuestError(f"dom0 backend could not map ring grant {ref}: {st}")
            self.rings.append({"pfn": pf, "ref": ref, "handle": handle})
            ref += 1
        for pf in granted_pfns.tolist():
            grant_table.write_entry(h, self.domid, ref, G.GTF_permit_access, 0, int(mfn[pf]))
            self.granted.append({"pfn": pf, "ref": ref})
            ref += 1
        # xenstored and xenconsoled map the rings (foreign mappings by dom0).
        for pf, what in ((xs_ring, "xenstored"), (cons_ring, "xenconsoled")):
            rc, handle = h.hypercalls(0).foreign_map(self.domid, [int(mfn[pf])], True)
            if rc:
                raise GuestError(f"{what} could not map the ring ({rc})")
            h.foreign.maps[handle].what = what  # a dom0 daemon's: let go when the guest dies
            self.daemon_maps.append({"pfn": pf, "handle": handle, "what": what})
        # vcpu_info placement and the FIFO event-channel ABI: Xen maps those pages itself
        regs = (self.hc.register_vcpu_info, self.hc.evtchn_init_control, self.hc.evtchn_expand_array)
        for what, reg, pf in zip(XEN_MAPPED_PAGES, regs, xen_pfns.tolist()):
            rc = reg(int(mfn[pf]))
            if rc:
                raise GuestError(f"registering {what} with Xen failed ({rc})")
        self.tables["xen_mapped"] = dict(zip(XEN_MAPPED_PAGES, xen_pfns.tolist()))
        h.xenstore.watch(self.domid, f"/local/domain/{self.domid}/control/shutdown", "shutdown")
        self.log.append(f"booted: {n} pages, {int(is_table.sum())} page-table frames, "
                        f"{len(procs)} processes")

    def _set(self, mfn, table_pfn: int, idx: int, target_mfn: int, flags: int) -> None:
        self.host.ft.table(int(mfn[table_pfn]))[idx] = _U(P.make_pte(target_mfn, flags))

    def _fill_l1s(self, mfn, l1_pfns, targets, flags) -> None:
        k = targets.size
        step = 4096  # tables filled at a time (16 MiB of entries: no guest-sized temporaries)
        for s0 in range(0, l1_pfns.size, step):
            pfs = l1_pfns[s0:s0 + step]
            lo, hi = s0 * 512, min(k, (s0 + pfs.size) * 512)
            words = np.zeros(pfs.size * 512, dtype=np.uint64)
            if hi > lo:
                words[:hi - lo] = (targets[lo:hi].astype(np.uint64) << _U(12)) | flags[lo:hi].astype(np.uint64)
            for i, pf in enumerate(pfs.tolist()):
                self.host.ft.write_page(int(mfn[pf]), words[i * 512:(i + 1) * 512])
                self.host.ft.table(int(mfn[pf]))

    def _fill_upper(self, mfn, pfns, targets) -> None:
        self._fill_l1s(mfn, pfns, targets, np.full(targets.size, _U(TABLE_LINK)))

    # -- virtual memory -------------------------------------------------------------------
    def walk(self, l4_mfn: int, va: int) -> tuple[int, int] | None:
        """Hardware walk: (mfn, leaf PTE) or None when not present."""
        m = l4_mfn
        for shift in (39, 30, 21):
            e = int(self.host.ft.read_page(m)[(va >> shift) & 511])
            if not e & P._PAGE_PRESENT:
                return None
            m = P.pte_frame(e)
        e = int(self.host.ft.read_page(m)[(va >> 12) & 511])
        if not e & P._PAGE_PRESENT:
            return None
        return P.pte_frame(e), e

    @staticmethod
    def user_va(vp: int) -> int:
        return (USER_BASE_L2 << 21) + vp * 4096

    @staticmethod
    def direct_va(pfn: int) -> int:
        return 0xFFFF888000000000 + pfn * 4096

    def _proc_write(self, pr: Process, vp: int, fp: int) -> None:
        res = self.walk(self.mfn(pr.upgd), self.user_va(vp))
        if res is None or not res[1] & P._PAGE_RW:
            self.faults.append(f"pid {pr.pid} write fault at {self.user_va(vp):#x}")
            return
        self.host.ft.set_fingerprint(res[0], fp)
        self.hc.wrote([res[0]])
        self.expect[pr.pages[vp][0]] = fp

    # -- workload ---------------------------------------------------------------------------
    def step(self, n: int = 1) -> None:
        """Run ``n`` workload operations (writes through user and kernel mappings, mapping
        and unmapping pages, sharing, granting)."""
        if self.suspended or self.host.domains[self.domid].is_shutting_down:
            return
        for _ in range(n):
            self.steps += 1
            op = self.rng.integers(0, 10)
            if op < 5 and self.procs:
                pr = self.procs[int(self.rng.integers(0, len(self.procs)))]
                rw = [v for v, (_, fl) in pr.pages.items() if fl & P._PAGE_RW]
                if rw:
                    vp = rw[int(self.rng.integers(0, len(rw)))]
                    self._proc_write(pr, vp, int(self.rng.integers(1, 2**63)))
            elif op < 7:
                data = self._data_pfns()
                pf = int(data[int(self.rng.integers(0, data.size))])
                m = self.mfn(pf)
                fp = int(self.rng.integers(1, 2**63))
                self.host.ft.set_fingerprint(m, fp)
                self.hc.wrote([m])
                self.expect[pf] = fp
            elif op < 9 and self.procs:
                self._map_or_unmap()
            else:
                self._scrub()

    #: pfns the running guest re-reads per scrub step
    SCRUB_WINDOW = 1 << 16

    def _scrub(self) -> None:
        """The running kernel reading back a window of its memory (a rotating cursor): any
        page whose content is not what it wrote becomes a fault that :meth:`verify` reports."""
        n = self.expect.size
        if n == 0:
            return
        a = self.scrub_pos % n
        b = min(n, a + self.SCRUB_WINDOW)
        self.scrub_pos = b % n
        frames = self.p2m_frames()[a // 512:(b + 511) // 512]
        m2 = self._words(frames)[a % 512:a % 512 + (b - a)].astype(np.int64)
        exp = self.expect[a:b]
        chk = np.flatnonzero(exp != 0)
        bad = chk[self.host.ft.content[m2[chk]] != exp[chk]]
        for i in bad[:3].tolist():
            msg = f"scrub: pfn {a + i:#x} (mfn {int(m2[i]):#x}) content changed"
            if msg not in self.faults:
                self.faults.append(msg)

    def _map_or_unmap(self) -> None:
        pr = self.procs[int(self.rng.integers(0, len(self.procs)))]
        mine = [v for v, (pf, fl) in pr.pages.items() if self.role[pf] == FREE]
        if mine and (not self.free or self.rng.integers(0, 2)):
            vp = mine[0]
            pf, _ = pr.pages[vp]
            ptr = (self.mfn(pr.ul1[vp // 512]) << 12) | ((vp % 512) * 8)
            rc, _ = self.hc.mmu_update(np.array([[ptr, 0]], dtype=np.uint64))
            if rc:
                self.faults.append(f"unmap failed {rc}")
                return
            del pr.pages[vp]
            self.free.append(pf)
            return
        if not self.free:
            return
        vp = max(pr.pages) + 1 if pr.pages else 0
        if vp >= 512 * len(pr.ul1):
            return
        pf = self.free.pop(0)
        l1m, pm = self.mfns([pr.ul1[vp // 512], pf]).tolist()
        ptr = (l1m << 12) | ((vp % 512) * 8)
        rc, _ = self.hc.mmu_update(np.array([[ptr, P.make_pte(pm, USER_RW)]], dtype=np.uint64))
        if rc:
            self.faults.append(f"map failed {rc}")
            self.free.insert(0, pf)
            return
        pr.pages[vp] = [pf, USER_RW]

    # -- page-table activity (what a running kernel does to its tables) -------------------------
    def _pte_write(self, table_pfn: int, idx: int, val: int, via: str = "mmu") -> int:
        """One entry of one of its tables: batched through ``mmu_update`` (lazy MMU mode) or
        written straight through its read-only mapping of an L1, which Xen emulates
        (``native_set_pte`` -> ptwr)."""
        tm = self.mfn(table_pfn)
        if via == "ptwr":
            return self.hc.ptwr_write(tm, idx, val)
        rc, _ = self.hc.mmu_update(np.array([[(tm << 12) | (idx * 8), val]], dtype=np.uint64))
        return rc

    def map_pfn(self, proc: int, pf: int, via: str = "mmu") -> int | None:
        """Map ``pf`` read-write at the lowest free user page of process ``proc`` (a page of
        the free pool: it leaves the pool); returns the virtual page or ``None``."""
        if pf not in self.free:
            return None  # in use (mapped, or a table): a kernel maps only free pages anew
        pr = self.procs[proc % len(self.procs)]
        vp = next((v for v in range(512 * len(pr.ul1)) if v not in pr.pages), None)
        if vp is None:
            return None
        rc = self._pte_write(pr.ul1[vp // 512], vp % 512, P.make_pte(self.mfn(pf), USER_RW), via)
        if rc:
            self.faults.append(f"map of pfn {pf:#x} failed ({rc})")
            return None
        self.free.remove(pf)
        pr.pages[vp] = [pf, USER_RW]
        return vp

    def unmap_vp(self, proc: int, vp: int, via: str = "mmu") -> bool:
        """Unmap a user page mapped from the free pool (it goes back to the pool)."""
        pr = self.procs[proc % len(self.procs)]
        if vp not in pr.pages or self.role[pr.pages[vp][0]] != FREE:
            return False
        rc = self._pte_write(pr.ul1[vp // 512], vp % 512, 0, via)
        if rc:
            self.faults.append(f"unmap of va {self.user_va(vp):#x} failed ({rc})")
            return False
        self.free.append(pr.pages.pop(vp)[0])
        return True

    def grow_l1(self, proc: int) -> int | None:
        """A new user L1 for process ``proc`` from the free pool, as Linux makes one
        (``pte_alloc`` -> ``xen_alloc_pte``): cleared, made read-only in the direct map,
        pinned (``MMUEXT_PIN_L1_TABLE``), then linked into the process's L2.  Its pfn."""
        pr = self.procs[proc % len(self.procs)]
        j = len(pr.ul1)
        if not self.free or USER_BASE_L2 + j >= 512:
            return None
        pf = self.free.pop()
        m = self.mfn(pf)
        self.host.ft.write_page(m, np.zeros(512, dtype=np.uint64))  # clear_page
        self.hc.wrote([m])
        self.expect[pf] = 0
        d_l1 = self.tables["direct_l1"]
        if self._pte_write(d_l1[pf // 512], pf % 512, P.make_pte(m, KERNEL_RO)):
            self.faults.append(f"direct map of new L1 pfn {pf:#x} not made read-only")
            return None
        self.kflags[pf] = KERNEL_RO
        rc, _ = self.hc.mmuext_op([(X.MMUEXT_PIN_L1_TABLE, m)])
        if rc or self._pte_write(pr.ul2, USER_BASE_L2 + j, P.make_pte(m, TABLE_LINK)):
            self.faults.append(f"new L1 pfn {pf:#x} not pinned or linked ({rc})")
            return None
        self.role[pf] = L1T
        pr.ul1.append(pf)
        return pf

    def shrink_l1(self, proc: int) -> int | None:
        """Free the last user L1 a process grew (``free_pte_range``): its pages unmapped,
        unlinked from the L2, unpinned, writable again in the direct map, back in the pool."""
        pr = self.procs[proc % len(self.procs)]
        j = len(pr.ul1) - 1
        if j < 1 or any(v // 512 == j and self.role[pf] != FREE for v, (pf, _) in pr.pages.items()):
            return None
        for v in sorted(v for v in pr.pages if v // 512 == j):
            if not self.unmap_vp(proc, v):
                return None
        pf = pr.ul1[j]
        m = self.mfn(pf)
        if self._pte_write(pr.ul2, USER_BASE_L2 + j, 0):
            self.faults.append(f"L1 pfn {pf:#x} not unlinked")
            return None
        rc, _ = self.hc.mmuext_op([(X.MMUEXT_UNPIN_TABLE, m)])
        d_l1 = self.tables["direct_l1"]
        if rc or self._pte_write(d_l1[pf // 512], pf % 512, P.make_pte(m, KERNEL_RW)):
            self.faults.append(f"L1 pfn {pf:#x} not unpinned or made writable ({rc})")
            return None
        pr.ul1.pop()
        self.role[pf] = FREE
        self.kflags[pf] = KERNEL_RW
        fp = int(self.rng.integers(1, 2**63))
        self.host.ft.set_fingerprint(m, fp)
        self.hc.wrote([m])
        self.expect[pf] = fp
        self.free.append(pf)
        return pf

    # -- checks -------------------------------------------------------------------------------
    #: pfns checked at a time by :meth:`verify` (a 256 GiB guest is never held twice)
    VERIFY_CHUNK = 1 << 22

    def _p2m_at(self, pfns) -> np.ndarray:
        """P2M entries of ``pfns``, reading only the P2M frames that hold them (vectorised)."""
        pfns = np.asarray(pfns, dtype=np.int64)
        rows = np.unique(pfns // 512)
        words = self._words(self.p2m_frames()[rows]).reshape(-1, 512)
        return words[np.searchsorted(rows, pfns // 512), pfns % 512].astype(np.int64)

    def verify(self) -> list[str]:
        """Everything the guest can check about its own memory; returns the problems."""
        bad: list[str] = []
        ft = self.host.ft
        frames = self.p2m_frames()
        n = int(self.host.domains[self.domid].p2m_max_pfn)
        d_l1 = np.asarray(self.tables["direct_l1"], dtype=np.int64)
        l1_mfns = self._p2m_at(d_l1)
        nb = [0, 0, 0]
        keep = ~_U(P._PAGE_USER)
        mask = _U(0xFFF | P._PAGE_NX)
        for a in range(0, n, self.VERIFY_CHUNK):
            b = min(n, a + self.VERIFY_CHUNK)
            m2 = self._words(frames[a // 512:(b + 511) // 512])[:b - a].astype(np.int64)
            exp = self.expect[a:b]
            chk = np.flatnonzero(exp != 0)
            wrong = chk[ft.content[m2[chk]] != exp[chk]]
            for i in wrong.tolist()[:10 - nb[0]]:
                bad.append(f"pfn {a + i:#x} (mfn {int(m2[i]):#x}) content changed")
            nb[0] += min(wrong.size, 10)
            # direct map: every pfn mapped to its P2M frame with its intended flags
            l1 = self._words(l1_mfns[a // 512:(b + 511) // 512])[:b - a]
            fr = ((l1 >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)
            mism = np.flatnonzero(fr != m2)
            for i in mism.tolist()[:10 - nb[1]]:
                bad.append(f"direct map of pfn {a + i:#x} names mfn {int(fr[i]):#x}, P2M says {int(m2[i]):#x}")
            nb[1] += min(mism.size, 10)
            # Xen adds GUEST_KERNEL|USER to kernel mappings; compare the guest-set bits
            kf = self.kflags[a:b]
            fl_bad = np.flatnonzero(((l1 & mask) & keep) != ((kf & mask) & keep))
            for i in fl_bad.tolist()[:10 - nb[2]]:
                bad.append(f"direct map flags of pfn {a + i:#x}: {P.flag_names(int(l1[i]))}, "
                           f"wanted {P.flag_names(int(kf[i]))}")
            nb[2] += min(fl_bad.size, 10)
        # user mappings resolve to the right frame with the right permissions
        need = sorted({p for pr in self.procs for p in (pr.upgd, pr.kpgd, *(v[0] for v in pr.pages.values()))})
        at = dict(zip(need, self._p2m_at(need).tolist())) if need else {}
        for pr in self.procs:
            for root in (pr.upgd, pr.kpgd):
                for vp, (pf, fl) in pr.pages.items():
                    res = self.walk(at[root], self.user_va(vp))
                    if res is None:
                        bad.append(f"pid {pr.pid} va {self.user_va(vp):#x} not present")
                    elif res[0] != at[pf] or (res[1] & P._PAGE_RW) != (fl & P._PAGE_RW):
                        bad.append(f"pid {pr.pid} va {self.user_va(vp):#x} -> {res[0]:#x} "
                                   f"{P.flag_names(res[1])}, wanted {at[pf]:#x} {P.flag_names(fl)}")
        bad += self.faults
        return bad

    # -- around the suspend ---------------------------------------------------------------
    def _ptr(self, table_pfn: int, idx: int) -> int:
        return (self.mfn(table_pfn) << 12) | (idx * 8)

    def _suspend_ptrs(self) -> list[int]:
        t = self.tables
        ptrs = [self._ptr(t["fixmap_l1"][0], FIX_SHARED_INFO)]
        v_l1, slot = t["vmalloc_l1"], t["gnt_vslot"]
        for i in range(len(self.host.grants.frames.get(self.domid, []))):
            ptrs.append(self._ptr(v_l1[(slot + i) // 512], (slot + i) % 512))
        return ptrs

    def _pre_suspend(self) -> None:
        ft = self.host.ft
        ptrs = self._suspend_ptrs()
        saved = []
        for i, ptr in enumerate(ptrs):
            v = int(ft.table(ptr >> 12)[(ptr & 0xFFF) // 8])
            if v & P._PAGE_PRESENT:
                saved.append([i, v])
        if saved:
            rc, done = self.hc.mmu_update(np.array([[ptrs[i], 0] for i, _ in saved], dtype=np.uint64))
            if rc:
                self.faults.append(f"pre-suspend unmap failed ({rc}) after {done}")
                saved = saved[:done]
        self.unmapped = saved

    def _remap_after_cancel(self) -> None:
        if self.unmapped:
            # found again by pfn: a table frame may have been exchanged meanwhile
            ptrs = self._suspend_ptrs()
            rc, done = self.hc.mmu_update(np.array([[ptrs[i], v] for i, v in self.unmapped],
                                                   dtype=np.uint64))
            if rc:
                self.faults.append(f"post-suspend remap failed ({rc}) after {done}")
        self.unmapped = []

    # -- resuming in a new domain -----------------------------------------------------------
    def _vmalloc_va(self, i: int) -> int:
        va = (VMALLOC_L4 << 39) | (i << 12)
        return va | 0xFFFF000000000000 if VMALLOC_L4 >= 256 else va

    def _resume_new_domain(self) -> None:
        h, d = self.host, self.host.domains[self.domid]
        ft = h.ft
        t = self.tables
        n = int(self.role.size)
        np2m = len(t["p2m"])
        # The P2M is reachable through its vmalloc mapping (the restorer localised it).
        root = d.guest_table[0]
        p2m_mfns = []
        for i in range(np2m):
            res = self.walk(root, self._vmalloc_va(i))
            if res is None:
                raise GuestError(f"P2M page {i} not mapped after the restore")
            p2m_mfns.append(res[0])
        p2m = np.concatenate([ft.read_page(m) for m in p2m_mfns])[:n].astype(np.int64)
        # xen_build_mfn_list_list: the frame list and the frame-list-list, in shared_info
        fl_words = np.zeros(len(t["fl"]) * 512, dtype=np.uint64)
        fl_words[:np2m] = np.array(p2m_mfns, dtype=np.uint64)
        for i, pf in enumerate(t["fl"]):
            ft.write_page(int(p2m[pf]), fl_words[i * 512:(i + 1) * 512])
            ft.table(int(p2m[pf]))
        fll = np.zeros(512, dtype=np.uint64)
        fll[:len(t["fl"])] = p2m[np.array(t["fl"], dtype=np.int64)].astype(np.uint64)
        ft.write_page(int(p2m[t["fll"]]), fll)
        ft.table(int(p2m[t["fll"]]))
        d.p2m_fll_mfn = int(p2m[t["fll"]])
        d.p2m_max_pfn = n
        # shared_info (the new domain's) and the grant frames, mapped again
        gframes = grant_table.setup_table(h, self.domid)
        ptrs = self._suspend_ptrs()
        vals = [P.make_pte(d.xenheap_pages[0], KERNEL_RW)] + [P.make_pte(g, KERNEL_RW) for g in gframes]
        rc, done = self.hc.mmu_update(np.array([[p, v] for p, v in zip(ptrs, vals)], dtype=np.uint64))
        if rc:
            raise GuestError(f"mapping shared_info and the grant table failed ({rc})")
        self.unmapped = []
        # xenbus: the rings are granted again and the new backends map them
        for r in self.rings:
            grant_table.write_entry(h, self.domid, r["ref"], G.GTF_permit_access, 0, int(p2m[r["pfn"]]))
            st, handle = h.hypercalls(0).grant_map(self.domid, r["ref"], G.GNTMAP_host_map)
            if st != G.GNTST_okay:
                raise GuestError(f"backend could not map ring grant {r['ref']}: {st}")
            r["handle"] = handle
        for r in self.granted:
            grant_table.write_entry(h, self.domid, r["ref"], G.GTF_permit_access, 0, int(p2m[r["pfn"]]))
        for m in self.daemon_maps:
            rc, handle = h.hypercalls(0).foreign_map(self.domid, [int(p2m[m["pfn"]])], True)
            if rc:
                raise GuestError(f"{m['what']} could not map the ring ({rc})")
            h.foreign.maps[handle].what = m["what"]
            m["handle"] = handle
        regs = {"vcpu_info": self.hc.register_vcpu_info,
                "evtchn_fifo_control": self.hc.evtchn_init_control,
                "evtchn_fifo_array": self.hc.evtchn_expand_array}
        for what, pf in self.tables.get("xen_mapped", {}).items():
            rc = regs[what](int(p2m[pf]))
            if rc:
                raise GuestError(f"registering {what} again failed ({rc})")
        h.xenstore.watch(self.domid, f"/local/domain/{self.domid}/control/shutdown", "shutdown")
        self.migrations += 1
        self.log.append(f"resumed in a new domain d{self.domid} after a migration")

    # -- the kernel's suspend path --------------------------------------------------------
    def run(self, seconds: float) -> None:
        """React to xenstore and to being resumed (not while the domain is paused)."""
        d = self.host.domains.get(self.domid)
        if d is None or d.pause_count:
            return
        if self.suspended and not d.is_shutting_down:
            # resumed: in a new domain after a migration, or a cancelled (fast) suspend
            if self.migrated_in:
                try:
                    self._resume_new_domain()
                except GuestError as e:
                    self.faults.append(str(e))
                self.migrated_in = False
            else:
                self._remap_after_cancel()
            self.suspended = False
            self.resumes += 1
            cancelled = d.suspend_cancelled
            d.suspend_cancelled = False
            problems = self.verify() if self.verify_on_resume else []
            self.log.append(f"resumed (cancelled={cancelled}); memory check: "
                            f"{'ok' if not problems else problems[:3]}")
        path = f"/local/domain/{self.domid}/control/shutdown"
        try:
            req = self.host.xenstore.read(self.domid, path)
        except Exception:
            req = ""
        if req == "suspend" and not d.is_shutting_down:
            self.host.xenstore.write(self.domid, path, "")
            self._pre_suspend()
            self.suspended = True
            self.suspends += 1
            self.hc.sched_shutdown(X.SHUTDOWN_suspend)
            self.log.append("suspending (control/shutdown = suspend)")
        elif req == "poweroff":
            self.host.xenstore.write(self.domid, path, "")
            self.hc.sched_shutdown(X.SHUTDOWN_poweroff)

    # -- facts for tools and tests ------------------------------------------------------------
    def pfns_of(self, role: int) -> np.ndarray:
        return np.flatnonzero(self.role == role)

    def user_pages(self, kind: str = "private") -> list[int]:
        """pfns mapped in user space: ``private`` (one process), ``shared`` (two), ``ro``."""
        seen: dict[int, list[int]] = {}
        for pr in self.procs:
            for vp, (pf, fl) in pr.pages.items():
                seen.setdefault(pf, []).append(fl)
        if kind == "shared":
            return sorted(pf for pf, f in seen.items() if len(f) >= 2 and all(x & P._PAGE_RW for x in f))
        if kind == "ro":
            return sorted(pf for pf, f in seen.items() if not any(x & P._PAGE_RW for x in f))
        return sorted(pf for pf, f in seen.items() if len(f) == 1 and f[0] & P._PAGE_RW)

    def kernel_only_pages(self) -> list[int]:
        """Data pages mapped only by the direct map."""
        mapped = {pf for pr in self.procs for pf, _ in pr.pages.values()}
        special = {r["pfn"] for r in self.rings} | {r["pfn"] for r in self.granted}
        return [int(p) for p in np.flatnonzero(self.role == DATA) if p not in mapped and p not in special]

    # -- persistence --------------------------------------------------------------------------
    def arrays(self) -> dict[str, np.ndarray]:
        return {"role": self.role, "expect": self.expect, "kflags": self.kflags,
                "rng": np.frombuffer(repr(self.rng.bit_generator.state).encode(), dtype=np.uint8)}

    def to_state(self) -> dict:
        return {"kind": self.kind, "seed": self.seed, "procs": [p.to_state() for p in self.procs],
                "tables": self.tables, "rings": self.rings, "granted": self.granted,
                "daemon_maps": self.daemon_maps, "free": self.free, "suspended": self.suspended,
                "suspends": self.suspends, "resumes": self.resumes, "log": self.log[-200:],
                "steps": self.steps, "faults": self.faults, "scrub_pos": self.scrub_pos,
                "unmapped": self.unmapped, "migrated_in": self.migrated_in,
                "migrations": self.migrations}

    @classmethod
    def from_state(cls, host, domid: int, st: dict, arrs: dict) -> "LinuxPV":
        import ast
        g = cls(host, domid, st["seed"])
        g.role, g.expect, g.kflags = arrs["role"], arrs["expect"], arrs["kflags"]
        g.rng.bit_generator.state = ast.literal_eval(arrs["rng"].tobytes().decode())
        g.procs = [Process.from_state(p) for p in st["procs"]]
        for k in ("tables", "rings", "granted", "daemon_maps", "free", "suspended", "suspends",
                  "resumes", "log", "steps", "faults"):
            setattr(g, k, st[k])
        g.scrub_pos = st.get("scrub_pos", 0)
        g.unmapped = [list(x) for x in st.get("unmapped", [])]
        g.migrated_in = st.get("migrated_in", False)
        g.migrations = st.get("migrations", 0)
        return g


def populate(host, domid: int, gpfns: list[int]) -> list[int]:
    """Grow the guest (balloon up) through ``XENMEM_populate_physmap``."""
    n, mfns = host.hypercalls(domid).populate_physmap(Reservation(list(gpfns)))
    return mfns
