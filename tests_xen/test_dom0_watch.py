"""By hand (``run_lab.py --group dom0-watch``): which operation on a PVH guest's memory
disturbs dom0?  Two watchers: dom0 runs the lab's memtest over 128 MiB of its own memory
(another process), and this process keeps 32 MiB of known random words and checks their
SHA-256 after every few operations (its own memory: in earlier runs it was the process doing
the in-place steps that died -- a Python ``SystemError`` at compile, a segfault in a list
comprehension).  Then, on a running PVH memtest guest, one kind of operation at a time:

A. ``decpop`` x20: pause, copy a gfn out, ``decrease_reservation``, ``populate_physmap``,
   copy back, unpause (the frame not marked offline; no gfn -> mfn lookup at all);
B. ``p2m`` x20: ``hvm_p2m`` of all of memtest's gfns (dom0's own page tables read through a
   paused dom0 vCPU's context);
C. ``inplace`` x8: the frame (from phase B's last ``hvm_p2m``, gfns A left alone) marked
   offline first, then as A: the old frame is offlined when it is freed;
D. ``migrate``: ``xl migrate`` of the guest (group pvh-after's failure).

Each record says how many of dom0's memtest pages changed behind its back and whether this
process's own words still hash the same.

``test_dom0_control`` is the control experiment: the same two watchers, the same PVH guest
running but untouched (``XENPAGE_LAB_WATCH_GUEST=0``: no guest at all), no operation on any
guest, for ``XENPAGE_LAB_WATCH_S`` seconds (default 120) of back-to-back checks; it records the
CPU features dom0 sees (/proc/cpuinfo, the kernel's ``x86/fpu`` lines) so that runs on
different QEMU CPU models (``XENLAB_CPU``) can be compared."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np

import translated as T

HERE = Path(__file__).resolve().parent
LOG = Path("/tmp/dom0-memtest.log")
RX_OK = re.compile(r"^MEMTEST OK gen=(\d+) pages=(\d+) corrupt=(\d+) moved=(\d+)", re.M)
RX_BAD_LINE = re.compile(r"^MEMTEST (CORRUPT|PFNMOVED|ERROR)")


def _dom0() -> tuple[int, int]:
    text = LOG.read_text(errors="replace") if LOG.exists() else ""
    ok = RX_OK.findall(text)
    return (int(ok[-1][0]) if ok else -1), (int(ok[-1][2]) if ok else -1)


class OwnWords:
    """32 MiB of known random words in this process; ``check`` hashes them (SHA-256 through
    OpenSSL) and sums them (numpy) and, on a mismatch, says where the copy differs from the
    words and whether a second hash of the same words agrees -- a wrong result that does not
    repeat is a computation gone wrong (registers), not memory."""

    def __init__(self) -> None:
        self.words = np.random.default_rng(12).integers(0, 2 ** 63, size=4 << 20, dtype=np.uint64)
        self.digest = hashlib.sha256(self.words.tobytes()).hexdigest()
        self.total = int(self.words.sum(dtype=np.uint64))
        self.checks = 0
        self.bad: list[dict] = []

    def check(self) -> dict:
        self.checks += 1
        b = self.words.tobytes()
        d = hashlib.sha256(b).hexdigest()
        t = int(self.words.sum(dtype=np.uint64))
        out = {"hash_ok": d == self.digest, "sum_ok": t == self.total}
        if not (out["hash_ok"] and out["sum_ok"]):
            copy = np.frombuffer(b, dtype=np.uint64)
            diff = np.flatnonzero(copy != self.words)
            out.update(n=self.checks, copy_differs_at=[int(i) for i in diff[:16]], copy_words_differing=int(diff.size),
                       copy_values=[(hex(int(self.words[i])), hex(int(copy[i]))) for i in diff[:4]],
                       rehash_ok=hashlib.sha256(self.words.tobytes()).hexdigest() == self.digest,
                       resum_ok=int(self.words.sum(dtype=np.uint64)) == self.total)
            self.bad.append(out)
        return out


def _traps() -> list[str]:
    """dom0's kernel lines for user processes killed by a fault (segfault, general protection)."""
    dm = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    return [l for l in dm.splitlines() if "traps:" in l or "segfault at" in l or "general protection" in l][:10]


