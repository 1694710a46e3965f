"""Retiring frames of translated guests (PVH, HVM) on stock Xen 4.17 -- shared by
test_pvh.py and test_hvm.py (each its own lab boot: tests_xen/run_lab.py groups ``pvh`` and
``hvm``).

Everything goes through xenpage's real-Xen backend (``xenpage.backends.xen``), the sequence
issue 12 asks for, driven here step by step:

* frames: memtest prints its buffer's gfns (``MEMTEST PFN``); ``hvm_p2m`` finds the machine
  frames behind them (a foreign map of the gfns, read back from dom0's own L1 entries); the M2P
  names the gfns back; the page-offline sysctl's status word names the owner;
* in place: mark offline (pending, owned by the guest), pause, copy the gfns out,
  ``XENMEM_decrease_reservation`` (the old frames become offlined), ``XENMEM_populate_physmap``
  (fresh frames at the same gfns), copy back, unpause -- one frame, then a batch under one pause;
* live migration through libxl (``live_migrate`` = ``xl migrate`` to this host) with a pending
  frame: the old domain's destruction offlines it.

memtest verifies its 16 MiB continuously; every test checks its heartbeats (``corrupt=0
moved=0``) after acting.  The migration comes last: destroying the old domain frees a pending
frame among free neighbours, where Xen 4.17's buddy split misaligns its heap
(backends/xen/quirks.py), so nothing is built after it.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from helpers import CONSOLE_DIR, ROOT, RX_BAD, RX_OK, RX_PFN, run, xenpage
from xenpage.abi import sysctl as S
from xenpage.toolstack.pcpu import off_pcpu0
from xenpage.toolstack.retire import RetireOptions, migrate_for
from xenpage.toolstack.split_guard import SplitGuard

CFG = {"pvh": ROOT / "lab/guest/pvh.cfg", "hvm": ROOT / "lab/guest/hvm.cfg"}
#: memtest page indexes used by each step, as fractions of memtest's pages (16 MiB = 4096
#: pages for both: see pvh.cfg, hvm.cfg)
ONE = 0.025
BATCH = [0.075 + 0.1 * k for k in range(8)]
CLI = 0.85
MIGRATE = 0.5
RX_DONE = re.compile(r"^MEMTEST PFNS-DONE pages=(\d+)", re.M)


def at(g: "TGuest", fracs) -> list[int]:
    """memtest page indexes at these fractions of its pages."""
    n = g.npages()
    return [int(f * n) for f in fracs]


@dataclass
class TGuest:
    """A memtest guest of a translated type; its console may move to a new log file when it
    migrates (the new domain is first named ``<name>--incoming``), so every
    ``guest-<name>*.log`` is read."""

    kind: str
    name: str
    domid: int

    def logs(self) -> list[Path]:
        return sorted(CONSOLE_DIR.glob(f"guest-{self.name}*.log"), key=lambda p: p.stat().st_mtime)

    def text(self) -> str:
        out = []
        for p in self.logs():
            try:
                out.append(p.read_text(errors="replace"))
            except OSError:
                pass
        return "\n".join(out)

    def pfns(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for i, p in RX_PFN.findall(self.text()):
            out.setdefault(int(i), int(p, 16))
        return out

    def npages(self) -> int:
        m = RX_DONE.search(self.text())
        return int(m.group(1)) if m else 0

    def heartbeats(self) -> list[tuple[int, int, int, int]]:
        return sorted({tuple(int(x) for x in m.groups()) for m in RX_OK.finditer(self.text())})

    def last_gen(self) -> int:
        hb = self.heartbeats()
        return hb[-1][0] if hb else -1

    def bad_lines(self) -> list[str]:
        return [m.group(0) for m in RX_BAD.finditer(self.text())]

    def wait_after(self, gen: int, n: int = 2, timeout: float = 120) -> list[tuple[int, int, int, int]]:
        end = time.time() + timeout
        while time.time() < end:
            hb = [h for h in self.heartbeats() if h[0] > gen]
            if len(hb) >= n:
                return hb
            time.sleep(1)
        return [h for h in self.heartbeats() if h[0] > gen]

    def tail(self, n: int = 8) -> list[str]:
        return self.text().splitlines()[-n:]

    def refresh(self) -> None:
        """Its domid now (the backend contract's live migration, run between this group's
        steps, moves the guest to a new domain under the same name)."""
        d = domid_of(self.name)
        if d is not None:
            self.domid = d


def domid_of(name: str) -> int | None:
    r = run(["xl", "domid", name], timeout=60)
    return int(r.stdout.strip()) if r.rc == 0 and r.stdout.strip().isdigit() else None


#: seconds until memtest's first heartbeat: an HVM guest boots through SeaBIOS and decompresses
#: its kernel itself, every instruction emulated twice over (TCG, then Xen's HVM under TCG)
BOOT_TIMEOUT = {"pvh": 420, "hvm": 1500}


def start(kind: str, rec, timeout: float | None = None, name: str | None = None,
          append: str = "") -> TGuest:
    """``xl create`` the memtest guest of ``kind`` (under ``name`` if given, ``append`` added to
    its kernel command line); returns once its PFN lines and a first heartbeat are out."""
    text = CFG[kind].read_text()
    old = re.search(r'^name\s*=\s*"([^"]+)"', text, re.M).group(1)
    name = name or old
    text = text.replace(f'"{old}"', f'"{name}"').replace(f"guest-{old}", f"guest-{name}")
    append = " ".join(x for x in (append, os.environ.get("XENPAGE_LAB_GUEST_APPEND", "")) if x)
    if append:
        text = re.sub(r'^((?:extra|cmdline)\s*=\s*"[^"]*)"', lambda m: m.group(1) + " " + append + '"', text,
                      count=1, flags=re.M)
    cfg = Path("/tmp") / f"{name}.cfg"
    cfg.write_text(text)
    t0 = time.perf_counter()
    r = run(["xl", "create", str(cfg)], timeout=300)
    assert r.rc == 0, f"xl create {cfg}: {r.stderr[-2000:]}"
    d = domid_of(name)
    g = TGuest(kind, name, d)
    timeout = timeout or BOOT_TIMEOUT[kind]
    end = time.time() + timeout
    while time.time() < end:
        t = g.text()
        if "MEMTEST PFNS-DONE" in t and RX_OK.search(t):
            break
        time.sleep(1)
    up = time.perf_counter() - t0
    rec.add(f"{kind}-guest-up", name=name, domid=d, seconds=round(up, 1), create=r.to_json(), logs=[str(p) for p in g.logs()],
            tail=g.tail(4))
    assert "MEMTEST PFNS-DONE" in g.text(), f"{kind} guest d{d} did not come up in {timeout} s: {g.tail()}"
    return g


def status(xen, mfn: int) -> int:
    rc, st = xen.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    return -1 if rc else int(st[0])


def mark(xen, mfns) -> list[int]:
    """Mark each frame offline (dom0 off pCPU 0): its status word."""
    out = []
    with off_pcpu0(xen):
        for m in mfns:
            rc, st = xen.page_offline_op(S.sysctl_page_offline, int(m), int(m))
            out.append(int(st[0]) if st is not None else rc)
    return out


def guarded(xen, mfns) -> SplitGuard:
    """Guard frames around frames about to be offlined in use and then freed (as mem-offline
    holds them): Xen 4.17 misaligns its free buddies when an offline-pending frame is freed
    next to free frames, and a misaligned heap later hands frames in use out twice
    (xenpage/backends/xen/quirks.py, xenpage/toolstack/split_guard.py)."""
    guard = SplitGuard(xen)
    with off_pcpu0(xen):
        guard.protect([int(m) for m in mfns])
    return guard


def owned_pending(st: int, domid: int) -> bool:
    return (st & S.PG_OFFLINE_STATUS_MASK) == S.PG_OFFLINE_PENDING and bool(st & S.PG_OFFLINE_OWNED) \
        and st >> S.PG_OFFLINE_OWNER_SHIFT == domid


def frames(xen, g: TGuest, idx: list[int]) -> tuple[np.ndarray, np.ndarray]:
    pf = g.pfns()
    gfns = np.array([pf[i] for i in idx], dtype=np.int64)
    rc, mfns, types, orders = xen.hvm_p2m(g.domid, gfns)
    assert rc == 0, f"hvm_p2m(d{g.domid}) -> {rc}: {xen.hvm_p2m_failed}"
    return gfns, mfns


# -- the steps ------------------------------------------------------------------------------

def check_frames(xen, g: TGuest, rec) -> None:
    """gfn -> mfn through dom0's page tables; the M2P names the gfns back; the frames are the
    guest's (the offline sysctl's owner field, then onlined again); a 2 MiB-aligned run of
    gfns sits on a 2 MiB-aligned run of frames (the builder's superpages)."""
    pf = g.pfns()
    assert len(pf) == g.npages() > 0, f"memtest printed {len(pf)} PFN lines of {g.npages()}"
    idx = sorted(pf)
    gfns = np.array([pf[i] for i in idx], dtype=np.int64)
    t0 = time.perf_counter()
    rc, mfns, types, orders = xen.hvm_p2m(g.domid, gfns)
    t_p2m = time.perf_counter() - t0
    if rc:
        diag = _diagnose(xen, g.domid, gfns[:4])
        rec.add(f"{g.kind}-hvm-p2m-failed", rc=rc, step=xen.hvm_p2m_failed, diag=diag)
    assert rc == 0, f"hvm_p2m -> {rc}: {xen.hvm_p2m_failed}"
    m2p = xen.m2p(mfns).astype(np.int64)
    same_2m = int(((mfns % 512) == (gfns % 512)).sum())
    # the operator's path: an MFN, whose owner the offline sysctl names
    probe = int(mfns[at(g, [ONE])[0] + 1])
    st = mark(xen, [probe])[0]
    rc_on, st_on = xen.page_offline_op(S.sysctl_page_online, probe, probe)
    st_q = status(xen, probe)
    rec.add(f"{g.kind}-frames", domid=g.domid, pages=len(idx), hvm_p2m_s=round(t_p2m, 3),
            sample=[(hex(int(a)), hex(int(b))) for a, b in zip(gfns[:8], mfns[:8])],
            m2p_matches=int((m2p == gfns).sum()), types=sorted(set(types.tolist())),
            gfn_mfn_same_offset_in_2m=same_2m, distinct_mfns=int(np.unique(mfns).size),
            probe=hex(probe), probe_offline_status=hex(st), probe_online=(rc_on, hex(int(st_on[0]))),
            probe_status_after=hex(st_q))
    assert (mfns > 0).all() and np.unique(mfns).size == mfns.size
    assert (m2p == gfns).all(), "the M2P does not name the gfns back"
    assert owned_pending(st, g.domid), f"offline of {probe:#x}: status {st:#x}, want pending+owned by d{g.domid}"
    assert rc_on == 0 and st_q == 0, f"online {probe:#x}: rc {rc_on} status after {st_q:#x}"


def _diagnose(xen, domid: int, gfns) -> dict:
    """Each step of hvm_p2m on its own, for the record when it fails."""
    out: dict = {}
    out["page_types"] = [xen.page_types(domid, gfns)[0]]
    m = xen.map_foreign(domid, gfns, False)
    out["map_gfns"] = m if isinstance(m, int) else "ok"
    if not isinstance(m, int):
        m.unmap()
    for cpu in sorted(os.sched_getaffinity(0)):
        out[f"getvcpucontext_d0v{cpu}"] = xen._vcpu_cr3(cpu)
    out["own_cr3"] = xen._own_cr3()
    return out


def decrease_populate(xen, domid: int, gfns: np.ndarray) -> dict:
    """The in-place steps without an offline mark, under one pause: read the gfns' pages,
    XENMEM_decrease_reservation, XENMEM_populate_physmap, write the pages back and read them
    again.  A failed first read stops before the decrease (the copy would be the only one)."""
    assert xen.pause(domid) == 0
    try:
        rc, data = xen.read_pages(domid, gfns)
        assert rc == 0, f"read_pages of d{domid}: rc {rc}"
        done = xen.decrease_reservation(domid, gfns)
        pdone, _ = xen.populate_physmap(domid, gfns)
        wrc = xen.write_pages(domid, gfns, data)
        rc2, back = xen.read_pages(domid, gfns)
    finally:
        xen.unpause(domid)
    return {"decrease_done": done, "populate_done": pdone, "write_rc": wrc,
            "identical": bool(rc2 == 0 and back == data)}


def retire_in_place(xen, g: TGuest, idx: list[int], rec, label: str) -> dict:
    """Mark, pause, copy out, decrease_reservation, populate_physmap, copy back, unpause."""
    idx = at(g, idx)
    gfns, old = frames(xen, g, idx)
    n = gfns.size
    guard = guarded(xen, old)
    st_mark = mark(xen, old)
    gen = g.last_gen()
    steps: dict = {}
    t0 = time.perf_counter()
    assert xen.pause(g.domid) == 0
    try:
        t = time.perf_counter()
        rc, data = xen.read_pages(g.domid, gfns)
        steps["read_s"] = time.perf_counter() - t
        assert rc == 0, f"read_pages -> {rc}"
        t = time.perf_counter()
        done = xen.decrease_reservation(g.domid, gfns)
        steps["decrease_s"] = time.perf_counter() - t
        st_dec = [status(xen, int(m)) for m in old]
        t = time.perf_counter()
        k = done if done > 0 else 0
        pdone, arr = xen.populate_physmap(g.domid, gfns[:k])
        steps["populate_s"] = time.perf_counter() - t
        t = time.perf_counter()
        wrc = xen.write_pages(g.domid, gfns[:max(pdone, 0)], data.select(np.arange(max(pdone, 0))))
        steps["write_s"] = time.perf_counter() - t
        rc_new, new, _, _ = xen.hvm_p2m(g.domid, gfns)
        rc_back, back = xen.read_pages(g.domid, gfns)
    finally:
        urc = xen.unpause(g.domid)
        guard.release()
    paused = time.perf_counter() - t0
    hb = g.wait_after(gen, 2)
    m2p_new = xen.m2p(new).astype(np.int64) if rc_new == 0 else None
    res = dict(domid=g.domid, frames=n, gfns=[hex(int(x)) for x in gfns], old_mfns=[hex(int(x)) for x in old],
               status_marked=[hex(s) for s in st_mark], decrease_done=done,
               status_after_decrease=[hex(s) for s in st_dec], populate_done=pdone,
               extents_after_populate=[hex(int(x)) for x in arr], write_rc=wrc, unpause_rc=urc,
               new_mfns=[hex(int(x)) for x in new] if rc_new == 0 else rc_new,
               new_m2p_ok=bool(m2p_new is not None and (m2p_new == gfns).all()),
               content_identical=bool(rc_back == 0 and back == data), paused_s=round(paused, 4),
               paused_per_frame_s=round(paused / n, 4), steps={k2: round(v, 4) for k2, v in steps.items()},
               heartbeats=hb[-2:], bad_lines=g.bad_lines()[:10],
               status_now=[hex(status(xen, int(m))) for m in old])
    rec.add(f"{g.kind}-{label}", **res)
    assert all(owned_pending(s, g.domid) for s in st_mark), res["status_marked"]
    assert done == n, f"decrease_reservation: {done} of {n}"
    assert all(s == S.PG_OFFLINE_STATUS_OFFLINED for s in st_dec), \
        f"old frames after decrease_reservation: {res['status_after_decrease']}"
    assert pdone == n and wrc == 0 and urc == 0
    assert (arr == gfns).all(), "populate_physmap wrote something back into the extent list"
    assert rc_new == 0 and not np.isin(new, old).any(), res["new_mfns"]
    assert res["new_m2p_ok"] and res["content_identical"]
    assert len(hb) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in hb), hb
    assert not g.bad_lines(), g.bad_lines()[:5]
    return res


