"""Helpers of the real-Xen tests (run in the lab's dom0): PV memtest guests, the xenpage CLI,
stock xen-hptool, page-table snapshots, and a result stream back to the host."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xenpage.abi import pte as P
from xenpage.abi import sysctl as S
from xenpage.toolstack import exchange as XC
from xenpage.toolstack.pcpu import off_pcpu0

ROOT = Path(os.environ.get("LAB_ROOT", Path(__file__).resolve().parents[1]))
GUEST_CFG = ROOT / "lab/guest/memtest.cfg"
CONSOLE_DIR = Path("/var/log/xen/console")
HPTOOL = "/usr/lib/xen-4.17/bin/xen-hptool"
OUT = Path(os.environ.get("LAB_OUT", "/tmp/lab-out"))
AD = P._PAGE_ACCESSED | P._PAGE_DIRTY


@dataclass
class Run:
    argv: list[str]
    rc: int | None
    stdout: str
    stderr: str
    elapsed_s: float
    data: dict | None = None

    def to_json(self) -> dict:
        d = {"argv": self.argv, "exit": self.rc, "stdout": self.stdout, "stderr": self.stderr,
             "elapsed_s": round(self.elapsed_s, 3)}
        return d


def run(argv: list[str], timeout: float = 300, env: dict | None = None) -> Run:
    t = time.perf_counter()
    e = dict(os.environ, **(env or {}))
    try:
        p = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout, env=e)
        r = Run([str(a) for a in argv], p.returncode, p.stdout, p.stderr, time.perf_counter() - t)
    except subprocess.TimeoutExpired as ex:
        def text(b):  # TimeoutExpired carries bytes even with text=True
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        r = Run([str(a) for a in argv], None, text(ex.stdout), text(ex.stderr) + f"\n[timeout {timeout}s]",
                time.perf_counter() - t)
    return r


def xenpage_cmd() -> list[str]:
    exe = shutil.which("xenpage")
    return [exe] if exe else [sys.executable, "-m", "xenpage.cli.main"]


def xenpage(*args, as_json: bool = False, timeout: float = 300) -> Run:
    argv = xenpage_cmd() + ["--backend", "xen", *[str(a) for a in args]] + (["--json"] if as_json else [])
    r = run(argv, timeout=timeout)
    if as_json and r.stdout.strip():
        try:
            r.data = json.loads(r.stdout)
        except ValueError:
            r.data = None
    return r


def xenpage_inproc(*args, as_json: bool = False) -> Run:
    """The same CLI, run in this process (click's runner): identical lines, streams and exit
    code without a Python start-up per command (tens of seconds under QEMU/TCG)."""
    from click.testing import CliRunner

    from xenpage.cli.main import cli
    try:
        runner = CliRunner(mix_stderr=False)
    except TypeError:            # click >= 8.2 keeps stderr apart by default
        runner = CliRunner()
    argv = ["--backend", "xen", *[str(a) for a in args]] + (["--json"] if as_json else [])
    t = time.perf_counter()
    res = runner.invoke(cli, argv, catch_exceptions=False)
    r = Run(["xenpage(in-process)", *argv], res.exit_code, res.stdout, res.stderr, time.perf_counter() - t)
    if as_json and r.stdout.strip():
        r.data = json.loads(r.stdout)
    return r


def hptool(*args, timeout: float = 300) -> Run:
    return run(["stdbuf", "-oL", HPTOOL, *[str(a) for a in args]], timeout=timeout)


# -- results back to the host ------------------------------------------------------------------

class Recorder:
    """JSON-lines records: streamed over the lab console when labproto is importable (so a
    hung host loses nothing measured before), always written to $LAB_OUT/xenpage-xen.jsonl."""

    def __init__(self, name: str = "xenpage-xen.jsonl"):
        self.records: list[dict] = []
        self.stream = None
        try:
            sys.path.insert(0, str(ROOT / "lab/dom0"))
            import labproto
            if os.environ.get("LAB_OUT"):
                self.stream = labproto.Stream(name)
        except Exception:
            self.stream = None
        OUT.mkdir(parents=True, exist_ok=True)
        self.path = OUT / name
        if self.stream is None:
            self.path.write_text("")

    def add(self, kind: str, **data) -> dict:
        rec = {"kind": kind, "t": round(time.time(), 2), **data}
        rec = json.loads(json.dumps(rec, default=_default))
        self.records.append(rec)
        if self.stream is not None:
            self.stream.add(rec)
        else:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        return rec


def _default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_json"):
        return o.to_json()
    return str(o)


# -- guests ------------------------------------------------------------------------------------

RX_PFN = re.compile(r"^MEMTEST PFN (\d+) ([0-9a-f]+)\s*$", re.M)
RX_OK = re.compile(r"^MEMTEST OK gen=(\d+) pages=(\d+) corrupt=(\d+) moved=(\d+)", re.M)
RX_BAD = re.compile(r"^MEMTEST (CORRUPT|PFNMOVED|ERROR).*$", re.M)


@dataclass
class Guest:
    name: str
    domid: int
    cfg: Path
    pfn_cache: dict = field(default_factory=dict)

    @property
    def log_path(self) -> Path:
        return CONSOLE_DIR / f"guest-{self.name}.log"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def mark(self) -> int:
        return len(self.log())

    def pfns(self) -> dict[int, int]:
        if not self.pfn_cache:
            self.pfn_cache = {int(i): int(p, 16) for i, p in RX_PFN.findall(self.log())}
        return self.pfn_cache

    def heartbeats(self, after: int = 0) -> list[tuple[int, int, int, int]]:
        return [tuple(int(x) for x in m.groups()) for m in RX_OK.finditer(self.log(), after)]

    def bad_lines(self, after: int = 0) -> list[str]:
        return [m.group(0) for m in RX_BAD.finditer(self.log(), after)]

    def wait_heartbeats(self, n: int = 1, after: int = 0, timeout: float = 60) -> list:
        end = time.time() + timeout
        while time.time() < end:
            hb = self.heartbeats(after)
            if len(hb) >= n:
                return hb
            time.sleep(0.5)
        return self.heartbeats(after)

    def tail(self, n: int = 8) -> list[str]:
        return self.log().splitlines()[-n:]


def domid_of(name: str) -> int | None:
    r = run(["xl", "domid", name], timeout=60)
    return int(r.stdout.strip()) if r.rc == 0 and r.stdout.strip().isdigit() else None


def start_guest(name: str = "memtest", timeout: float = 240) -> Guest:
    """The lab's memtest PV guest under another name (16 MiB verified, 128 MiB RAM); reused
    when it already runs.  Returns once every MEMTEST PFN line and a first heartbeat are out."""
    cfg = Path("/tmp") / f"{name}.cfg"
    text = GUEST_CFG.read_text()
    text = re.sub(r'^name\s*=.*$', f'name = "{name}"', text, flags=re.M)
    cfg.write_text(text)
    d = domid_of(name)
    if d is None:
        r = run(["xl", "create", str(cfg)], timeout=120)
        assert r.rc == 0, f"xl create {cfg}: {r.stderr}"
        d = domid_of(name)
    g = Guest(name, d, cfg)
    end = time.time() + timeout
    while time.time() < end:
        log = g.log()
        if "MEMTEST PFNS-DONE" in log and RX_OK.search(log):
            return g
        time.sleep(1)
    raise AssertionError(f"guest {name} (d{d}) did not come up in {timeout} s: {g.tail()}")


def destroy_guest(xen, g: Guest) -> float:
    """Destroy with dom0 off physical CPU 0 (Xen 4.17's PoD-lock hang); returns seconds."""
    t = time.perf_counter()
    with off_pcpu0(xen):
        rc = xen.destroy(g.domid)
    assert rc == 0, f"destroy d{g.domid}: {rc}"
    for _ in range(100):
        if xen.domain_info(g.domid) is None:
            break
        time.sleep(0.1)
    return time.perf_counter() - t


# -- guest memory ------------------------------------------------------------------------------

def p2m(xen, domid: int) -> np.ndarray:
    rc, frames, n = xen.pv_p2m_frames(domid)
    assert rc == 0, f"pv_p2m_frames(d{domid}) -> {rc}"
    m = xen.map_foreign(domid, frames, False)
    assert not isinstance(m, int), f"map P2M of d{domid}: {m}"
    a = m.array.ravel()[:n].copy()
    m.unmap()
    return a


def pte_refs(xen, domid: int, mfns) -> dict[int, list[XC.PteRef]]:
    """Every present page-table entry of the guest naming each frame (one scan)."""
    view, err = XC.load_guest(xen, domid)
    assert err is None, err
    rc, refs = XC.scan(xen, view, np.asarray(list(mfns), dtype=np.int64))
    assert rc == 0, rc
    out: dict[int, list] = {int(m): [] for m in mfns}
    for r in refs:
        out[P.pte_frame(r.value)].append(r)
    return out


def read_entries(xen, domid: int, refs: list[XC.PteRef]) -> list[int]:
    tabs = sorted({r.table for r in refs})
    m = xen.map_foreign(domid, tabs, False)
    assert not isinstance(m, int), m
    row = {t: i for i, t in enumerate(tabs)}
    vals = [int(m.array[row[r.table], r.index]) for r in refs]
    m.unmap()
    return vals


def status(xen, mfn: int) -> int:
    rc, st = xen.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
    return -1 if rc else int(st[0])


def flags(v: int) -> int:
    return v & P.PTE_FLAGS_MASK
