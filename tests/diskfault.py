"""Out of disk or memory at a named point of ``mem-offline`` -- test support, never shipped.

A plug-in in the style of ``tests/crashrun.py``: it installs
:data:`xenpage.toolstack.crashpoint.hook` (the product only names its journal points and reads
no environment variable) and, the K-th time ``mem-offline`` reaches the chosen point, makes

* ``journal``: the next write of the journal fail half-way -- half the record reaches the file
  (a torn line), then ``OSError(errno)`` (``ENOSPC``, ``EDQUOT``, ``EIO``);
* ``host``: the next save of the simulated host fail -- the generation written, then
  ``OSError(errno)`` as its last fsync would (the half-written generation is the product's
  to remove);
* ``memory``: memory run out there and then (``MemoryError``);
* ``fill``: the file system of a path fill up (a real one: :func:`fill` writes zeros until
  ``ENOSPC``), so the next write *of any kind* fails for real and keeps failing;
* ``full``: the same without a file system to fill -- from then on every journal write is torn
  and every save of the host fails with ``ENOSPC`` (removing a file still works, as on a
  full disk).

Each failure is one-shot except ``fill`` and ``full``, which last until the test ends them.
"""

from __future__ import annotations

import errno as _errno
import os
from dataclasses import dataclass, field
from pathlib import Path

from xenpage import statefiles
from xenpage.hypervisor import persist
from xenpage.toolstack import crashpoint

ERRNOS = {"ENOSPC": _errno.ENOSPC, "EDQUOT": _errno.EDQUOT, "EIO": _errno.EIO}
TARGETS = ("journal", "host", "memory")
PERSISTENT = ("fill", "full")


def fill(path: str | os.PathLike) -> int:
    """Write zeros to ``path`` until its file system is full; the bytes written."""
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 1 << 12, 1 << 9, 1):
            buf = b"\0" * chunk
            while True:
                try:
                    w = os.write(fd, buf)
                except OSError as e:
                    if e.errno in (_errno.ENOSPC, _errno.EDQUOT):
                        break
                    raise
                n += w
                if w < chunk:
                    break
    finally:
        os.close(fd)
    return n


