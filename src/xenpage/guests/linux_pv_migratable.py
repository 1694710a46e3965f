"""The Linux-like PV guest with what Linux does around a suspend that a live migration needs
(``drivers/xen/manage.c`` ``xen_suspend``, ``arch/x86/xen/suspend_pv.c``, ``grant-table.c``):

* before ``SCHEDOP_shutdown(suspend)``: ``gnttab_suspend`` unmaps the grant-table frames and
  ``xen_pre_suspend`` the shared_info fixmap -- Xen-heap frames that are not in the guest's
  pseudo-physical map, which the save side could not canonicalise ("Bad mfn for L1");
* when the hypercall returns *cancelled* (a fast resume on the same domain): both mapped
  again, as before;
* when it returns in a *new* domain (restored after a migration): ``xen_post_suspend`` and
  friends -- rebuild the P2M frame lists from the P2M the restorer wrote and publish them in
  the new shared_info, map that shared_info, ``gnttab_resume`` (the new domain's grant
  frames), re-grant the rings to the (new) backends, which map them again; the xenstore and
  console daemons map their rings; vcpu_info and the FIFO event-channel pages are registered
  again; the xenstore watch is set again.

:class:`~xenpage.guests.linux_pv.LinuxPV` itself keeps those mappings across a suspend (the
exchange does not need their removal), so only this kind of guest can be live-migrated.
"""

from __future__ import annotations

import numpy as np

from ..abi import grant as G
from ..abi import pte as P
from ..abi import xen as X
from ..hypervisor import grant_table
from .linux_pv import FIX_SHARED_INFO, KERNEL_RW, VMALLOC_L4, LinuxPV, GuestError

_U = np.uint64


class MigratableLinuxPV(LinuxPV):
    kind = "linux-pv-migratable"

    def __init__(self, host, domid: int, seed: int = 1):
        super().__init__(host, domid, seed)
        #: PTEs unmapped before the suspend: [[index in _suspend_ptrs(), value], ...]
        self.unmapped: list[list[int]] = []
        #: set by the restore (vcpu_setcontext): the next resume is in a new domain
        self.migrated_in = False
        self.migrations = 0

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

    # -- the kernel's suspend path ----------------------------------------------------------
    def run(self, seconds: float) -> None:
        d = self.host.domains.get(self.domid)
        if d is None or d.pause_count:
            return
        if self.suspended and not d.is_shutting_down:
            if self.migrated_in:
                try:
                    self._resume_new_domain()
                except GuestError as e:
                    self.faults.append(str(e))
                self.migrated_in = False
                d.suspend_cancelled = False
            else:
                self._remap_after_cancel()
        elif not self.suspended and not d.is_shutting_down:
            path = f"/local/domain/{self.domid}/control/shutdown"
            try:
                req = self.host.xenstore.read(self.domid, path)
            except Exception:
                req = ""
            if req == "suspend":
                self._pre_suspend()
        super().run(seconds)

    # -- persistence ------------------------------------------------------------------------
    def to_state(self) -> dict:
        st = super().to_state()
        st.update(unmapped=self.unmapped, migrated_in=self.migrated_in, migrations=self.migrations)
        return st

    @classmethod
    def from_state(cls, host, domid: int, st: dict, arrs: dict) -> "MigratableLinuxPV":
        g = super().from_state(host, domid, st, arrs)
        g.unmapped = [list(x) for x in st.get("unmapped", [])]
        g.migrated_in = st.get("migrated_in", False)
        g.migrations = st.get("migrations", 0)
        return g
