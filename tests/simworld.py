"""Test support for the reliability tests and the soak run (simulator only; not shipped in the
package): small hosts, a guest's
*logical image* (what the guest can observe, independent of which machine frames hold it),
and "world actions" that other parties perform between two hypercalls of the toolstack.

Two images are compared to decide what an interrupted or failed operation did:

* ``physical`` -- P2M, and per frame content, type and count: bit-identical means "rolled
  back" (or never started);
* ``logical`` -- per *pseudo-physical* page: content (page-table entries and P2M words that
  name the guest's own frames translated to PFNs through the M2P), type and count: equal
  means the guest sees exactly the memory it had -- an exchange that completed keeps it.
"""

from __future__ import annotations

import hashlib
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from xenpage.abi import grant as G
from xenpage.abi import mm
from xenpage.abi import pte as P
from xenpage.abi import sysctl as S
from xenpage.backends.sim import DefaultHostSpec, SimHypervisor, build_host
from xenpage.hypervisor import invariants, sysctl
from xenpage.hypervisor.quirks import Quirks

_U = np.uint64
_STATE_MASK = _U(~mm.PGC_state & 0xFFFFFFFFFFFFFFFF)

#: The worlds of the reliability tests drive Xen directly too (raw offlines, machine checks,
#: domains destroyed with pending frames), where Xen 4.17 misaligns its free buddies by
#: itself; they check xenpage against the fixed split (tests/test_split_guard.py and the
#: default host check the 4.17 one).
SMALL = DefaultHostSpec(mem_mib=128, dom0_mib=32, pv_guests=(("pv1", 8), ("pv2", 8)),
                        hvm_guests=(("hvm1", 4),), pvh_guests=(), nr_pcpus=2, seed=7,
                        quirks=Quirks(reserve_misaligned=False))


#: SMALL with a PVH guest beside the HVM one (the state machine's host)
SMALL_PVH = dataclasses.replace(SMALL, pvh_guests=(("pvh1", 4),))


def small_host(spec: DefaultHostSpec | None = None):
    """A 128 MiB host: dom0 (32 MiB), two Linux-like PV guests (8 MiB) and an HVM guest."""
    host = build_host(spec or SMALL)
    return host, SimHypervisor(host)


@dataclass(frozen=True)
class Image:
    p2m: bytes = field(repr=False)
    physical: str
    logical: str
    #: the logical content alone (no counts or types: other parties may map the pages)
    content: str = ""

    def same_memory(self, other: "Image") -> bool:
        return self.logical == other.logical

    def same_content(self, other: "Image") -> bool:
        return self.content == other.content


def occupy_freed_fixed_frames(host) -> list[int]:
    """Xen-heap allocations (``alloc_xenheap_pages``) until no free frame of Xen's fixed
    range is left: Xen frees its init region once it runs, unscrubbed, so those frames head
    the free lists and the next allocations -- a new domain's first frames -- land there,
    where ``offline_page`` refuses them (EPERM).  Tests of other behaviours start from a host
    on which such allocations already took them."""
    xs, xe = host.xen_image
    taken = []
    for _ in range(4 * (xe - xs)):
        if not (host.ft.states(xs, xe - xs) == mm.STATE_FREE).any():
            break
        m = host.alloc_xenheap_page()
        host.xenheap_internal.append(m)
        taken.append(m)
    return taken


