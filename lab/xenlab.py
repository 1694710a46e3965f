#!/usr/bin/env python3
"""xenpage lab: boot a real Xen 4.17 host (Debian bookworm packages) under QEMU/TCG and run
scenarios in its dom0.

    lab/xenlab.py build                       install host packages, build the cached dom0 image
    lab/xenlab.py run SCENARIO [--timeout S] [--results DIR] [--vcpus N] [--arg K=V ...]
    lab/xenlab.py test                        build + run the default scenarios; non-zero on failure
    lab/xenlab.py list                        list the scenarios

Host side: Python 3 standard library only. Everything built from third-party packages lives in
the cache directory (env XENPAGE_LAB_CACHE, default ~/.cache/xenpage-lab), never in the repo.
See lab/README.md for how it works and how to add a scenario.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
import zlib
from pathlib import Path

LAB_DIR = Path(__file__).resolve().parent
REPO = LAB_DIR.parent

# Bump when the recipe of the cached dom0 image changes: the image is then rebuilt.
RECIPE_VERSION = 4

HOST_PACKAGES = [
    "qemu-system-x86", "xen-hypervisor-4.17-amd64", "linux-image-amd64", "debootstrap",
    "busybox-static", "cpio", "gcc", "libc6-dev", "libxen-dev",
]
DOM0_PACKAGES = [
    "xen-utils-4.17", "xenstore-utils", "python3", "kmod", "procps", "busybox",
    "python3-numpy", "python3-click", "python3-rich", "python3-pytest", "python3-hypothesis", "python3-pytest-xdist",
    # HVM guests: the device model (QEMU built for Xen) and its firmware
    "qemu-system-xen", "seabios",
]
DOM0_IMPORT_CHECK = "import numpy, click, rich, pytest, hypothesis, xdist"
SUITE = "bookworm"
XEN_GZ = Path("/boot/xen-4.17-amd64.gz")
SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
DEFAULT_SCENARIOS = ["hptool", "sysctl", "pytest"]

# Paths inside dom0 (the payload cpio is unpacked at /xenpage).
GUEST_ROOT = "/xenpage"
DOM0_INIT = GUEST_ROOT + "/lab/dom0/init"
DOMU_KERNEL = "/var/lib/xenlab/vmlinuz"

BOOT_TIMEOUT = 120          # s until the "XENPAGE-LAB INIT" marker must appear
POWEROFF_GRACE = 30         # s QEMU gets to exit after "XENPAGE-LAB DONE"

MARK = "XENPAGE-LAB"
RE_INIT = re.compile(MARK + r" INIT uptime=([0-9.]+)")
RE_STEP = re.compile(MARK + r" STEP ([A-Za-z0-9._:/-]+) (BEGIN|OK|FAIL)(?: (.*))?$")
RE_FILE_BEGIN = re.compile(MARK + r" FILE ([A-Za-z0-9._@-]+) BEGIN size=(\d+) sha256=([0-9a-f]{64}) chunks=(\d+)")
RE_FILE_END = re.compile(MARK + r" FILE ([A-Za-z0-9._@-]+) END")
RE_B64 = re.compile(MARK + r" B64 ([A-Za-z0-9._@-]+) (\d+) ([0-9a-f]{8}) ([A-Za-z0-9+/=]+)")
RE_DONE = re.compile(MARK + r" DONE rc=(-?\d+) uptime=([0-9.]+)")
RE_NOTE = re.compile(MARK + r" NOTE (.*)$")

# Serial-log lines after which the run cannot succeed: stop at once and say why.
FATAL = re.compile(r"Failed to execute \S*init|Kernel panic - not syncing|\(XEN\) Panic on CPU|"
                   r"\(XEN\) \*+ Panic|Attempted to kill init")

# Milestones timed from the serial log (host wall clock since QEMU start).
MILESTONES = [
    ("xen_banner", re.compile(r"Xen version \d")),
    ("dom0_build", re.compile(r"Building a PV Dom0")),
    ("xen_init_freed", re.compile(r"Freed \d+kB init memory")),
    ("dom0_init", RE_INIT),
    ("daemons_up", re.compile(MARK + r" STEP xen-daemons OK")),
    ("done", RE_DONE),
]


class LabError(Exception):
    """A loud lab failure: message says which step failed and why."""


def log(msg: str) -> None:
    print(f"[xenlab] {msg}", flush=True)


def cache_dir() -> Path:
    d = Path(os.environ.get("XENPAGE_LAB_CACHE") or Path.home() / ".cache" / "xenpage-lab")
    d.mkdir(parents=True, exist_ok=True)
    return d


def tail(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def sh(cmd, *, what: str, log_file: Path | None = None, cwd=None, env=None, input=None):
    """Run a command; raise LabError naming `what` with the output's tail on failure."""
    p = subprocess.run(cmd, cwd=cwd, env=env, input=input, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as f:
            f.write(f"$ {' '.join(map(str, cmd))}\n{p.stdout}\n[exit {p.returncode}]\n")
    if p.returncode != 0:
        raise LabError(f"{what} failed (exit {p.returncode}): {tail(p.stdout)}")
    return p.stdout


# --------------------------------------------------------------------------------------------
# build
# --------------------------------------------------------------------------------------------

def mirror() -> str:
    """The Debian mirror, read at run time (never written into the repo)."""
    try:
        for line in SOURCES.read_text().splitlines():
            if line.strip().startswith("URIs:"):
                return line.split()[1]
    except OSError as e:
        raise LabError(f"build: cannot read {SOURCES}: {e}")
    raise LabError(f"build: no 'URIs:' line in {SOURCES}")


def missing_packages(pkgs) -> list[str]:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n", *pkgs],
                       stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    ok = {line.split()[0] for line in p.stdout.splitlines() if line.endswith(" install ok installed")}
    return [x for x in pkgs if x not in ok]


def ensure_host_packages(logs: Path) -> None:
    if os.geteuid() != 0:
        raise LabError("build: must run as root (apt-get, debootstrap, chroot, mknod)")
    missing = missing_packages(HOST_PACKAGES)
    if not missing:
        return
    log(f"apt-get install {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sh(["apt-get", "update", "-qq"], what="apt-get update", log_file=logs / "apt.log", env=env)
    sh(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
       what="apt-get install", log_file=logs / "apt.log", env=env)
    still = missing_packages(HOST_PACKAGES)
    if still:
        raise LabError(f"apt-get install failed: still missing {' '.join(still)}")


def kernel_version() -> str:
    kvs = [p.name for p in Path("/lib/modules").glob("*-amd64")
           if Path(f"/boot/vmlinuz-{p.name}").exists()]
    if not kvs:
        raise LabError("build: no /lib/modules/*-amd64 with a /boot/vmlinuz (linux-image-amd64 missing?)")

    def key(v):
        return [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)]
    return sorted(kvs, key=key)[-1]


def pkg_version(pkg: str) -> str:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Version}", pkg], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
    return p.stdout.strip()


