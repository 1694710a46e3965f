"""One simulated Xen 4.17 x86-64 machine: E820, frame table, heap, domains, xenstore.

Boot (``__start_xen`` / ``arch_init_memory``) lays memory out as on the lab's QEMU machine:

* frames of the first MiB, and every valid non-RAM frame below ``max_page``, are shared with
  ``DOMID_IO`` (``share_xen_page_with_guest(pg, dom_io, SHARE_rw)``);
* Xen relocates itself to the top of low memory; its fixed image (``_stext`` ..
  ``__2M_rwdata_end``) is never offlinable, although its freed init region goes to the heap;
* Xen-heap allocations (``alloc_xenheap_pages``) and anonymous allocations exist;
* the rest of RAM is handed to the buddy heap.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..abi import mm
from ..abi.xen import DOMID_IO, DOMID_XEN, SHUTDOWN_crash
from . import persist, start_xen
from .domain import POD_LOCK_CORRUPT, Domain
from .foreign import ForeignMaps
from .grant_table import GrantTables
from .e820 import E820Map, MiB
from .frametable import FrameTable
from .layout import BootLayout
from .page_alloc import Heap, OutOfMemory
from .quirks import HostHang, Quirks
from .xenstore import Xenstore

_U = np.uint64

#: Layout of the relocated Xen image relative to ``xen_phys_start``, in frames, as seen in the
#: lab (Xen 4.17.7 at 0x7f800000: image 0x7fa00-0x7fda6, freed init 0x7fbb7-0x7fc5a).
XEN_IMAGE_OFFSET = 0x200
XEN_IMAGE_FRAMES = 0x3A7
XEN_INIT_OFFSET = 0x1B7
XEN_INIT_FRAMES = 0xA4
#: ``_end - _start`` of that image in bytes (``KEXEC_RANGE_MA_XEN`` in the lab: 0x3a6140)
XEN_IMAGE_BYTES = 0x3A6140
#: First frame of the M2P's 2 MiB chunks (16 MiB).
M2P_BASE = 0x1000
#: ``xen_phys_start`` = top of low RAM rounded down to 2 MiB, minus 6 MiB.
XEN_RELOC_BELOW_TOP = 0x600

SHARED_PAGE_COUNT = _U(mm.PGC_allocated | 1)
SHARED_PAGE_TYPE = _U(mm.PGT_writable_page | mm.PGT_validated | 1)


def _ranges(frames: list[int]) -> list[tuple[int, int]]:
    """Sorted frames as [start, end) runs."""
    out: list[tuple[int, int]] = []
    for m in sorted(frames):
        if out and out[-1][1] == m:
            out[-1] = (out[-1][0], m + 1)
        else:
            out.append((m, m + 1))
    return out


class DomainError(Exception):
    def __init__(self, err: int, msg: str):
        super().__init__(msg)
        self.errno = err


@dataclass
class HostConfig:
    mem_bytes: int = 2048 * MiB
    nr_pcpus: int = 2
    #: Xen-internal Xen-heap frames and anonymous frames allocated at boot
    xenheap_frames: int = 64
    anonymous_frames: int = 32
    quirks: Quirks = field(default_factory=Quirks)
    #: build the machine as a real one was laid out (E820, Xen's image, its own frames,
    #: dom0's): see :mod:`.layout`; None: the derived default layout
    layout: "BootLayout | None" = None


class Host:
    """A simulated machine. Create with :meth:`boot`; persist with :meth:`save`/:meth:`load`."""

    def __init__(self, e820: E820Map, nr_pcpus: int = 2, quirks: Quirks | None = None):
        self.e820 = e820
        #: Xen's command line as booted (``XENVER_commandline``); the simulator sets only
        #: ``badpage=`` (:func:`xenpage.backends.sim.ras.boot`)
        self.cmdline = ""
        self.nframes = e820.max_page
        self.max_page = e820.max_page
        self.ft = FrameTable(self.nframes)
        self.heap = Heap(self.ft)
        self.nr_pcpus = nr_pcpus
        self.quirks = quirks or Quirks()
        self.heap.quirks = self.quirks
        self.domains: dict[int, Domain] = {}
        self.p2m: dict[int, np.ndarray] = {}
        self.xenstore = Xenstore()
        self.grants = GrantTables()
        self.foreign = ForeignMaps()
        #: guest kernel models by domid (see xenpage.guests), run by :meth:`run_guests`
        self.guests: dict[int, object] = {}
        self.next_domid = 1
        self.xen_phys_start = 0
        self.xen_image = (0, 0)  # [start, end) frames
        self.xen_init = (0, 0)
        #: ``_end - _start`` in bytes (what ``KEXEC_RANGE_MA_XEN`` answers)
        self.xen_image_bytes = XEN_IMAGE_BYTES
        self.xenheap_internal: list[int] = []
        #: heads of the 2 MiB chunks holding the M2P (``XENMEM_machphys_mfn_list``)
        self.m2p_chunks: list[int] = []
        self.anonymous: list[int] = []
        #: derived boot (:meth:`_boot_xen`): Xen's early page tables, the frame table's
        #: blocks, and dom0 frames of the given layout that the model left in use
        self.boot_pagetables: list[int] = []
        self.frametable: list[tuple[int, int]] = []
        self.boot_conflicts: list[int] = []
        #: log of notable hypervisor events (domain crashes, ...) as Xen would print them
        self.log: list[str] = []
        #: HVM guests' p2ms (EPT-like, see :mod:`.p2m`); ``p2m[domid]`` is their mfn array
        self.ept: dict = {}
        #: simulated time in seconds (guests run while dom0 waits; operations cost time)
        self.clock = 0.0

    # -- boot ------------------------------------------------------------------------------
    @classmethod
    def boot(cls, cfg: HostConfig | None = None, dom0_pages: int | None = None) -> "Host":
        """``__start_xen``: lay out memory, build dom0, then free Xen's init region
        (``init_done`` runs after dom0 is constructed, so its frames go to later guests)."""
        cfg = cfg or HostConfig()
        lay = cfg.layout
        e820 = E820Map.from_state([list(e) for e in lay.e820]) if lay else E820Map.qemu_pc(cfg.mem_bytes)
        h = cls(e820, cfg.nr_pcpus, cfg.quirks)
        h._init_memory(cfg)
        if lay is not None:
            if lay.xen_boot is not None:
                h._boot_xen(lay)
            else:
                h._boot_layout(lay)
            h._free_init_memory()
            return h
        if dom0_pages is None:
            dom0_pages = min(cfg.mem_bytes // 2, 1024 * MiB) >> 12
        h.create_domain("Domain-0", dom0_pages, domid=0)
        h._free_init_memory()
        return h

    def _take(self, ranges: list[tuple[int, int]]) -> np.ndarray:
        """Withdraw the free frames of ``ranges`` from the heap (in use, count 0)."""
        idx = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges]) if ranges \
            else np.zeros(0, dtype=np.int64)
        idx = idx[self.ft.states_of(idx) == mm.STATE_FREE] if idx.size else idx
        if idx.size:
            self.ft.count_info[idx] = _U(0)
            self.heap.rebuild(int(idx.min()), int(idx.max()) + 1)
        return idx

    def _boot_layout(self, lay: BootLayout) -> None:
        """Xen's own frames and dom0's where the layout puts them (:mod:`.layout`)."""
        xh = self._take(lay.xenheap)
        self.ft.count_info[xh] = _U(mm.PGC_xen_heap)
        self.xenheap_internal = xh.tolist()
        self.anonymous = self._take(lay.anonymous).tolist()
        d0 = self._take(lay.dom0)
        d = self.create_domain("Domain-0", 0, domid=0)
        d.max_pages = d.tot_pages = 0
        if d0.size:
            self.ft.count_info[d0] = _U(mm.PGC_allocated | 1)
            self.ft.set_owner(d0, 0)
            self.ft.set_m2p(d0, np.arange(d0.size, dtype=np.uint64))
            d.tot_pages = d.max_pages = int(d0.size)
            self.p2m[0] = d0.astype(np.uint64)

    def _boot_xen(self, lay: BootLayout) -> None:
        """Xen's own frames derived (:mod:`.start_xen`), dom0's where the layout puts them.

        ``_init_memory`` left RAM on canonical free chunks; here it is taken back and handed
        out as ``__start_xen`` does: boot-allocator frames (early page tables, the frame
        table) in use, the rest to the heap by ``end_boot_allocator`` (to be scrubbed, at the
        tails), then Xen's heap allocations before dom0, the dom0 kernel's module freed, the
        heap scrubbed by the idle CPU, dom0's frames, Xen's later allocations.  A dom0 frame
        the model left in use is a disagreement with the machine: kept in
        :attr:`boot_conflicts`."""
        xb = lay.xen_boot
        ft, heap = self.ft, self.heap
        ram = self.e820.ram_window(0, self.nframes)
        free = np.flatnonzero((ft.states(0, self.nframes) == mm.STATE_FREE) & ram)
        ft.count_info[free] = _U(0)                      # in use, count 0: not the heap's yet
        heap.rebuild(0, self.nframes)
        bf = start_xen.boot_frames(self.e820, self.xen_image, xb)
        self.boot_pagetables = bf.pagetables
        self.frametable = bf.frametable
        self.anonymous = list(bf.pagetables) + [m for a, b in bf.frametable for m in range(a, b)]
        for s, e in bf.heap_ranges:
            for head, order in start_xen.init_heap_chunks(s, e, heap.max_order):
                heap.free(head, order, scrub=True)
        self.m2p_chunks = []
        self._shared_info0 = None
        self._xen_allocs(xb.before_dom0)
        ft.set_m2p_frames(self.m2p_chunks)
        if xb.modules:                                   # discard_initial_images: the kernel
            s, e = xb.modules[0]
            for head, order in start_xen.init_heap_chunks(s, e, heap.max_order):
                heap.free(head, order, scrub=True)
        heap.scrub()
        d0 = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in lay.dom0]) if lay.dom0 \
            else np.zeros(0, dtype=np.int64)
        # the initrd's frames go to dom0 where they lie (dom0_construct_pv), the rest from
        # the heap; so do dom0's frames inside Xen's image: the unused ``ebmalloc`` BSS that
        # ``efi_boot_mem_unused`` gave the boot allocator (1 MiB whose place the image's
        # headers do not tell; ``is_xen_fixed_mfn`` still covers it)
        rd = (d0 >= self.xen_image[0]) & (d0 < self.xen_image[1])
        for s, e in xb.modules[1:]:
            rd |= (d0 >= s) & (d0 < e)
        st = ft.states(0, self.nframes)[d0]
        self.boot_conflicts = d0[(st != mm.STATE_FREE) & ~rd].tolist()
        d0 = np.concatenate([self._take(_ranges(d0[~rd].tolist())), d0[rd & (st == mm.STATE_INUSE)]])
        d0.sort()
        d = self.create_domain("Domain-0", 0, domid=0, shared_info=self._shared_info0)
        d.max_pages = d.tot_pages = 0
        if d0.size:
            ft.count_info[d0] = _U(mm.PGC_allocated | 1)
            ft.set_owner(d0, 0)
            ft.set_m2p(d0, np.arange(d0.size, dtype=np.uint64))
            d.tot_pages = d.max_pages = int(d0.size)
            self.p2m[0] = d0.astype(np.uint64)
        self._xen_allocs(xb.after_dom0)

    def _xen_allocs(self, allocs: list[tuple[str, int]]) -> None:
        """Xen's heap allocations in order: a Xen-heap block (``alloc_xenheap_pages``:
        PGC_xen_heap), an anonymous one (``alloc_domheap_pages(NULL, ...)``), an M2P block
        (anonymous, then shared read-only as DOMID_XEN's by ``subarch_init_memory``), or
        dom0's shared_info (a Xen-heap frame ``arch_domain_create`` shares with it)."""
        for kind, order in allocs:
            m = self.heap.alloc(order)
            sl = slice(m, m + (1 << order))
            if kind == start_xen.SHARED_INFO:            # dom0's, shared when it is created
                self.ft.count_info[sl] = _U(mm.PGC_xen_heap)
                self._shared_info0 = m
            elif kind == start_xen.XENHEAP:
                self.ft.count_info[sl] = _U(mm.PGC_xen_heap)
                self.xenheap_internal += range(m, m + (1 << order))
            elif kind == start_xen.M2P:
                self.ft.count_info[sl] = _U(mm.PGC_allocated | 1)
                self.ft.type_info[sl] = _U(mm.PGT_none | mm.PGT_validated | 1)
                self.ft.set_owner(sl, DOMID_XEN)
                self.m2p_chunks.append(m)
            else:
                self.anonymous += range(m, m + (1 << order))

    def _free_init_memory(self) -> None:
        """``init_done`` -> ``init_xenheap_pages`` -> ``init_heap_pages``: the init region goes
        back to the heap as the largest aligned power-of-two chunks, in address order
        (``_init_heap_pages``); Xen is running by then (``SYS_STATE_active``), so they are not
        scrubbed and each goes to the head of its list -- the first frames handed out
        afterwards, although ``is_xen_fixed_mfn`` still refuses to offline any of them."""
        s, e = self.xen_init
        self.ft.count_info[s:e] = _U(0)
        while s < e:
            order = min(self.heap.max_order, (e - s).bit_length() - 1)
            if s:
                order = min(order, (s & -s).bit_length() - 1)
            self.heap.free(s, order)
            s += 1 << order

    def _init_memory(self, cfg: HostConfig) -> None:
        ft, n = self.ft, self.nframes
        valid = self.e820.valid_window(0, n)
        ram = self.e820.ram_window(0, n)
        # System domains.
        for did, name in ((DOMID_XEN, "Domain-Xen"), (DOMID_IO, "Domain-IO")):
            self.domains[did] = Domain(did, name, privileged=False)
        # dom_io: the first MiB and every valid non-RAM frame.
        io = valid & ~ram
        io[:0x100] = valid[:0x100]
        idx = np.flatnonzero(io)
        ft.count_info[idx] = SHARED_PAGE_COUNT
        ft.type_info[idx] = SHARED_PAGE_TYPE
        ft.set_owner(idx, DOMID_IO)
        # Xen image.
        lay = cfg.layout
        if lay is not None:
            self.xen_phys_start = lay.xen_phys_start
            img = lay.image[0]
            self.xen_image = tuple(lay.image)
            self.xen_init = tuple(lay.init)
            self.xen_image_bytes = lay.image_bytes
        else:
            top = (self.e820.lowmem_ram_end // 512) * 512
            self.xen_phys_start = top - XEN_RELOC_BELOW_TOP
            img = self.xen_phys_start + XEN_IMAGE_OFFSET
            self.xen_image = (img, img + XEN_IMAGE_FRAMES)
            self.xen_init = (img + XEN_INIT_OFFSET, img + XEN_INIT_OFFSET + XEN_INIT_FRAMES)
        # Everything else that is RAM goes to the heap (init_heap_pages), except the image
        # outside its freed init region and the boot allocations below the image.
        heap = ram & ~io
        heap[self.xen_image[0]:self.xen_image[1]] = False
        # The M2P (``paging_init``): 2 MiB chunks of Xen memory, shared read-only with
        # privileged guests as DOMID_XEN's (``share_xen_page_with_privileged_guests``).
        # Placed from 16 MiB up, where the lab machine shows nothing else (Xen's image, dom0's
        # kernel and initrd sit at the top of low memory); real placement varies by host.
        # (derived instead when the layout says how Xen booted: :meth:`_boot_xen`)
        if lay is None or lay.xen_boot is None:
            nchunks = (self.nframes * 8 + (1 << 21) - 1) >> 21
            self.m2p_chunks = [M2P_BASE + c * 512 for c in range(nchunks)]
            m2p_end = M2P_BASE + nchunks * 512
            heap[M2P_BASE:m2p_end] = False
            ft.count_info[M2P_BASE:m2p_end] = _U(mm.PGC_allocated | 1)
            ft.type_info[M2P_BASE:m2p_end] = _U(mm.PGT_none | mm.PGT_validated | 1)
            ft.set_owner(slice(M2P_BASE, m2p_end), DOMID_XEN)
            ft.set_m2p_frames(self.m2p_chunks)
        # by mask: an index array of every heap frame would be 8 bytes a frame
        ft.set_count_info_where(heap, mm.PGC_state_free)
        self.heap.rebuild(0, n)
        # Frames between the relocation base and the image go back to the heap (in the lab the
        # end of dom0's initrd lands there); Xen's run-time anonymous allocations follow.
        self.anonymous = []
        # Xen-heap and anonymous run-time allocations (a given layout places its own).
        if cfg.layout is None:
            for _ in range(cfg.xenheap_frames):
                self.xenheap_internal.append(self.alloc_xenheap_page())
            for _ in range(cfg.anonymous_frames):
                self.anonymous.append(self.heap.alloc(0))

    def is_xen_fixed(self, mfn: int) -> bool:
        """``is_xen_fixed_mfn``: inside Xen's image, ``_stext`` .. ``__2M_rwdata_end`` (its
        freed init region included): ``offline_page`` refuses such a frame for ever."""
        xs, xe = self.xen_image
        return xs <= mfn < xe

    # -- allocation helpers (xen/common/page_alloc.c) --------------------------------------
    def alloc_xenheap_page(self) -> int:
        """``alloc_xenheap_pages(0)``: an in-use frame with PGC_xen_heap, no owner, count 0."""
        m = self.heap.alloc(0)
        self.ft.count_info[m] = _U(mm.PGC_xen_heap)
        return m

    def share_xen_page_with_guest(self, mfn: int, d: Domain) -> None:
        """``share_xen_page_with_guest(pg, d, SHARE_rw)``: owner d, allocated|1, writable type."""
        self.ft.count_info[mfn] = (self.ft.count_info[mfn] & _U(mm.PGC_xen_heap)) | SHARED_PAGE_COUNT
        self.ft.type_info[mfn] = SHARED_PAGE_TYPE
        self.ft.set_owner(mfn, d.domid)
        d.xenheap_pages.append(mfn)

    def alloc_domheap_pages(self, d: Domain, order: int = 0) -> int:
        """``alloc_domheap_pages(d, order, 0)`` + ``assign_pages``: the frames belong to d with
        the allocation reference only (count = PGC_allocated | 1)."""
        if d.tot_pages + (1 << order) > d.max_pages:
            raise DomainError(-12, f"d{d.domid} over its allocation ({d.max_pages} pages)")
        head = self.heap.alloc(order)
        self.assign_pages(d, head, 1 << order)
        return head

    def assign_pages(self, d: Domain, head: int, n: int, count_towards: bool = True) -> None:
        """``assign_pages``: keep only PGC_preserved bits, set allocated|1 and the owner."""
        sl = slice(head, head + n)
        keep = self.ft.count_info[sl] & _U(mm.PGC_preserved)
        self.ft.count_info[sl] = keep | _U(mm.PGC_allocated | 1)
        self.ft.set_owner(sl, d.domid)
        if count_towards:
            d.tot_pages += n

    def free_domheap_pages(self, mfns: np.ndarray) -> list[int]:
        """Free frames whose last reference is gone (``free_domheap_pages``); vectorised over
        many frames; offlining frames become offlined.  Returns those offlined."""
        mfns = np.asarray(mfns, dtype=np.int64)
        if mfns.size == 0:
            return []
        ci = self.ft.count_info[mfns]
        st = (ci & _U(mm.PGC_state)) >> _U(mm.PGC_state_shift)
        if mfns.size <= 8:
            out: list[int] = []
            for m in mfns.tolist():
                # scrubbed (to the tails) when its owner is dying or it has none any more
                # (a frame stolen by XENMEM_exchange); a running domain's goes to the heads
                o = self.ft.owner(m)
                d = self.domains.get(o) if o is not None else None
                scrub = d is None or d.dying
                self.ft.count_info[m] &= _U(mm.PGC_state | mm.PGC_broken)
                out += self.heap.free(m, 0, scrub=scrub)
            return out
        offl = st == _U(mm.STATE_OFFLINING)
        if ((st != _U(mm.STATE_INUSE)) & ~offl).any():
            raise AssertionError("free_domheap_pages on a frame that is not allocated")
        if offl.any() and self.quirks.relinquish_pending_last:
            # relinquish_memory frees a dying domain's pages one by one in its page-list
            # order, in which a pending frame can come after neighbours already merged into
            # a free buddy (quirk relinquish_pending_last: the worst case, pending frames
            # last, one by one)
            out = self.free_domheap_pages(mfns[~offl]) if (~offl).any() else []
            pend = mfns[offl]
            for i in range(0, pend.size, 8):      # the one-by-one path below
                out += self.free_domheap_pages(pend[i:i + 8])
            return out
        broken = (ci & _U(mm.PGC_broken)) != 0
        newstate = np.where(offl, _U(mm.PGC_state_offlined), _U(mm.PGC_state_free))
        self.ft.count_info[mfns] = (ci & _U(mm.PGC_broken)) | newstate
        self.ft.type_info[mfns] = _U(0)
        self.ft.owner1[mfns] = 0
        self.ft.m2p_plus1[mfns] = _U(0)
        self.heap.rebuild(int(mfns.min()), int(mfns.max()) + 1)
        gone = mfns[offl]
        for m, b in zip(gone.tolist(), broken[offl].tolist()):
            (self.heap.broken_list if b else self.heap.offlined_list)[m] = None
        return gone.tolist()

    def put_page(self, mfn: int, n: int = 1) -> list[int]:
        """Drop ``n`` general references; free the frame when the count reaches zero."""
        c = int(self.ft.count_info[mfn])
        cnt = c & mm.PGC_count_mask
        if cnt < n:
            raise AssertionError(f"put_page underflow on mfn {mfn:#x}")
        c -= n
        self.ft.count_info[mfn] = _U(c)
        if cnt == n:
            owner = self.ft.owner(mfn)
            d = self.domains.get(owner) if owner is not None else None
            if d is not None:
                if mfn in d.xenheap_pages:
                    if d.dying:  # free_xenheap_pages: d->xenheap_pages drops
                        d.xenheap_pages.remove(mfn)
                else:
                    d.tot_pages -= 1
            out = self.free_domheap_pages(np.array([mfn]))
            if d is not None and d.dying:
                self._put_dying(d)
            return out
        return []

    # -- domains (xen/common/domain.c, domctl.c) --------------------------------------------
    def domain(self, domid: int) -> Domain:
        d = self.domains.get(domid)
        if d is None or d.is_system:
            raise DomainError(-3, f"no domain {domid}")
        return d

    def guest_domains(self) -> list[Domain]:
        return [d for k, d in sorted(self.domains.items()) if not d.is_system]

    def create_domain(self, name: str, mem_pages: int, hvm: bool = False, domid: int | None = None,
                      vcpus: int = 1, max_pages: int | None = None, pvh: bool = False,
                      shared_info: int | None = None) -> Domain:
        """``XEN_DOMCTL_createdomain`` + populate: ``mem_pages`` frames, P2M and M2P, and a
        Xen-heap shared_info frame shared with the guest.  ``pvh``: a PVH guest (an HVM
        container with HAP and no device model).  The xenstore nodes are libxl's, including
        ``/libxl/<domid>/type`` (how ``libxl__domain_type`` tells PVH from HVM: Xen's
        domain flags do not) and, for an HVM guest, its device model's state node."""
        hvm = hvm or pvh
        if domid is None:
            domid = 0 if 0 not in self.domains else self.next_domid
            if domid:
                self.next_domid += 1
        if domid in self.domains:
            raise DomainError(-17, f"domain {domid} exists")
        d = Domain(domid, name, hvm=hvm, pvh=pvh, privileged=(domid == 0), vcpus=vcpus,
                   max_pages=max_pages or mem_pages,
                   affinity=[list(range(self.nr_pcpus)) for _ in range(vcpus)])
        self.domains[domid] = d
        self.share_xen_page_with_guest(self.alloc_xenheap_page() if shared_info is None else shared_info, d)
        p2m = np.empty(mem_pages, dtype=np.uint64)
        gpfn = 0
        remaining = mem_pages
        chunks = []  # (gfn, mfn, order): an HVM guest's p2m maps them as superpages
        while remaining:
            # meminit_hvm: 1 GiB pages where it can, else 2 MiB, else 4 KiB
            order = min(18 if hvm else 9, remaining.bit_length() - 1)
            try:
                head = self.alloc_domheap_pages(d, order)
            except OutOfMemory:
                if hvm and order > 9:
                    order = 9
                    try:
                        head = self.alloc_domheap_pages(d, order)
                    except OutOfMemory:
                        head = None
                else:
                    head = None
                if head is None:
                    self.destroy_domain(domid)
                    raise DomainError(-12, f"out of memory building d{domid}") from None
            k = 1 << order
            p2m[gpfn:gpfn + k] = np.arange(head, head + k, dtype=np.uint64)
            self.ft.set_m2p(slice(head, head + k), np.arange(gpfn, gpfn + k, dtype=np.uint64))
            chunks.append((gpfn, head, order))
            gpfn += k
            remaining -= k
        if hvm:
            from . import p2m as p2m_mod
            p2m_mod.build(self, domid, chunks, max(mem_pages, d.max_pages), vcpus, d.max_pages)
        else:
            self.p2m[domid] = p2m
        base = f"/local/domain/{domid}"
        self.xenstore.write(0, base, "")
        self.xenstore.set_perms(base, domid, "n")
        self.xenstore.write(0, f"{base}/name", name)
        self.xenstore.write(0, f"{base}/domid", str(domid))
        for sub in ("control", "device", "data"):
            self.xenstore.write(0, f"{base}/{sub}", "")
            self.xenstore.set_perms(f"{base}/{sub}", domid, "n")
        if domid:
            self.xenstore.write(0, f"/libxl/{domid}/type", "pvh" if pvh else ("hvm" if hvm else "pv"))
            if hvm and not pvh:  # qemu-xen, started by libxl for an HVM guest
                self.xenstore.write(0, f"/local/domain/0/device-model/{domid}/state", "running")
            # libxl pre-creates the node a guest may publish its suspend event channel in
            self.xenstore.write(0, f"{base}/device/suspend/event-channel", "")
            self.xenstore.set_perms(f"{base}/device/suspend/event-channel", domid, "n")
        return d

    def owned_frames(self, domid: int) -> np.ndarray:
        return np.flatnonzero(self.ft.owner1 == domid + 1)

    def destroy_domain(self, domid: int, backends_unmap: bool = True) -> list[int]:
        """What ``xl destroy`` does (``libxl__destroy_domid``): the guest's devices are torn
        down first -- the backends in dom0 (blkback, netback, xenconsoled) unmap what they had
        grant-mapped of it and its device model exits, dropping its map cache -- then
        ``XEN_DOMCTL_destroydomain`` (:meth:`domain_kill`) and the guest's xenstore nodes go.

        ``backends_unmap=False``: a backend that does not let go (a stuck blkback) keeps its
        grant maps, and with them the domain as a zombie.  Foreign mappings dom0 processes
        hold (``xenforeignmemory_map``) are no device: they stay, and so does the domain, until
        they are unmapped.  Returns the frames offlined by the frees done now."""
        d = self.domain(domid)
        if d.domid == 0:
            raise DomainError(-1, "dom0 cannot be destroyed")
        from . import foreign, grant_table
        from .hvm import MAPCACHE
        mfns = self.owned_frames(domid)
        if backends_unmap:
            for h, m in list(self.grants.maptrack.items()):
                if m.granter == domid and m.mapper != domid:
                    grant_table.unmap_grant_ref(self, m.mapper, h)
            for h, fm in list(self.foreign.maps.items()):
                if fm.domid == domid and fm.what == MAPCACHE:
                    foreign.unmap(self, h)
        self.domain_kill(domid)
        for path in (f"/local/domain/{domid}", f"/libxl/{domid}",
                     f"/local/domain/0/device-model/{domid}"):
            try:
                self.xenstore.rm(0, path)
            except Exception:
                pass
        return self._offlined_among(mfns)

    def _offlined_among(self, mfns: np.ndarray) -> list[int]:
        """Those of ``mfns`` (frames a domain owned) that are offlined now."""
        st = (self.ft.count_info[mfns] & _U(mm.PGC_state)) >> _U(mm.PGC_state_shift)
        return mfns[st == _U(mm.STATE_OFFLINED)].tolist()

    def domain_kill(self, domid: int) -> list[int]:
        """``domain_kill`` (``XEN_DOMCTL_destroydomain``), Xen's half of a destruction: the
        domain becomes dying (``DOMDYING_dying``, then ``DOMDYING_dead``; getdomaininfo says
        ``XEN_DOMINF_dying``), its mappings of other domains' grants go
        (``gnttab_release_mappings``), Xen drops its own mappings of the guest's pages
        (``unmap_vcpu_info``, ``evtchn_destroy``), and ``domain_relinquish_resources``
        unpins and devalidates its page tables and drops each page's allocation reference
        (``relinquish_memory`` -> ``put_page_alloc_ref``).  A frame nobody else references is
        freed (an offline-pending one becomes offlined); a frame still referenced -- granted
        to a backend that keeps it mapped, mapped by a dom0 process -- stays allocated to
        the domain, which lingers as a zombie until the last such reference goes:
        ``free_domheap_pages`` then drops the domain's reference once ``tot_pages`` reaches 0
        and ``put_domain`` destroys it (:meth:`_put_dying`).  Returns the frames offlined."""
        d = self.domain(domid)
        if d.domid == 0:
            raise DomainError(-1, "dom0 cannot be destroyed")
        if d.dying:
            return []  # DOMDYING_dead: nothing left to do
        if self.quirks.pod_lock_hang and d.pod_lock == POD_LOCK_CORRUPT:
            raise HostHang(f"destroying d{domid} takes its corrupted PoD lock: the host would hang")
        d.dying = True
        from . import foreign, grant_table
        from .mm import relinquish_tables
        grant_table.release_domain(self, domid)
        for h, m in list(self.foreign.maps.items()):
            if m.mapper == domid or (m.domid == domid and m.mapper == DOMID_XEN):
                foreign.unmap(self, h)
        self.guests.pop(domid, None)
        if not d.hvm:
            relinquish_tables(self, d)
        else:
            d.pod_cache = []
        mfns = self.owned_frames(domid)
        ci = self.ft.count_info[mfns]
        alloc = (ci & _U(mm.PGC_allocated)) != 0
        ci = np.where(alloc, (ci & _U(~mm.PGC_allocated & 0xFFFFFFFFFFFFFFFF)) - _U(1), ci)
        self.ft.count_info[mfns] = ci
        gone = mfns[(ci & _U(mm.PGC_count_mask)) == 0]
        xh = np.isin(gone, np.array(d.xenheap_pages, dtype=np.int64))
        # Xen-heap pages go back through free_xenheap_pages, which clears PGC_xen_heap first.
        self.ft.count_info[gone] &= _U(mm.PGC_state | mm.PGC_broken)
        self.free_domheap_pages(gone)
        d.tot_pages -= int((~xh).sum())
        kept = set(d.xenheap_pages) - set(gone[xh].tolist())
        d.xenheap_pages = [m for m in d.xenheap_pages if m in kept]
        self.p2m.pop(domid, None)
        self.ept.pop(domid, None)
        d.p2m_fll_mfn = 0
        d.guest_table = [0] * len(d.guest_table)
        d.guest_table_user = [0] * len(d.guest_table_user)
        self._put_dying(d)
        # send_global_virq(VIRQ_DOM_EXC): xenstored and xenconsoled see the domain dying
        # (@releaseDomain) and unmap its rings
        for h, fm in list(self.foreign.maps.items()):
            if fm.domid == domid and fm.what in foreign.DAEMON_KINDS:
                foreign.unmap(self, h)
        return self._offlined_among(mfns)

    def _put_dying(self, d: Domain) -> None:
        """``put_domain`` of a dying domain once its last page is freed (``free_domheap_pages``
        drops the reference ``assign_pages`` took when ``tot_pages`` left 0; the Xen-heap
        share likewise): ``domain_destroy`` removes it from the domain list."""
        if d.dying and d.tot_pages == 0 and not d.xenheap_pages and self.domains.get(d.domid) is d:
            del self.domains[d.domid]

    def pause(self, domid: int) -> None:
        self.domain(domid).pause_count += 1

    def unpause(self, domid: int) -> None:
        d = self.domain(domid)
        if d.pause_count:
            d.pause_count -= 1

    def shutdown(self, domid: int, reason: int) -> None:
        """``domain_shutdown``: the domain stops running with a reason code."""
        d = self.domain(domid)
        if d.is_shutting_down:
            return
        d.is_shutting_down = True
        d.shutdown_code = reason

    def crash(self, domid: int, why: str) -> None:
        """``domain_crash``: shut down with reason crash (on_crash=preserve keeps it)."""
        self.log.append(f"domain_crash called from {why}: d{domid}")
        d = self.domains.get(domid)
        if d is not None and not d.is_system:
            self.shutdown(domid, SHUTDOWN_crash)

    def resume(self, domid: int) -> None:
        """``XEN_DOMCTL_resumedomain`` (``domain_resume``): clear the shutdown state, run."""
        d = self.domain(domid)
        d.is_shutting_down = False
        d.shutdown_code = 0

    # -- persistence ------------------------------------------------------------------------
    def hypercalls(self, domid: int):
        """The hypercall interface as domain ``domid`` sees it."""
        from .hypercall import Hypercalls
        return Hypercalls(self, domid)

    def run_guests(self, seconds: float) -> None:
        """Let every running guest kernel react to events (xenstore, resume) for a while;
        idle pCPUs scrub the free memory meanwhile (``scrub_free_pages``)."""
        self.clock += seconds
        if seconds > 0:
            self.heap.scrub()
        for domid, g in list(self.guests.items()):
            if domid in self.domains:
                g.run(seconds)

    def pv_p2m(self, domid: int) -> np.ndarray | None:
        """A PV guest's P2M as the guest keeps it in its own frames (through the frame list
        named in its shared_info), or the builder's list for a guest with no kernel model."""
        d = self.domains[domid]
        if d.hvm:
            return self.p2m.get(domid)
        if not d.p2m_fll_mfn:
            return self.p2m.get(domid)
        fll = self.ft.read_page(d.p2m_fll_mfn)
        n = d.p2m_max_pfn
        nframes = (n + 511) // 512
        nfl = (nframes + 511) // 512
        fl_mfns = fll[:nfl].astype(np.int64)
        p2m_frames = np.concatenate([self.ft.read_page(int(m)) for m in fl_mfns])[:nframes].astype(np.int64)
        return np.concatenate([self.ft.read_page(int(m)) for m in p2m_frames])[:n]

    def extra_state(self) -> dict:
        """State of later subsystems (grant tables, foreign maps, guests), JSON-serialisable."""
        return {"grants": self.grants.to_state(), "foreign": self.foreign.to_state(),
                "guests": {str(k): g.to_state() for k, g in self.guests.items()},
                "ept": {str(k): p.to_state() for k, p in self.ept.items()},
                "clock": self.clock}

    def extra_arrays(self) -> dict[str, np.ndarray]:
        """numpy state of later subsystems (guest kernel models), saved in the .npz."""
        out = {}
        for k, g in self.guests.items():
            for name, a in g.arrays().items():
                out[f"guest.{k}.{name}"] = a
        for k, p in self.ept.items():
            for name, a in p.arrays().items():
                out[f"ept.{k}.{name}"] = a
        return out

    def load_extra_state(self, st: dict, arrays: dict[str, np.ndarray] | None = None) -> None:
        self.grants = GrantTables.from_state(st.get("grants", {}))
        self.foreign = ForeignMaps.from_state(st.get("foreign", {}))
        arrays = arrays or {}
        self.clock = float(st.get("clock", 0.0))
        if st.get("ept"):
            from .p2m import P2M
            for k, ps in st["ept"].items():
                pre = f"ept.{k}."
                arrs = {n[len(pre):]: a for n, a in arrays.items() if n.startswith(pre)}
                self.ept[int(k)] = P2M.from_state(ps, self.p2m[int(k)], arrs)
        for d in list(self.domains.values()):  # saved before HVM p2ms were modelled
            if d.hvm and d.domid not in self.ept and d.domid in self.p2m:
                from .p2m import adopt
                adopt(self, d.domid)
        if st.get("guests"):
            from .guest_models import restore as restore_guest
            for k, gs in st["guests"].items():
                pre = f"guest.{k}."
                arrs = {n[len(pre):]: a for n, a in arrays.items() if n.startswith(pre)}
                self.guests[int(k)] = restore_guest(self, int(k), gs, arrs)
        for g in self.guests.values():  # hosts saved before dom0 daemons' maps were tagged
            for m in getattr(g, "daemon_maps", []):
                fm = self.foreign.maps.get(m.get("handle"))
                if fm is not None and not fm.what:
                    fm.what = m.get("what", "")

    def save(self, path: str | os.PathLike) -> None:
        persist.save(self, Path(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Host":
        return persist.load(cls, Path(path))