def image(host, domid: int) -> Image:
    """The guest's memory as it can see it (see the module docstring)."""
    from xenpage.guests import linux_pv as L
    g = host.guests.get(domid)
    p2m = host.pv_p2m(domid)
    p2m = np.asarray(p2m).astype(np.int64)
    ft = host.ft
    n = p2m.size
    ok = (p2m >= 0) & (p2m < host.nframes)
    mf = np.where(ok, p2m, 0)
    ph = hashlib.blake2b(digest_size=16)
    lo = hashlib.blake2b(digest_size=16)
    co = _Tee(lo)
    ph.update(p2m.tobytes())
    ci = np.where(ok, ft.count_info[mf] & _STATE_MASK, _U(0))
    ti = np.where(ok, ft.type_info[mf], _U(0))
    for h in (ph, lo):
        h.update(ci.tobytes())
        h.update(ti.tobytes())
    lo = co
    role = g.role if g is not None else np.zeros(n, dtype=np.int8)
    own = host.ft.owner1.astype(np.int64) - 1
    m2p = ft.m2p_plus1.astype(np.int64) - 1
    for pf in range(n):
        if not ok[pf]:
            continue
        m = int(p2m[pf])
        if m in ft.pages:
            words = ft.pages[m]
        else:
            c = int(ft.content[m])
            ph.update(c.to_bytes(8, "little"))
            lo.update(c.to_bytes(8, "little"))
            continue
        ph.update(words.tobytes())
        r = int(role[pf]) if pf < role.size else -1
        if r in (L.L1T, L.L2T, L.L3T, L.L4T):
            fr = ((words >> _U(12)) & _U(P.MFN_MASK_X86)).astype(np.int64)
            fr = np.clip(fr, 0, host.nframes - 1)
            mine = ((words & _U(P._PAGE_PRESENT)) != 0) & (own[fr] == domid)
            flags = words & _U(~P.PTE_FRAME_MASK & 0xFFFFFFFFFFFFFFFF)
            tr = np.where(mine, flags | (m2p[fr].astype(np.uint64) << _U(12)), words)
            lo.update(tr.tobytes())
            lo.update(mine.tobytes())
        elif r in (L.P2M, L.P2M_FL, L.P2M_FLL):
            fr = np.clip(words.astype(np.int64), 0, host.nframes - 1)
            mine = (words < _U(host.nframes)) & (own[fr] == domid)
            tr = np.where(mine, m2p[fr].astype(np.uint64), words)
            lo.update(tr.tobytes())
            lo.update(mine.tobytes())
        else:
            lo.update(words.tobytes())
    return Image(p2m.tobytes(), ph.hexdigest(), lo.a.hexdigest(), lo.b.hexdigest())


class _Tee:
    """Feeds the logical hash (counts and types already in) and the content-only hash."""

    def __init__(self, a):
        self.a, self.b = a, hashlib.blake2b(digest_size=16)

    def update(self, data) -> None:
        self.a.update(data)
        self.b.update(data)


def images(host) -> dict[int, Image]:
    return {d: image(host, d) for d in sorted(host.guests)
            if d in host.domains and getattr(host.guests[d], "kind", "") == "linux-pv"}


def problems(host) -> list[str]:
    """Invariant violations plus every guest's own memory check."""
    out = list(invariants.check(host))
    for d, g in sorted(host.guests.items()):
        if d in host.domains and hasattr(g, "verify"):
            out += [f"d{d}: {p}" for p in g.verify()]
    return out


# -- world actions (other parties acting between two hypercalls of the toolstack) -----------

def dom0_maps(domid: int, mfn: int, writable: bool = False):
    """A dom0 process maps the frame (``xenforeignmemory_map``) and keeps it mapped."""
    def act(hv):
        hv.host.hypercalls(0).foreign_map(domid, [mfn], writable)
    act.__name__ = f"dom0_maps({mfn:#x})"
    return act


def guest_grants_and_dom0_maps(domid: int, mfn: int, ref: int = 200):
    """The guest grants the frame to dom0 and a backend maps the grant."""
    from xenpage.hypervisor import grant_table

    def act(hv):
        h = hv.host
        if grant_table.write_entry(h, domid, ref, G.GTF_permit_access, 0, mfn):
            h.hypercalls(0).grant_map(domid, ref, G.GNTMAP_host_map)
    act.__name__ = f"grant_and_map({mfn:#x})"
    return act


def other_toolstack_onlines(mfn: int):
    def act(hv):
        sysctl.page_offline_op(hv.host, 0, S.sysctl_page_online, mfn, mfn, pcpu=1)
    act.__name__ = f"online({mfn:#x})"
    return act


def guest_destroyed(domid: int):
    def act(hv):
        if domid in hv.host.domains:
            hv.host.destroy_domain(domid)
    act.__name__ = f"destroy(d{domid})"
    return act


# -- a random workload over the whole host (the state machine's and the soak's rules) -------