def build_xen_elf(cache: Path) -> Path:
    dst = cache / "xen-4.17.elf"
    if not XEN_GZ.exists():
        raise LabError(f"build: {XEN_GZ} missing (xen-hypervisor-4.17-amd64 not installed?)")
    if not dst.exists() or dst.stat().st_mtime < XEN_GZ.stat().st_mtime:
        # QEMU's multiboot loader wants the plain ELF, not xen.gz.
        tmp = dst.with_suffix(".tmp")
        with gzip.open(XEN_GZ, "rb") as src, open(tmp, "wb") as out:
            shutil.copyfileobj(src, out)
        tmp.rename(dst)
    return dst


def image_stamp(kv: str) -> dict:
    return {"recipe": RECIPE_VERSION, "suite": SUITE, "packages": DOM0_PACKAGES, "kernel": kv,
            "xen_hypervisor": pkg_version("xen-hypervisor-4.17-amd64")}


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def remove_tree(path: Path) -> None:
    """rm -rf a chroot, first unmounting anything a failed debootstrap left mounted in it."""
    if not path.exists():
        return
    prefix = str(path.resolve()) + "/"
    mounts = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()]
    for m in sorted((m for m in mounts if m.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", m], stderr=subprocess.DEVNULL)
    mounts = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()]
    if any(m.startswith(prefix) for m in mounts):
        raise LabError(f"build: cannot unmount everything under {path}")
    shutil.rmtree(path)


def build_dom0_image(cache: Path, kv: str, logs: Path, timings: dict) -> Path:
    out = cache / "dom0.cpio"
    stamp_file = cache / "dom0.stamp.json"
    stamp = image_stamp(kv)
    if out.exists() and read_json(stamp_file) == stamp:
        log(f"dom0 image up to date: {out} ({out.stat().st_size >> 20} MiB)")
        return out
    root = cache / "rootfs"
    for p in (root, cache / "rootfs.tmp"):
        remove_tree(p)
    out.unlink(missing_ok=True)
    stamp_file.unlink(missing_ok=True)
    tmp = cache / "rootfs.tmp"
    t0 = time.time()
    log(f"debootstrap {SUITE} (minbase + {len(DOM0_PACKAGES)} packages) -> {tmp}")
    try:
        sh(["debootstrap", "--variant=minbase", "--include=" + ",".join(DOM0_PACKAGES), SUITE,
            str(tmp), mirror()], what="build: debootstrap", log_file=logs / "debootstrap.log")
    except LabError as e:
        dlog = tmp / "debootstrap" / "debootstrap.log"
        extra = tail(dlog.read_text(errors="replace"), 10) if dlog.exists() else ""
        raise LabError(f"{e}\n{extra}")
    timings["debootstrap_s"] = round(time.time() - t0, 1)
    t0 = time.time()
    sh(["chroot", str(tmp), "python3", "-c", DOM0_IMPORT_CHECK],
       what="build: python imports in dom0 rootfs", log_file=logs / "rootfs.log")
    # Xen dom0 drivers (xenfs, xen-evtchn, xen-gntdev, xen-privcmd are modules in Debian).
    kmod_src = Path(f"/lib/modules/{kv}")
    kmod_dst = tmp / f"lib/modules/{kv}"
    (kmod_dst / "kernel/drivers").mkdir(parents=True, exist_ok=True)
    shutil.copytree(kmod_src / "kernel/drivers/xen", kmod_dst / "kernel/drivers/xen", dirs_exist_ok=True)
    for f in kmod_src.glob("modules.builtin*"):
        shutil.copy2(f, kmod_dst / f.name)
    shutil.copy2(kmod_src / "modules.order", kmod_dst / "modules.order")
    sh(["chroot", str(tmp), "depmod", kv], what="build: depmod", log_file=logs / "rootfs.log")
    # The same kernel boots the PV domUs.
    (tmp / "var/lib/xenlab").mkdir(parents=True, exist_ok=True)
    shutil.copy2(f"/boot/vmlinuz-{kv}", tmp / DOMU_KERNEL.lstrip("/"))
    for d in ("var/log/xen/console", "var/lib/xen", "etc/xen"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    with open(tmp / "etc/default/xen", "a") as f:
        f.write('\n# xenpage lab: guest consoles to /var/log/xen/console/guest-NAME.log\n'
                'XENCONSOLED_ARGS="--log=guest --log-dir=/var/log/xen/console"\n')
    # Slim down (no network inside the lab anyway).
    for pat in ("usr/share/doc/*", "usr/share/man/*", "usr/share/locale/*", "usr/share/info/*",
                "var/cache/apt/*.bin", "var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_Packages"):
        for p in tmp.glob(pat):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    tmp.rename(root)
    # Pack as an uncompressed newc cpio (Linux unpacks it as the initramfs).
    log("packing dom0 cpio")
    part = out.with_suffix(".part")
    with open(part, "wb") as f:
        files = subprocess.run(["find", "."], cwd=root, stdout=subprocess.PIPE, check=True).stdout
        p = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=files, stdout=f,
                           stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise LabError(f"build: cpio failed: {p.stderr.decode(errors='replace')[-500:]}")
    part.rename(out)
    timings["rootfs_finish_and_pack_s"] = round(time.time() - t0, 1)
    stamp_file.write_text(json.dumps(stamp, indent=1) + "\n")
    log(f"dom0 image built: {out} ({out.stat().st_size >> 20} MiB)")
    return out


def build(args=None) -> dict:
    cache = cache_dir()
    logs = cache / "logs"
    timings: dict = {}
    t0 = time.time()
    ensure_host_packages(logs)
    timings["host_packages_s"] = round(time.time() - t0, 1)
    kv = kernel_version()
    xen = build_xen_elf(cache)
    img = build_dom0_image(cache, kv, logs, timings)
    timings["build_total_s"] = round(time.time() - t0, 1)
    info = {"kernel": kv, "xen_elf": str(xen), "dom0_cpio": str(img),
            "dom0_cpio_mib": img.stat().st_size >> 20, "timings": timings}
    (cache / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
    log(f"build ok in {timings['build_total_s']} s")
    return info


# --------------------------------------------------------------------------------------------
# payload (project tree + domU initramfs), rebuilt on every run
# --------------------------------------------------------------------------------------------

class Cpio:
    """A minimal newc cpio writer (uid/gid 0)."""

    def __init__(self, f):
        self.f = f
        self.ino = 1000
        self.n = 0
        self.dirs: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0), mtime=0):
        self.ino += 1
        nb = name.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            self.ino, mode, 0, 0, 1, int(mtime), len(data), 0, 0, rdev[0], rdev[1], len(nb), 0))
        self._w(hdr.encode() + nb)
        self._pad()
        self._w(data)
        self._pad()

    def _w(self, b: bytes):
        self.f.write(b)
        self.n += len(b)

    def _pad(self):
        if self.n % 4:
            self._w(b"\0" * (4 - self.n % 4))

    def mkdirs(self, path: str):
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def add_bytes(self, name: str, data: bytes, mode=0o644):
        name = name.strip("/")
        self.mkdirs(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data, mtime=time.time())

    def add_file(self, name: str, src: Path):
        exe = os.access(src, os.X_OK) or src.name == "init" or "/scenarios/" in name
        mode = 0o755 if exe else 0o644
        self.add_bytes(name, src.read_bytes(), mode)

    def add_tree(self, name: str, src: Path):
        skip = {"__pycache__", ".pytest_cache", ".hypothesis", "results"}
        for dirpath, dirnames, filenames in os.walk(src):
            dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.endswith(".egg-info"))
            rel = os.path.relpath(dirpath, src)
            base = name if rel == "." else f"{name}/{rel}"
            self.mkdirs(base)
            for fn in sorted(filenames):
                if fn.endswith((".pyc", ".pyo")):
                    continue
                p = Path(dirpath) / fn
                if p.is_file():
                    self.add_file(f"{base}/{fn}", p)

    def add_chardev(self, name: str, major: int, minor: int, mode=0o600):
        self.mkdirs(os.path.dirname(name.strip("/")))
        self._entry(name.strip("/"), stat.S_IFCHR | mode, rdev=(major, minor))

    def close(self):
        self._entry("TRAILER!!!", 0)
        if self.n % 512:
            self._w(b"\0" * (512 - self.n % 512))