def _one_outcome(r) -> dict:
    outs = (r.data or {}).get("outcomes") or [{}]
    return outs[0]


def cli_exchange(xen, g: TGuest, rec) -> None:
    """``xenpage mem-offline <mfn> --hvm=exchange --json`` of one memtest frame: the product's
    path (split guard, mark, checks, journal, pause, decrease, populate, copy back, unpause)
    in a process of its own, as an operator runs it."""
    gfns, old = frames(xen, g, at(g, [CLI]))
    gen = g.last_gen()
    r = xenpage("mem-offline", f"{int(old[0]):x}", "--hvm=exchange", as_json=True, timeout=600)
    o = _one_outcome(r)
    hb = g.wait_after(gen, 2)
    st = status(xen, int(old[0]))
    rc, new, _, _ = xen.hvm_p2m(g.domid, gfns)
    m2p_ok = rc == 0 and int(xen.m2p(new)[0]) == int(gfns[0])
    tim = (r.data or {}).get("timings") or {}
    rec.add(f"{g.kind}-cli-exchange", domid=g.domid, mfn=hex(int(old[0])), gfn=hex(int(gfns[0])),
            exit=r.rc, wall_s=round(r.elapsed_s, 2), outcome=o, timings=tim, status=hex(st),
            new_mfn=hex(int(new[0])) if rc == 0 else rc, new_m2p_ok=m2p_ok, heartbeats=hb[-2:],
            stderr=r.stderr[-1500:], bad_lines=g.bad_lines()[:10])
    assert r.rc == 0, f"exit {r.rc}: {r.stderr[-1500:]} {r.stdout[-1500:]}"
    assert o.get("kind") == "exchanged", o
    assert st == S.PG_OFFLINE_STATUS_OFFLINED, f"{int(old[0]):#x}: {st:#x}"
    assert rc == 0 and int(new[0]) != int(old[0]) and m2p_ok
    assert o.get("new_mfn") in (None, int(new[0])), (o.get("new_mfn"), int(new[0]))
    assert len(hb) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in hb), hb
    assert not g.bad_lines(), g.bad_lines()[:5]