def _cpu_record() -> dict:
    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            break
    want = ("avx", "avx2", "avx512f", "fma", "f16c", "xsave", "xsaveopt", "xsavec", "xsaves", "osxsave",
            "sse4_2", "sha_ni", "bmi1", "bmi2", "adx", "vaes", "vpclmulqdq", "fsgsbase", "pku")
    dm = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
    model = [l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines()
             if l.startswith("model name")][:1]
    return {"model": model, "selected": {f: f in flags for f in want}, "flags": flags,
            "fpu": [l.split("] ", 1)[-1] for l in dm.splitlines() if "x86/fpu" in l]}


def test_dom0_control(rec):
    """No operation on any guest: do dom0's watchers still see damage?"""
    cpu = _cpu_record()
    rec.add("dom0-cpu", **cpu)
    exe = HERE / "memtest"
    proc = subprocess.Popen(["sh", "-c", f"exec {exe} 128 1 > {LOG} 2>&1"])
    try:
        end = time.time() + 300
        while time.time() < end and _dom0()[0] < 1:
            time.sleep(1)
        assert _dom0()[0] >= 1, f"dom0 memtest did not start: {LOG.read_text()[-500:] if LOG.exists() else ''}"
        own = OwnWords()
        guest = os.environ.get("XENPAGE_LAB_WATCH_GUEST", "1") != "0"
        g, start_error = None, None
        if guest:
            try:
                g = T.start("pvh", rec, name="pvhctl")
            except AssertionError as e:     # a dom0 process (xl's own) dying is a finding here
                start_error = str(e)[-600:]
                rec.add("dom0-control-guest-failed", error=start_error)
        dur = float(os.environ.get("XENPAGE_LAB_WATCH_S", "120"))
        t0 = time.time()
        last = t0
        while time.time() - t0 < dur:
            r = own.check()
            if not (r["hash_ok"] and r["sum_ok"]) or time.time() - last > 15:
                last = time.time()
                d0 = _dom0()
                rec.add("dom0-control", t=round(time.time() - t0, 1), checks=own.checks, bad=len(own.bad),
                        dom0_gen=d0[0], dom0_corrupt=d0[1], last=r,
                        guest_last=(g.heartbeats()[-1:] if g and g.heartbeats() else None),
                        guest_bad=(g.bad_lines()[:3] if g else None))
        d0 = _dom0()
        mt_bad = [l for l in (LOG.read_text(errors="replace").splitlines() if LOG.exists() else [])
                  if RX_BAD_LINE.match(l)][:10]
        traps = _traps()
        summary = dict(guest=guest, guest_start_error=start_error, dom0_traps=traps[:10], seconds=round(time.time() - t0, 1), checks=own.checks, n_bad=len(own.bad), bad=own.bad[:10],
                       dom0_gen=d0[0], dom0_corrupt=d0[1], dom0_memtest_bad=mt_bad,
                       avx=cpu["selected"]["avx"], avx2=cpu["selected"]["avx2"],
                       guest_heartbeats=(g.heartbeats()[-2:] if g else None), guest_bad=(g.bad_lines()[:5] if g else None))
        rec.add("dom0-control-summary", **summary)
    finally:
        proc.terminate()
        proc.wait()
        if guest:      # the group's next test builds its own guest
            subprocess.run(["xl", "destroy", "pvhctl"], capture_output=True)
    assert not own.bad and d0[1] == 0 and not mt_bad and not traps and start_error is None, summary