def build_memtest(work: Path) -> Path:
    src = LAB_DIR / "guest" / "memtest.c"
    exe = work / "memtest"
    sh(["gcc", "-static", "-O2", "-Wall", "-Werror", "-o", str(exe), str(src)],
       what="payload: gcc -static memtest.c")
    return exe


def build_domu_initrd(work: Path) -> bytes:
    exe = build_memtest(work)
    busybox = Path("/bin/busybox")
    if not busybox.exists():
        raise LabError("payload: /bin/busybox missing (busybox-static not installed?)")
    path = work / "domu-initrd.cpio"
    with open(path, "wb") as f:
        c = Cpio(f)
        for d in ("bin", "dev", "proc", "sys", "tmp"):
            c.mkdirs(d)
        c.add_chardev("dev/console", 5, 1)
        c.add_bytes("bin/busybox", busybox.read_bytes(), 0o755)
        c.add_bytes("bin/memtest", exe.read_bytes(), 0o755)
        c.add_file("init", LAB_DIR / "guest" / "init")
        c.close()
    return path.read_bytes()


def add_entry_points(c: Cpio) -> None:
    """Make the project look installed in dom0 (there is no pip there): a console script in
    /usr/local/bin for each [project.scripts] entry and a minimal .dist-info on PYTHONPATH."""
    try:
        import tomllib
        proj = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    except (ImportError, OSError, KeyError, ValueError):
        return
    name, version = proj.get("name", "xenpage"), proj.get("version", "0")
    scripts = proj.get("scripts", {})
    for cmd, target in scripts.items():
        mod, _, func = target.partition(":")
        c.add_bytes(f"usr/local/bin/{cmd}", (
            "#!/usr/bin/python3\nimport sys\n"
            f"from {mod} import {func.split('.')[0]} as _main\n"
            f"sys.exit(_main{('.' + func.split('.', 1)[1]) if '.' in func else ''}())\n").encode(), 0o755)
    di = f"xenpage/src/{name.replace('-', '_')}-{version}.dist-info"
    c.add_bytes(f"{di}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode())
    if scripts:
        c.add_bytes(f"{di}/entry_points.txt", ("[console_scripts]\n" + "".join(
            f"{k} = {v}\n" for k, v in scripts.items())).encode())


def build_payload(work: Path, scenario: Path, run_env: dict) -> Path:
    path = work / "payload.cpio"
    with open(path, "wb") as f:
        c = Cpio(f)
        for name in ("src", "tests", "tests_xen", "bench"):
            if (REPO / name).is_dir():
                c.add_tree(f"xenpage/{name}", REPO / name)
        for name in ("pyproject.toml", "README.md"):
            if (REPO / name).is_file():
                c.add_file(f"xenpage/{name}", REPO / name)
        for name in ("dom0", "guest", "scenarios"):
            c.add_tree(f"xenpage/lab/{name}", LAB_DIR / name)
        add_entry_points(c)
        c.add_bytes("xenpage/domu-initrd.cpio", build_domu_initrd(work))
        env = "".join(f"{k}='{v}'\n" for k, v in run_env.items())
        c.add_bytes("xenpage/run.env", env.encode())
        c.close()
    return path


# --------------------------------------------------------------------------------------------
# serial log protocol
# --------------------------------------------------------------------------------------------

class SerialParser:
    def __init__(self):
        self.steps: dict[str, dict] = {}
        self.order: list[str] = []
        self.files: dict[str, dict] = {}
        self.notes: list[str] = []
        self.init = None
        self.done = None
        self.milestones: dict[str, float] = {}
        self.fatal = None

    def feed(self, line: str, t: float):
        if self.fatal is None and FATAL.search(line):
            self.fatal = line.strip()
        for name, rx in MILESTONES:
            if name not in self.milestones and rx.search(line):
                self.milestones[name] = round(t, 1)
        if MARK not in line:
            return
        m = RE_B64.search(line)
        if m:
            name, seq, crc, data = m.group(1), int(m.group(2)), m.group(3), m.group(4)
            if f"{zlib.crc32(data.encode()) & 0xffffffff:08x}" == crc:
                self.files.setdefault(name, {"chunks": {}}).setdefault("chunks", {})[seq] = data
            else:
                self.files.setdefault(name, {"chunks": {}}).setdefault("bad_lines", 0)
                self.files[name]["bad_lines"] += 1
            return
        m = RE_STEP.search(line)
        if m:
            name, what, reason = m.group(1), m.group(2), (m.group(3) or "").strip()
            st = self.steps.get(name)
            if st is None:
                st = self.steps[name] = {"name": name, "status": "BEGIN", "t_begin": None}
                self.order.append(name)
            if what == "BEGIN":
                st["t_begin"] = round(t, 1)
            else:
                st["status"] = what
                st["reason"] = reason
                st["t_end"] = round(t, 1)
            return
        m = RE_FILE_BEGIN.search(line)
        if m:
            f = self.files.setdefault(m.group(1), {"chunks": {}})
            f.update(size=int(m.group(2)), sha256=m.group(3), nchunks=int(m.group(4)))
            return
        if RE_FILE_END.search(line):
            return
        m = RE_INIT.search(line)
        if m:
            self.init = float(m.group(1))
            return
        m = RE_DONE.search(line)
        if m:
            self.done = {"rc": int(m.group(1)), "uptime": float(m.group(2))}
            return
        m = RE_NOTE.search(line)
        if m:
            self.notes.append(m.group(1))

    def decode_files(self, outdir: Path) -> dict:
        """Write every complete, checksummed file to outdir; "<base>@<n>" parts are joined
        in order into <base>. Returns {name: {"ok": bool, ...}}."""
        res, parts = {}, {}
        for name, f in self.files.items():
            info = {"ok": False}
            data = None
            if "sha256" not in f:
                info["error"] = "no FILE BEGIN line"
            else:
                missing = [i for i in range(f["nchunks"]) if i not in f.get("chunks", {})]
                if missing:
                    info["error"] = f"{len(missing)} of {f['nchunks']} chunks missing/corrupt"
                else:
                    data = base64.b64decode("".join(f["chunks"][i] for i in range(f["nchunks"])))
                    if hashlib.sha256(data).hexdigest() != f["sha256"]:
                        info["error"], data = "sha256 mismatch", None
            if f.get("bad_lines"):
                info["bad_lines"] = f["bad_lines"]
            base, sep, n = name.rpartition("@")
            if sep and n.isdigit():
                parts.setdefault(base, {})[int(n)] = (data, info)
                continue
            if data is not None:
                (outdir / name).write_bytes(data)
                info.update(ok=True, size=len(data))
            res[name] = info
        for base, ps in parts.items():
            good = [i for i in range(max(ps) + 1) if i in ps and ps[i][0] is not None]
            bad = [i for i in range(max(ps) + 1) if i not in good]
            (outdir / base).write_bytes(b"".join(ps[i][0] for i in good))
            info = {"ok": not bad, "parts": len(good), "size": (outdir / base).stat().st_size}
            if bad:
                info["error"] = f"parts missing/corrupt: {bad}"
            res[base] = info
        return res


# --------------------------------------------------------------------------------------------
# run
# --------------------------------------------------------------------------------------------

class MceMonitor:
    """QEMU's human monitor on a unix socket: machine checks injected from outside the
    machine, the way the hardware raises them.  dom0 asks with a console note
    ``XENPAGE-LAB NOTE mce-inject CPU BANK STATUS MCGSTATUS ADDR MISC`` (QEMU's
    ``mce cpu bank status mcg_status addr misc``) or ``mce-monitor COMMAND`` (any monitor
    command, e.g. ``info registers``); every command and QEMU's answer go to
    ``monitor.log`` with the run's time."""

    PROMPT = b"(qemu) "

    def __init__(self, path: Path, logfile: Path):
        self.path = path
        self.logfile = logfile
        self.sock = None
        self.done = 0

    def _connect(self) -> None:
        import socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(self.path))
        self.sock = s
        self._until_prompt()

    def _until_prompt(self) -> str:
        buf = b""
        while not buf.endswith(self.PROMPT):
            chunk = self.sock.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf.decode("utf-8", "replace")

    def command(self, text: str, now: float) -> str:
        try:
            if self.sock is None:
                self._connect()
            self.sock.sendall(text.encode() + b"\n")
            out = self._until_prompt()
        except OSError as e:
            out = f"monitor error: {e}"
        # the monitor echoes the command line (with terminal escapes); keep the answer
        ans = out.replace("\r", "").split("\n")
        ans = [a for a in ans[1:] if a.strip() and not a.startswith("(qemu)")]
        with open(self.logfile, "a") as f:
            f.write(f"{now:8.1f}s > {text}\n")
            for a in ans:
                f.write(f"{now:8.1f}s < {a}\n")
        log(f"  {now:6.1f}s  monitor: {text}" + (f" -> {' | '.join(ans)[:200]}" if ans else ""))
        return "\n".join(ans)

    def on_note(self, parser, now: float) -> None:
        while self.done < len(parser.notes):
            note = parser.notes[self.done].strip()
            self.done += 1
            if note.startswith("mce-inject "):
                self.command("mce " + note[len("mce-inject "):], now)
            elif note.startswith("mce-monitor "):
                self.command(note[len("mce-monitor "):], now)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def scenario_options(path: Path) -> dict:
    """A scenario may declare its defaults in a comment line, e.g.
    # lab-options: vcpus=2 timeout=1800 mem=4096 dom0_mem=3072      (mem, dom0_mem in MiB)"""
    opts = {}
    for line in path.read_text(errors="replace").splitlines()[:15]:
        m = re.match(r"#\s*lab-options:\s*(.*)$", line)
        if m:
            for kv in m.group(1).split():
                k, _, v = kv.partition("=")
                opts[k] = float(v) if k == "timeout" else int(v) if k in ("vcpus", "mem", "dom0_mem") else v
    return opts