def cli_migrate(xen, g: TGuest, rec) -> None:
    """``xenpage mem-offline <mfn> --json`` with the default HVM policy (live migration to this
    host through ``xl migrate``): the frame is marked offline; mem-offline takes the mark off,
    migrates the guest and offlines the freed frame under its guard frames (retire.py)."""
    g.refresh()
    gfns, old = frames(xen, g, at(g, [MIGRATE]))
    m = int(old[0])
    gen = g.last_gen()
    free_before = xen.physinfo().free_pages
    r = xenpage("mem-offline", f"{m:x}", as_json=True, timeout=1200)
    o = _one_outcome(r)
    st_after = status(xen, m)
    old_gone = gone_or_dying(xen, g.domid)
    ex = o.get("extra") or {}
    new_domid = ex.get("new_domid")
    hb = g.wait_after(gen, 2, timeout=180)
    new_frame = None
    if new_domid is not None:
        rc, nm, _, _ = xen.hvm_p2m(new_domid, gfns)
        new_frame = hex(int(nm[0])) if rc == 0 else rc
    rec.add(f"{g.kind}-cli-migrate", old_domid=g.domid, mfn=hex(m), gfn=hex(int(gfns[0])), exit=r.rc,
            wall_s=round(r.elapsed_s, 2), free_pages_before=free_before, outcome=o,
            timings=(r.data or {}).get("timings"), status_after=hex(st_after), old_gone=old_gone,
            new_mfn_of_gfn=new_frame, heartbeats=hb[-3:], bad_lines=g.bad_lines()[:10],
            stderr=r.stderr[-1500:])
    assert r.rc == 0, f"exit {r.rc}: {r.stderr[-1500:]} {r.stdout[-1500:]}"
    assert o.get("kind") == "migrated", o
    assert new_domid is not None and new_domid != g.domid and old_gone
    assert st_after == S.PG_OFFLINE_STATUS_OFFLINED, f"{m:#x} after migration: {st_after:#x}"
    assert len(hb) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in hb), hb
    assert not g.bad_lines(), g.bad_lines()[:5]
    sent_enough(ex)
    g.domid = new_domid