class _TornFile:
    """A journal file whose next write lands half, then fails with ``err``."""

    def __init__(self, f, err: int, path):
        self._f, self._err, self._path = f, err, path

    def write(self, text: str) -> int:
        self._f.write(text[: len(text) // 2])
        self._f.flush()
        raise OSError(self._err, os.strerror(self._err), str(self._path))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


@dataclass
class Plug:
    """``target`` fails after the ``k``-th time ``point`` is reached."""

    point: str
    target: str = "journal"
    err: str = "ENOSPC"
    k: int = 1
    fill_path: Path | None = None
    seen: dict = field(default_factory=dict)
    armed: bool = False
    #: what failed: None until something did
    fired: str | None = None
    _saved: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.point not in crashpoint.POINTS + crashpoint.OTHER_POINTS:
            raise ValueError(f"unknown point {self.point!r}")
        if self.target not in TARGETS + PERSISTENT:
            raise ValueError(f"unknown target {self.target!r}")

    def hook(self, name: str, hv) -> None:
        self.seen[name] = self.seen.get(name, 0) + 1
        if name != self.point or self.seen[name] != self.k or self.armed:
            return
        self.armed = True
        if self.target == "memory":
            self.fired = "memory"
            raise MemoryError(f"test: out of memory at {name}")
        if self.target == "fill":
            fill(self.fill_path)
            self.fired = "fill"
            return
        full = self.target == "full"
        if self.target in ("journal", "full"):
            real = statefiles.open_private

            def torn_open(path, mode="a"):
                f = real(path, mode)
                if Path(path).name == "exchange.journal" and (full or self.fired is None):
                    self.fired = self.fired or self.target
                    if not full:
                        statefiles.open_private = real
                    return _TornFile(f, ERRNOS[self.err], path)
                return f
            self._saved["open_private"] = real
            statefiles.open_private = torn_open
        if self.target in ("host", "full"):
            real_w = persist._write_generation

            def failing_write(host, tmp):
                real_w(host, tmp)
                self.fired = self.fired or self.target
                if not full:
                    persist._write_generation = real_w
                e = ERRNOS[self.err]
                raise OSError(e, os.strerror(e), str(Path(tmp) / "frames.npz"))
            self._saved["write_generation"] = real_w
            persist._write_generation = failing_write

    def __enter__(self) -> "Plug":
        self._saved["hook"] = crashpoint.hook
        crashpoint.hook = self.hook
        return self

    def __exit__(self, *exc) -> None:
        self.end()

    def end(self) -> None:
        """Uninstall: the hook, and a failure armed but not struck (or a full disk), end."""
        if "hook" in self._saved:
            crashpoint.hook = self._saved.pop("hook")
        if "open_private" in self._saved:
            statefiles.open_private = self._saved.pop("open_private")
        if "write_generation" in self._saved:
            persist._write_generation = self._saved.pop("write_generation")


def install_fill(spec: str) -> None:
    """``POINT[:K]=FILE`` (``tests/crashrun.py --fill-at``): fill FILE's file system the
    K-th time ``mem-offline`` reaches POINT."""
    where, _, path = spec.partition("=")
    point, _, k = where.partition(":")
    if not path or (k and not k.isdigit()):
        raise ValueError(f"{spec!r}: expected POINT[:K]=FILE")
    plug = Plug(point, "fill", k=int(k) if k else 1, fill_path=Path(path))
    crashpoint.hook = plug.hook


def vm_size_kib() -> int:
    """This process's address space (``VmSize``), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    raise OSError("no VmSize in /proc/self/status")


def install_limit(spec: str) -> None:
    """``POINT[:K][=KIB]`` (``tests/crashrun.py --limit-at``): the K-th time ``mem-offline``
    reaches POINT, do what ``ulimit -v`` does -- set ``RLIMIT_AS`` -- to the address space in
    use then, plus KIB (default 0; negative: less than in use): from then on an allocation
    that needs more address space from the system fails for real (``MemoryError``)."""
    import resource
    where, _, extra = spec.partition("=")
    point, _, k = where.partition(":")
    if (k and not k.isdigit()) or (extra and not extra.lstrip("-").isdigit()):
        raise ValueError(f"{spec!r}: expected POINT[:K][=KIB]")
    want, seen = int(k) if k else 1, {}
    if point not in crashpoint.POINTS + crashpoint.OTHER_POINTS:
        raise ValueError(f"unknown point {point!r}")

    def hook(name: str, hv) -> None:
        seen[name] = seen.get(name, 0) + 1
        if name == point and seen[name] == want:
            limit = (vm_size_kib() + int(extra or 0)) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    crashpoint.hook = hook


_BALLAST: list = []


def exhaust_memory() -> int:
    """What filling a disk is to ``ENOSPC``: cap the address space at what is in use
    (``ulimit -v``) and take every byte still free inside it; the bytes taken.  From then on
    an allocation fails for real (``MemoryError``) until :func:`release_memory`."""
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (vm_size_kib() * 1024,
                                            resource.getrlimit(resource.RLIMIT_AS)[1]))
    taken = 0
    for size in (1 << 24, 1 << 20, 1 << 16, 1 << 12, 1 << 9, 64, 8, 1):
        while True:
            try:
                _BALLAST.append(bytearray(size))
            except MemoryError:
                break
            taken += size
    return taken


def release_memory() -> None:
    import resource
    _BALLAST.clear()
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))


def install_oom(spec: str) -> None:
    """``POINT[:K]`` (``tests/crashrun.py --oom-at``): the K-th time ``mem-offline`` reaches
    POINT, :func:`exhaust_memory` -- the run goes on with no memory left."""
    point, _, k = spec.partition(":")
    if k and not k.isdigit():
        raise ValueError(f"{spec!r}: expected POINT[:K]")
    if point not in crashpoint.POINTS + crashpoint.OTHER_POINTS:
        raise ValueError(f"unknown point {point!r}")
    want, seen = int(k) if k else 1, {}

    def hook(name: str, hv) -> None:
        seen[name] = seen.get(name, 0) + 1
        if name == point and seen[name] == want:
            exhaust_memory()
    crashpoint.hook = hook