def build_xen_rebuilt() -> Path:
    """The lab's rebuilt Xen 4.17 (lab/xen-rebuilt/build.sh): Debian bookworm's source package
    of Xen with upstream's machine-check bank-mask fix (the ``mce`` group) and
    CONFIG_SHADOW_PAGING=y (a PV guest's log-dirty mode: the ``prescan-shadow`` group), fetched
    with apt-get from the mirror this host already uses, into the cache."""
    cache = cache_dir()
    out = cache / "xen-4.17-rebuilt.elf"
    if out.exists():
        log(f"build-xen-rebuilt: {out} exists")
        return out
    src = cache / "xen-src"
    lists = src / "lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    if not list(src.glob("xen_*.orig.tar.xz")):
        mirror = next((ln.split()[1] for ln in Path("/etc/apt/sources.list.d/debian.sources")
                       .read_text().splitlines() if ln.startswith("URIs:")), None)
        if mirror is None:
            raise LabError("build-xen-rebuilt: no URIs: line in /etc/apt/sources.list.d/debian.sources")
        (src / "src.list").write_text(f"deb-src {mirror} bookworm main\n")
        apt = ["apt-get", "-o", f"Dir::Etc::sourcelist={src / 'src.list'}", "-o",
               "Dir::Etc::sourceparts=/nonexistent", "-o", f"Dir::State::Lists={lists}"]
        sh(apt + ["update"], what="build-xen-rebuilt: apt-get update (deb-src)")
        sh(["sh", "-c", f"cd {src} && " + " ".join(apt) + " source --download-only xen/bookworm"],
           what="build-xen-rebuilt: apt-get source xen")
    for tool in ("flex", "bison", "gcc", "make"):
        if not shutil.which(tool):
            sh(["apt-get", "install", "-y", "-qq", "flex", "bison", "gcc", "make"],
               what="build-xen-rebuilt: apt-get install flex bison gcc make")
            break
    sh(["sh", str(LAB_DIR / "xen-rebuilt" / "build.sh"), str(src), str(out)],
       what="build-xen-rebuilt: build Xen's hypervisor (minutes)")
    return out