def test_dom0_memory_across_operations(xen, rec):
    exe = HERE / "memtest"
    proc = subprocess.Popen(["sh", "-c", f"exec {exe} 128 1 > {LOG} 2>&1"])
    end = time.time() + 300
    while time.time() < end and _dom0()[0] < 1:
        time.sleep(1)
    assert _dom0()[0] >= 1, f"dom0 memtest did not start: {LOG.read_text()[-500:] if LOG.exists() else ''}"
    own_w = OwnWords()
    g = T.start("pvh", rec)
    pf = g.pfns()
    n = len(pf)
    seen = {"ok": True}

    def check(phase: str, i: int, info: dict) -> None:
        oc = own_w.check()
        own = oc["hash_ok"] and oc["sum_ok"]
        d0 = _dom0()
        r = dict(phase=phase, i=i, own_words_intact=own, own_detail=None if own else oc, dom0_traps=_traps(), dom0_gen=d0[0], dom0_corrupt=d0[1],
                 guest_last=g.heartbeats()[-1:] if g.heartbeats() else None, guest_bad=g.bad_lines()[:3], **info)
        rec.add("dom0-watch", **r)
        if not own or d0[1] > 0 or r["dom0_traps"]:
            seen["ok"] = False
            seen.setdefault("first", f"{phase} #{i}")

    def decpop(gfn: int) -> dict:
        r = T.decrease_populate(xen, g.domid, np.array([gfn], dtype=np.int64))
        assert r["decrease_done"] == 1 and r["populate_done"] == 1 and r["write_rc"] == 0 \
            and r["identical"], r
        return {"gfn": hex(gfn)}

    check("start", 0, {})
    for i in range(20):                                   # A
        info = decpop(pf[(37 + 97 * i) % n])
        if i % 5 == 4:
            check("decpop", i, info)
    gf_all = np.array([pf[i] for i in sorted(pf)], dtype=np.int64)
    for i in range(20):                                   # B
        rc, mfns_b = xen.hvm_p2m(g.domid, gf_all)[:2]
        assert rc == 0, xen.hvm_p2m_failed
        if i % 5 == 4:
            check("p2m", i, {"rc": rc})
    # C: the frames come from phase B's last hvm_p2m (after A, so current), gfns A did not
    # touch; no new lookup.  (An M2P search by gfn is not enough: every domain has its own gfn
    # space and freed frames keep their last entry -- the v2 run found two frames besides
    # dom0's for every gfn tried.)
    p2m_b = dict(zip(gf_all.tolist(), mfns_b.tolist()))
    touched = {pf[(37 + 97 * i) % n] for i in range(20)}
    picked = [pf[(1011 + 211 * k) % n] for k in range(64)]
    picked = [x for x in dict.fromkeys(picked) if x not in touched][:8]
    for i, gfn in enumerate(picked):
        mfn = int(p2m_b[gfn])
        m2p_ok = int(xen.m2p(np.array([mfn]))[0]) == gfn
        guard = T.guarded(xen, [mfn])
        st = T.mark(xen, [mfn])[0]
        assert T.owned_pending(st, g.domid), hex(st)
        try:
            info = decpop(gfn)
        finally:
            guard.release()
        info.update(mfn=hex(mfn), m2p_ok=m2p_ok, status_after=hex(T.status(xen, mfn)))
        check("inplace", i, info)
    time.sleep(10)
    check("idle", 0, {})
    rep = xen.live_migrate(g.domid)                       # D
    if rep.ok and rep.new_domid is not None:
        g.domid = rep.new_domid
    time.sleep(10)
    check("migrate", 0, {"ok": rep.ok, "error": rep.error, "downtime_s": rep.downtime_s, "total_s": rep.total_s,
                         "errors": [ln for ln in rep.log if "rror" in ln or "fail" in ln][:12]})
    proc.terminate()
    rec.add("dom0-watch-cpu", **_cpu_record())
    assert seen["ok"], f"dom0 disturbed first after {seen.get('first')}"
    assert rep.ok, rep.error