def gone_or_dying(xen, domid: int) -> bool:
    """The old domain after a migration: gone, or dying until Xen frees its last page (a
    moment after xl returns, seen in the lab)."""
    info = xen.domain_info(domid)
    return info is None or info.dying


def sent_enough(rep: dict) -> None:
    """The rounds and pages the relay read in the stream (backends/xen/streamcount.py): at
    least a live round and the suspended one, and at least memtest's 16 MiB sent (nothing to
    check with ``XENPAGE_MIGRATE_RELAY=0``)."""
    if os.environ.get("XENPAGE_MIGRATE_RELAY", "1") == "0":
        return
    assert rep.get("rounds") is not None and rep["rounds"] >= 2, rep
    assert rep.get("pages_sent") is not None and rep["pages_sent"] >= 4096, rep
    assert rep.get("live_rounds", rep["rounds"] - 1) == rep["rounds"] - 1, rep


def migrate_off(xen, g: TGuest, rec) -> None:
    """A frame marked offline (pending) is retired by ``live_migrate`` (xl migrate to this
    host) the toolstack's way (``retire.migrate_for``): the mark taken off, the guest moved,
    the old domain destroyed, the now free frame offlined under its guard frames -- a pending
    frame freed with its domain would misalign Xen 4.17's heap."""
    g.refresh()
    gfns, old = frames(xen, g, at(g, [MIGRATE]))
    m = int(old[0])
    st = mark(xen, [m])[0]
    gen = g.last_gen()
    free_before = xen.physinfo().free_pages
    opts = RetireOptions()
    outs = migrate_for(xen, g.domid, [m], opts, f"d{g.domid} is a {g.kind} guest")
    rep = opts.log[-1]["result"]
    st_after = status(xen, m)
    old_gone = gone_or_dying(xen, g.domid)
    hb = g.wait_after(gen, 2, timeout=180)
    new_frames = None
    new_domid = rep.get("new_domid")
    if new_domid is not None:
        rc, nm, _, _ = xen.hvm_p2m(new_domid, gfns)
        new_frames = hex(int(nm[0])) if rc == 0 else rc
    rec.add(f"{g.kind}-migrate", old_domid=g.domid, mfn=hex(m), gfn=hex(int(gfns[0])), status_marked=hex(st),
            free_pages_before=free_before, report=rep, outcome=outs[0].to_json(), status_after=hex(st_after),
            old_gone=old_gone, new_mfn_of_gfn=new_frames, heartbeats=hb[-3:], bad_lines=g.bad_lines()[:10],
            logs=[str(p) for p in g.logs()])
    assert owned_pending(st, g.domid), hex(st)
    assert rep["ok"], f"{rep['error']}\n" + "\n".join(rep["log"][-30:])
    assert new_domid is not None and new_domid != g.domid and old_gone
    assert st_after == S.PG_OFFLINE_STATUS_OFFLINED, f"{m:#x} after migration: {st_after:#x}"
    assert outs[0].kind.value == "migrated", outs[0]
    sent_enough(rep)
    assert len(hb) >= 2 and all(c == 0 and mv == 0 for _, _, c, mv in hb), hb
    assert not g.bad_lines(), g.bad_lines()[:5]
    g.domid = new_domid


RX_TRIPLE = re.compile(r"d(\d+)v\d+ Triple fault")


def no_guest_crashed(rec, kind: str) -> None:
    """At the end of a group: Xen logged no guest's triple fault, and no domain is shut down
    or crashed.  (Before the guard frames, a guest crashed after the group's last test had
    passed, once its neighbour's old domain had been destroyed with a pending frame.)"""
    time.sleep(10)
    dm = run(["xl", "dmesg"], timeout=60).stdout
    faults = sorted(set(RX_TRIPLE.findall(dm)))
    xl = run(["xl", "list"], timeout=60).stdout
    bad = [ln for ln in xl.splitlines()[1:] if ln.split() and ln.split()[4:5]
           and any(c in ln.split()[4] for c in "sc")]
    rec.add(f"{kind}-end", triple_faults=faults, xl_list=xl.splitlines(), bad=bad)
    assert not faults, f"triple faults of domains {faults}"
    assert not bad, bad


def cli_enabled() -> bool:
    """The CLI tests run unless ``XENPAGE_LAB_HVM_CLI=0``."""
    return os.environ.get("XENPAGE_LAB_HVM_CLI", "1") != "0"