def xen_pt_load(elf: Path) -> tuple[int, int]:
    """(p_paddr, p_memsz) of the first PT_LOAD of Xen's 32-bit multiboot ELF: the image that
    Xen relocates as a whole (_stext .. __2M_rwdata_end, at offset p_paddr of its new base)."""
    import struct
    b = elf.read_bytes()[:4096]
    if b[:4] != b"\x7fELF" or b[4] != 1:
        raise LabError(f"run: {elf} is not a 32-bit ELF")
    phoff, = struct.unpack_from("<I", b, 28)
    phentsize, phnum = struct.unpack_from("<HH", b, 42)
    for i in range(phnum):
        typ, off, vaddr, paddr, filesz, memsz, flags, align = struct.unpack_from(
            "<8I", b, phoff + i * phentsize)
        if typ == 1:
            return paddr, memsz
    raise LabError(f"run: no PT_LOAD in {elf}")


def find_scenario(name: str) -> Path:
    for ext in ("", ".sh", ".py"):
        p = LAB_DIR / "scenarios" / f"{name}{ext}"
        if p.is_file():
            return p
    avail = ", ".join(sorted(p.stem for p in (LAB_DIR / "scenarios").glob("*.*")))
    raise LabError(f"run: no scenario '{name}' in lab/scenarios (have: {avail})")