class World:
    """Rules acting on a small simulated host, each picking its arguments from ``rng``:
    guests created and destroyed, workload steps, grants mapped and unmapped by dom0's
    backends, foreign mappings, offline/online/status of frames and ranges (sysctl),
    machine-check (broken) marking, the toolstack's mem-offline flow, HVM live migration (same
    host), in-place HVM exchange and the PV ``--fallback=migrate`` migration.  ``counts`` says
    what ran; :meth:`check` is the invariant checker plus every guest's content check."""

    RULES = ("create_guest", "destroy_guest", "workload", "grant_map", "grant_unmap",
             "foreign_map", "foreign_unmap", "offline", "online", "status", "offline_range",
             "online_range", "mark_broken", "mem_offline", "hvm_migrate", "hvm_exchange",
             "pv_fallback_migrate")

    def __init__(self, seed: int = 0, spec: DefaultHostSpec | None = None):
        from collections import Counter
        self.host, self.hv = small_host(spec)
        self.rng = np.random.default_rng(seed)
        self.counts: Counter = Counter()
        self.ops = 0
        self.grant_maps: list[tuple[int, int]] = []   # (domid, handle)
        self.foreign_maps: list[tuple[int, int]] = []  # (domid, handle)
        self.next_ref = 100
        self.outcomes: Counter = Counter()

    # helpers
    def pv_guests(self) -> list[int]:
        return [d for d, g in sorted(self.host.guests.items())
                if d in self.host.domains and getattr(g, "kind", "") == "linux-pv"]

    def hvm_guests(self) -> list[int]:
        return [d for d, g in sorted(self.host.guests.items())
                if d in self.host.domains and getattr(g, "kind", "") in ("hvm", "pvh")]

    def _forget(self, domid: int) -> None:
        """dom0's mappings of a domain that is gone were dropped with it."""
        if domid not in self.host.domains:
            self.grant_maps = [(g, h) for g, h in self.grant_maps if g != domid]
            self.foreign_maps = [(g, h) for g, h in self.foreign_maps if g != domid]

    def _pick(self, seq):
        return seq[int(self.rng.integers(0, len(seq)))] if len(seq) else None

    def guest_frame(self, domid: int | None = None) -> int | None:
        ds = self.pv_guests()
        d = domid if domid is not None else self._pick(ds)
        if d is None:
            return None
        p2m = self.host.pv_p2m(d).astype(np.int64)
        return int(p2m[int(self.rng.integers(0, p2m.size))])

    def any_frame(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            m = self.guest_frame()
            if m is not None:
                return m
        return int(self.rng.integers(0, self.host.max_page))

    def do(self, rule: str, **kw) -> None:
        getattr(self, rule)(**kw)
        self.counts[rule] += 1
        self.ops += 1

    # rules
    def create_guest(self, mib: int = 4) -> None:
        from xenpage.guests.linux_pv import LinuxPV
        if len(self.pv_guests()) >= 4:
            return
        try:
            d = self.host.create_domain(f"g{self.host.next_domid}", mib * 256)
        except Exception:  # out of memory: Xen says -ENOMEM, nothing changes
            self.counts["create_guest.enomem"] += 1
            return
        LinuxPV.boot(self.host, d.domid, seed=int(self.rng.integers(1, 1 << 30)))

    def destroy_guest(self) -> None:
        ds = self.pv_guests()
        if len(ds) <= 1:
            return
        d = self._pick(ds)
        self.host.destroy_domain(d)
        # libxl tore the devices down (the backends' grant maps went); a dom0 process's
        # foreign mappings stay, and keep the domain dying until foreign_unmap drops them
        self.grant_maps = [(g, h) for g, h in self.grant_maps if g != d]

    def workload(self, n: int = 20) -> None:
        d = self._pick(self.pv_guests())
        if d is not None:
            self.host.guests[d].step(n)
            self.ops += n - 1

    def grant_map(self) -> None:
        from xenpage.guests import linux_pv as L
        from xenpage.hypervisor import grant_table
        d = self._pick(self.pv_guests())
        if d is None or self.host.domains[d].is_shutting_down:
            return
        g = self.host.guests[d]
        data = g.pfns_of(L.DATA)
        pf = int(self._pick(data))
        ref = 100 + (self.next_ref % 300)
        self.next_ref += 1
        if grant_table.read_entry(self.host, d, ref) not in (None,) and \
                grant_table.read_entry(self.host, d, ref)[0]:
            return
        if grant_table.write_entry(self.host, d, ref, G.GTF_permit_access, 0, g.mfn(pf)):
            st, h = self.host.hypercalls(0).grant_map(d, ref, G.GNTMAP_host_map)
            if st == G.GNTST_okay:
                self.grant_maps.append((d, h))

    def grant_unmap(self) -> None:
        if self.grant_maps:
            d, h = self.grant_maps.pop(int(self.rng.integers(0, len(self.grant_maps))))
            self.host.hypercalls(0).grant_unmap(h)

    def foreign_map(self) -> None:
        d = self._pick(self.pv_guests())
        if d is None:
            return
        m = self.guest_frame(d)
        rc, h = self.host.hypercalls(0).foreign_map(d, [m], bool(self.rng.integers(0, 2)))
        if rc == 0:
            self.foreign_maps.append((d, h))

    def foreign_unmap(self) -> None:
        if self.foreign_maps:
            d, h = self.foreign_maps.pop(int(self.rng.integers(0, len(self.foreign_maps))))
            self.host.hypercalls(0).foreign_unmap(h)

    def _sysctl(self, cmd: int, s: int, e: int):
        rc, st = self.hv.page_offline_op(cmd, s, e)
        self.outcomes[f"sysctl{cmd}.rc{rc}"] += 1
        return rc, st

    def offline(self) -> None:
        from xenpage.toolstack.pcpu import off_pcpu0
        m = self.any_frame()
        with off_pcpu0(self.hv):
            self._sysctl(S.sysctl_page_offline, m, m)

    def online(self) -> None:
        m = self.any_frame()
        self._sysctl(S.sysctl_page_online, m, m)

    def status(self) -> None:
        m = self.any_frame()
        self._sysctl(S.sysctl_query_page_offline, m, min(m + int(self.rng.integers(0, 64)), 2**32 - 1))

    def offline_range(self) -> None:
        from xenpage.toolstack.pcpu import off_pcpu0
        m = self.any_frame()
        with off_pcpu0(self.hv):
            self._sysctl(S.sysctl_page_offline, m, m + int(self.rng.integers(0, 16)))

    def online_range(self) -> None:
        m = self.any_frame()
        self._sysctl(S.sysctl_page_online, max(0, m - 8), m + int(self.rng.integers(0, 16)))

    def mark_broken(self) -> None:
        """A machine check: Xen marks the frame broken (``offline_page(mfn, 1, ...)``).  A
        frame of an HVM guest goes the whole ``mc_memerr_dhandler`` way (its gfn turns
        ``p2m_ram_broken`` and the guest gets a vMCE); a PV guest's frame is only marked (Xen
        would crash the guest: kept alive here so that its broken frame meets the tools)."""
        from xenpage.hypervisor import hvm as HVM
        from xenpage.hypervisor import offline as O
        m = self.any_frame()
        if m >= self.host.max_page:
            return
        if self.host.ft.owner(m) in self.host.ept:
            HVM.machine_check_guest_frame(self.host, m)
        else:
            O.offline_range(self.host, m, m, broken=True, pcpu=1)

    def mem_offline(self, k: int = 2) -> None:
        from xenpage.toolstack.offline import mem_offline
        d = self._pick(self.pv_guests())
        if d is None:
            return
        mfns = sorted({self.guest_frame(d) for _ in range(k)})
        before = image(self.host, d)
        r = mem_offline(self.hv, mfns)
        self.host.run_guests(0)
        for o in r.outcomes:
            self.outcomes[f"mem_offline.{o.kind.value}.{o.reason.value}"] += 1
            if o.kind.value == "failed":
                raise AssertionError(f"mem-offline failed: {o}")
        if d in self.host.domains:
            dd = self.host.domains[d]
            if not dd.is_shutting_down or dd.shutdown_code != 2:  # not left suspended
                pass
            assert not (dd.is_shutting_down and self.host.guests.get(d) is not None
                        and self.host.guests[d].suspended), f"d{d} left suspended"
            assert image(self.host, d).same_content(before), f"d{d}'s memory changed"

    def _retire(self, mfns: list[int], **opts):
        from xenpage.toolstack.offline import mem_offline
        from xenpage.toolstack.retire import RetireOptions
        r = mem_offline(self.hv, mfns, retire=RetireOptions(**opts))
        self.host.run_guests(0)
        for o in r.outcomes:
            self.outcomes[f"{self._rule}.{o.kind.value}.{o.reason.value}"] += 1
            if o.kind.value == "failed":
                raise AssertionError(f"mem-offline failed: {o}")
        return r

    def _not_left_suspended(self) -> None:
        from xenpage.abi import xen as X
        for d, g in self.host.guests.items():
            dd = self.host.domains.get(d)
            if dd is None or (dd.is_shutting_down and dd.shutdown_code != X.SHUTDOWN_suspend):
                continue   # gone, or crashed (e.g. a broken frame offlined again)
            assert not dd.is_shutting_down and not getattr(g, "suspended", False), f"d{d} left suspended"
            assert not dd.pause_count, f"d{d} left paused"

    def hvm_migrate(self) -> None:
        """``xl migrate`` of a random HVM guest to the same host (when there is room)."""
        d = self._pick(self.hvm_guests())
        if d is None:
            return
        res = self.hv.live_migrate(d)
        self.host.run_guests(0)
        self.outcomes[f"hvm_migrate.{'ok' if res.ok else 'rc' + str(res.rc)}"] += 1
        if res.ok:
            assert d not in self.host.domains and res.new_domid in self.host.guests
        else:
            assert d in self.host.domains, res.error
        self._forget(d)
        self._not_left_suspended()

    def hvm_exchange(self, k: int = 1) -> None:
        """``mem-offline --hvm=exchange`` of random frames of a random HVM guest: each is
        marked offline-pending and exchanged in place."""
        d = self._pick(self.hvm_guests())
        if d is None:
            return
        g = self.host.guests[d]
        mfns = sorted({g.mfn(int(self.rng.integers(0, g.nr_pages))) for _ in range(k)})
        self._rule = "hvm_exchange"
        self._retire(mfns, hvm="exchange")
        self._not_left_suspended()

    def pv_fallback_migrate(self) -> None:
        """``mem-offline --fallback=migrate`` of a PV guest's granted ring (or a frame a dom0
        daemon maps, or any of its frames): what the exchange leaves pending is retired by
        live-migrating the guest."""
        from xenpage.guests.linux_pv import CONS_RING, RING, XS_RING
        # A machine-checked frame is not sent (XEN_DOMCTL_PFINFO_BROKEN): its content is lost
        # in the new domain, and the PV guest model takes no vMCE (it would still expect the
        # page). Offlining it again crashes the guest (PG_OFFLINE_AGAIN), as Xen does. So
        # guests with a broken frame are not migrated here.
        ok = [d for d in self.pv_guests() if not (self.host.ft.count_info[
            self.host.pv_p2m(d).astype(np.int64)] & _U(mm.PGC_broken)).any()]
        d = self._pick(ok)
        if d is None:
            self.counts["pv_fallback_migrate.skipped_broken"] += 1
            return
        self._rule = "pv_fallback_migrate"
        g = self.host.guests[d]
        r = self.rng.random()
        pfns = g.pfns_of(RING) if r < 0.5 else g.pfns_of(XS_RING) if r < 0.7 \
            else g.pfns_of(CONS_RING) if r < 0.8 else np.arange(g.role.size)
        m = g.mfn(int(self._pick(pfns)))
        self._retire([m], fallback="migrate")
        self._forget(d)
        self._not_left_suspended()

    def random_rule(self) -> str:
        w = {"workload": 30, "mem_offline": 8, "offline": 6, "online": 6, "status": 6,
             "offline_range": 3, "online_range": 3, "grant_map": 5, "grant_unmap": 5,
             "foreign_map": 5, "foreign_unmap": 5, "mark_broken": 1, "create_guest": 2,
             "destroy_guest": 1, "hvm_migrate": 1, "hvm_exchange": 2, "pv_fallback_migrate": 1}
        names = list(w)
        p = np.array([w[n] for n in names], dtype=float)
        return names[int(self.rng.choice(len(names), p=p / p.sum()))]

    def check(self) -> list[str]:
        return problems(self.host)