def qemu_rss_kib(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(scenario_name: str, timeout: float | None, results: Path | None, vcpus: int | None = None,
        extra_args: dict | None = None, boot_timeout: float = BOOT_TIMEOUT,
        mem: int | None = None, dom0_mem: int | None = None) -> dict:
    cache = cache_dir()
    xen = cache / "xen-4.17.elf"
    img = cache / "dom0.cpio"
    if not xen.exists() or not img.exists():
        raise LabError(f"run: lab image missing in {cache} (run 'lab/xenlab.py build' first)")
    kv = kernel_version()
    scenario = find_scenario(scenario_name)
    opts = scenario_options(scenario)
    # lab-options: xen=rebuilt boots the lab's rebuilt Xen 4.17 (upstream's machine-check
    # bank-mask fix and CONFIG_SHADOW_PAGING=y: lab/xen-rebuilt/build.sh; 'xenlab.py
    # build-xen-rebuilt' leaves it in the cache); XENLAB_XEN_ELF names any other hypervisor image
    # (XENLAB_XEN=rebuilt, XENLAB_MONITOR=1 and XENLAB_CPU set the same per run: run_lab.py's groups)
    xen_variant = os.environ.get("XENLAB_XEN") or opts.get("xen")
    if os.environ.get("XENLAB_XEN_ELF"):
        xen = Path(os.environ["XENLAB_XEN_ELF"])
    elif xen_variant:
        xen = cache / f"xen-4.17-{xen_variant}.elf"
    if not xen.exists():
        raise LabError(f"run: {xen} missing (for xen=rebuilt: 'lab/xenlab.py build-xen-rebuilt')")
    timeout = timeout or opts.get("timeout", 600)
    vcpus = vcpus or opts.get("vcpus", 1)
    mem = mem or opts.get("mem", 2048)
    dom0_mem = dom0_mem or opts.get("dom0_mem", 1024)
    if dom0_mem > mem - 256:
        raise LabError(f"run: dom0_mem {dom0_mem} MiB does not fit in {mem} MiB")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if results is None:
        results = cache / "results" / f"{scenario_name}-{stamp}"
    results = results.resolve()
    results.mkdir(parents=True, exist_ok=True)
    work = cache / "work" / f"{scenario_name}-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    run_env = {"LAB_SCENARIO": scenario_name, "LAB_SCENARIO_FILE": f"lab/scenarios/{scenario.name}",
               "LAB_RUN_ID": stamp, "LAB_VCPUS": str(vcpus)}
    paddr, memsz = xen_pt_load(xen)
    run_env.update(LAB_XEN_PT_LOAD_PADDR=hex(paddr), LAB_XEN_PT_LOAD_MEMSZ=hex(memsz))
    for k, v in (extra_args or {}).items():
        if not re.fullmatch(r"[A-Z][A-Z0-9_]*", k) or "'" in v:
            raise LabError(f"run: bad --arg {k}={v}")
        run_env[k] = v
    t0 = time.time()
    payload = build_payload(work, scenario, run_env)
    initrd = work / "initrd.cpio"
    with open(initrd, "wb") as out:
        for part in (img, payload):
            with open(part, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    t_payload = round(time.time() - t0, 1)

    serial = results / "serial.log"
    serial.unlink(missing_ok=True)
    serial.touch()
    xen_args = ("console=com1 com1=115200,8n1 loglvl=all guest_loglvl=all "
                f"dom0_mem={dom0_mem}M,max:{dom0_mem}M dom0_max_vcpus={vcpus} smap=0")
    # lab-options: xen_args=a=b+c=d (extra words for Xen's command line, '+' between them),
    # cpu=MODEL (QEMU's -cpu; default max), monitor=1 (a QEMU monitor for machine checks)
    if opts.get("xen_args"):
        xen_args += " " + " ".join(str(opts["xen_args"]).split("+"))
    cpu_model = os.environ.get("XENLAB_CPU") or str(opts.get("cpu", "max"))
    # eager_fpu=0 (XENLAB_EAGER_FPU=0): Xen's own choice, lazy FPU switching on the AMD CPU
    # models -- under QEMU 7.2's TCG it gives dom0 processes wrong vector-register contents
    # (wrong memcpy/SHA-256 results, heap corruption, SIGSEGVs) with no guest operation at
    # all (tests_xen/README.md, "The lab machine's FPU fault"); by default Xen switches the
    # FPU state eagerly (its spec-ctrl=eager-fpu option)
    if (os.environ.get("XENLAB_EAGER_FPU") or str(opts.get("eager_fpu", "1"))) != "0":
        xen_args += " spec-ctrl=eager-fpu"
    if os.environ.get("XENLAB_XEN_ARGS"):
        xen_args += " " + os.environ["XENLAB_XEN_ARGS"]
    # XENLAB_MONITOR=1 gives any scenario a monitor: a run killed for a timeout then records
    # every vCPU's registers first (where a hung Xen or dom0 is spinning)
    want_monitor = opts.get("monitor") or os.environ.get("XENLAB_MONITOR") == "1"
    monitor = MceMonitor(work / "monitor.sock", results / "monitor.log") if want_monitor else None
    # No commas allowed in a module command line (',' separates -initrd modules).
    dom0_args = f"console=hvc0 earlyprintk=xen rdinit={DOM0_INIT} loglevel=6"
    cmd = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", cpu_model, "-smp", "2", "-m", str(mem),
           "-display", "none", "-nodefaults", "-no-reboot", "-serial", f"file:{serial}",
           "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
           "-kernel", str(xen), "-append", xen_args,
           "-initrd", f"/boot/vmlinuz-{kv} {dom0_args},{initrd}"]
    if monitor is not None:
        monitor.path.unlink(missing_ok=True)
        cmd += ["-monitor", f"unix:{monitor.path},server,nowait"]
    (results / "qemu-cmdline.txt").write_text(" ".join(cmd) + "\n")
    log(f"run {scenario_name}: booting (timeout {timeout:.0f} s, serial -> {serial})")
    qlog = open(results / "qemu.log", "w")
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=qlog, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    parser = SerialParser()
    failures: list[str] = []
    killed = None
    rss = 0
    done_at = None
    last_step_printed = set()
    buf = b""
    with open(serial, "rb") as sf:
        while True:
            chunk = sf.read()
            now = time.time() - start
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace").rstrip("\r")
                    parser.feed(line, now)
                    if monitor is not None:
                        monitor.on_note(parser, now)
                for name in parser.order:
                    st = parser.steps[name]
                    key = (name, st["status"])
                    if key not in last_step_printed:
                        last_step_printed.add(key)
                        extra = f" {st.get('reason')}" if st.get("reason") else ""
                        log(f"  {now:6.1f}s  step {name} {st['status']}{extra}")
            rss = max(rss, qemu_rss_kib(proc.pid))
            if parser.done is not None and done_at is None:
                done_at = now
            rc = proc.poll()
            if rc is not None:
                if chunk:
                    continue   # drain the log
                break
            if parser.fatal:
                killed = f"{'boot' if parser.init is None else 'dom0'}: fatal console line: {parser.fatal}"
            elif parser.init is None and now > boot_timeout:
                killed = f"boot: no '{MARK} INIT' marker within {boot_timeout:.0f} s"
            elif now > timeout:
                running = [n for n in parser.order if parser.steps[n]["status"] == "BEGIN"]
                killed = (f"timeout: QEMU killed after {timeout:.0f} s" +
                          (f"; step '{running[-1]}' never finished" if running else ""))
            elif done_at is not None and now - done_at > POWEROFF_GRACE:
                killed = f"poweroff: QEMU still running {POWEROFF_GRACE} s after '{MARK} DONE'"
            if killed:
                if monitor is not None:
                    for probe in ("info cpus", "info registers -a"):
                        monitor.command(probe, now)
                    if killed.startswith("timeout"):
                        # an NMI of unknown reason is fatal to Xen by default (opt_nmi
                        # "fatal"): it prints each CPU's state and call trace, with symbols,
                        # on the serial console before QEMU is stopped
                        monitor.command("nmi", now)
                        time.sleep(15)
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                continue
            time.sleep(0.25 if chunk else 0.5)
    qlog.close()
    if monitor is not None:
        monitor.close()
    wall = round(time.time() - start, 1)
    qemu_rc = proc.returncode
    if buf:
        parser.feed(buf.decode("utf-8", "replace"), wall)
    files = parser.decode_files(results)

    # ---- verdict
    if killed:
        failures.append(killed)
    if parser.init is None and not killed:
        failures.append(f"boot: QEMU exited (rc {qemu_rc}) before the '{MARK} INIT' marker")
    for name in parser.order:
        st = parser.steps[name]
        if st["status"] == "FAIL":
            failures.append(f"{name}: {st.get('reason') or 'failed'}")
        elif st["status"] == "BEGIN" and not killed:
            failures.append(f"{name}: started but never finished")
    if parser.init is not None and parser.done is None and not killed:
        failures.append(f"dom0: no '{MARK} DONE' marker (QEMU rc {qemu_rc})")
    if not killed and qemu_rc not in (0, 33):
        failures.append(f"qemu: exit code {qemu_rc} (see {results / 'qemu.log'})")
    for name, info in files.items():
        if not info["ok"]:
            failures.append(f"results file {name}: {info['error']}")
    if failures and parser.init is None:
        lines = [ln for ln in serial.read_text(errors="replace").splitlines() if ln.strip()]
        failures.append("serial log tail:\n    " + "\n    ".join(lines[-12:]))

    summary = {
        "scenario": scenario_name, "ok": not failures, "failures": failures,
        "qemu_rc": qemu_rc, "wall_s": wall, "payload_s": t_payload, "qemu_peak_rss_mib": rss >> 10,
        "milestones_s": parser.milestones, "dom0_uptime_at_init": parser.init,
        "done": parser.done, "steps": [parser.steps[n] for n in parser.order],
        "files": files, "notes": parser.notes, "results_dir": str(results),
        "vcpus": vcpus, "mem_mib": mem, "dom0_mem_mib": dom0_mem, "args": extra_args or {},
    }
    (results / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    latest = cache / "results" / f"{scenario_name}-latest"
    try:
        if latest.is_symlink() or latest.exists():
            latest.unlink()
        latest.symlink_to(results)
    except OSError:
        pass
    shutil.rmtree(work, ignore_errors=True)
    ms = " ".join(f"{k}={v}" for k, v in parser.milestones.items())
    log(f"run {scenario_name}: {'OK' if not failures else 'FAILED'} wall={wall}s qemu_rc={qemu_rc} "
        f"peak_rss={rss >> 10}MiB [{ms}]")
    for f in failures:
        log(f"  FAIL {f}")
    log(f"  results: {results}")
    return summary


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

VERBATIM = {"hptool": ("hptool.json", "lab-verbatim.json"), "sysctl": ("sysctl.json", "lab-sysctl.json")}


def save_verbatim(results: Path | None, scenario: str = "hptool") -> Path:
    """Copy a successful hptool (sysctl) run into lab/results/lab-verbatim.json
    (lab-sysctl.json), committed: the simulator's fidelity tests compare against them."""
    src, dst = VERBATIM[scenario]
    if results is None:
        results = cache_dir() / "results" / f"{scenario}-latest"
    results = results.resolve()
    summary = read_json(results / "summary.json")
    data = read_json(results / src)
    if not summary or not data:
        raise LabError(f"save-verbatim: no summary.json/{src} in {results}")
    if not summary.get("ok"):
        raise LabError(f"save-verbatim: the run in {results} failed: {summary.get('failures')}")
    build_info = read_json(cache_dir() / "build-info.json") or {}
    data["lab"] = {
        "what": f"real Xen 4.17 (Debian bookworm) under QEMU/TCG, recorded by "
                f"lab/scenarios/{scenario}.py, see lab/README.md",
        "run_id": results.name,
        "qemu_cmdline": re.sub("(?:/boot/|" + re.escape(str(cache_dir())) + ")[^\\s,]*/", "", (results / "qemu-cmdline.txt").read_text().strip()),
        "host_packages": {p: pkg_version(p) for p in ("xen-hypervisor-4.17-amd64", "qemu-system-x86",
                                                      "linux-image-amd64")},
        "kernel": build_info.get("kernel"),
        "wall_s": summary["wall_s"], "milestones_s": summary["milestones_s"],
        "qemu_peak_rss_mib": summary["qemu_peak_rss_mib"],
        "steps": [{k: st.get(k) for k in ("name", "status", "reason", "t_begin", "t_end")}
                  for st in summary["steps"]],
    }
    out = LAB_DIR / "results" / dst
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    log(f"wrote {out} from {results}")
    return out


def parse_kv(items):
    out = {}
    for it in items or []:
        if "=" not in it:
            raise LabError(f"--arg wants KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k] = v
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="xenlab.py", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="install host packages and build the cached dom0 image")
    r = sub.add_parser("run", help="boot the lab and run one scenario")
    r.add_argument("scenario")
    r.add_argument("--timeout", type=float, help="kill QEMU after S s (default: the scenario's "
                   "lab-options, else 600)")
    r.add_argument("--boot-timeout", type=float, default=BOOT_TIMEOUT)
    r.add_argument("--results", type=Path)
    r.add_argument("--vcpus", type=int, help="dom0_max_vcpus, 1 or 2 (default: the scenario's "
                   "lab-options, else 1)")
    r.add_argument("--mem", type=int, help="QEMU memory in MiB (default 2048)")
    r.add_argument("--dom0-mem", type=int, help="dom0_mem in MiB (default 1024)")
    r.add_argument("--arg", action="append", metavar="KEY=VALUE",
                   help="exported to the scenario's environment")
    t = sub.add_parser("test", help="build + run the default scenarios")
    t.add_argument("--timeout", type=float, help="per scenario (default: its lab-options)")
    t.add_argument("--results", type=Path, help="parent directory for the per-scenario results")
    t.add_argument("scenarios", nargs="*", default=None)
    sub.add_parser("list", help="list scenarios")
    sub.add_parser("build-xen-rebuilt", help="build Xen 4.17 with the machine-check bank-mask "
                   "fix and shadow paging (the mce and prescan-shadow groups' hypervisor) "
                   "into the cache")
    v = sub.add_parser("save-verbatim", help="copy a successful hptool run to lab/results/lab-verbatim.json")
    v.add_argument("results", nargs="?", type=Path)
    v.add_argument("--scenario", choices=sorted(VERBATIM), default="hptool")
    a = ap.parse_args(argv)
    try:
        if a.cmd == "build":
            build()
            return 0
        if a.cmd == "build-xen-rebuilt":
            build_xen_rebuilt()
            return 0
        if a.cmd == "save-verbatim":
            save_verbatim(a.results, a.scenario)
            return 0
        if a.cmd == "list":
            for p in sorted((LAB_DIR / "scenarios").glob("*.*")):
                first = next((ln for ln in p.read_text().splitlines()[1:4] if ln.startswith("#")), "")
                print(f"{p.stem:12s} {first.lstrip('# ')}")
            return 0
        if a.cmd == "run":
            s = run(a.scenario, a.timeout, a.results, a.vcpus, parse_kv(a.arg), a.boot_timeout,
                    a.mem, a.dom0_mem)
            return 0 if s["ok"] else 1
        if a.cmd == "test":
            build()
            bad = []
            for name in a.scenarios or DEFAULT_SCENARIOS:
                res = a.results / name if a.results else None
                s = run(name, a.timeout, res)
                if not s["ok"]:
                    bad.append(f"{name}: " + "; ".join(s["failures"][:3]))
            if bad:
                log("LAB TEST FAILED:\n  " + "\n  ".join(bad))
                return 1
            log("lab test: all scenarios passed")
            return 0
    except LabError as e:
        print(f"[xenlab] ERROR: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
