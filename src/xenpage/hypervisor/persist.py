"""Saving and loading a simulated host: one directory with a JSON header (``host.json``), one
``.npz`` of the frame-table arrays (``frames.npz``) and a checksum of both (``host.digest``).
Arrays are stored sparse (indices + values) or run-length encoded when that is smaller, so
that a bare 256 GiB host saves and loads in seconds.

A saved host that is missing a file, truncated, or modified fails to load with a
:class:`HostFileError` that says so -- never a half-loaded host."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..abi import mm
from ..statefiles import fsync_dir as _fsync_dir
from ..errors import HostFileError

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

FORMAT = 3
#: Formats 1 (no checksum) and 2 (``count_info`` as one uint64 array, where format 3 saves the
#: frame table's ``pgc_flags`` and ``pgc_count``) are still read.
READABLE_FORMATS = (1, 2, 3)
DIGEST_FILE = "host.digest"


def _digest_bytes(b: bytes) -> str:
    return hashlib.blake2b(b, digest_size=32).hexdigest()


def _digest_file(path: Path) -> str:
    h = hashlib.blake2b(digest_size=32)
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()


#: frames per slice when an array is scanned for its runs (temporaries of a few MiB)
_STEP = 1 << 22


def _run_starts(a: np.ndarray) -> np.ndarray:
    """Where each run of equal values of ``a`` starts (0 first), a slice at a time."""
    parts = [np.zeros(1, dtype=np.int64)]
    for i in range(0, a.size - 1, _STEP):
        j = min(i + _STEP, a.size - 1)
        parts.append(np.flatnonzero(a[i + 1:j + 1] != a[i:j]).astype(np.int64) + (i + 1))
    return np.concatenate(parts)


def _nonzero_up_to(a: np.ndarray, limit: int) -> np.ndarray | None:
    """The indices of ``a``'s non-zero entries, or None as soon as there are more than
    ``limit`` (one pass, a slice at a time)."""
    parts, total = [np.zeros(0, dtype=np.int64)], 0
    for i in range(0, a.size, _STEP):
        nz = np.flatnonzero(a[i:i + _STEP])
        total += nz.size
        if total > limit:
            return None
        parts.append(nz.astype(np.int64) + i)
    return np.concatenate(parts)


def _runs_of_sparse(n: int, nz: np.ndarray, val: np.ndarray) -> np.ndarray:
    """:func:`_run_starts` of an array of ``n`` entries that is zero but at ``nz`` (sorted),
    where it holds ``val``: from the non-zero entries alone, without a sort -- a run starts at
    a non-zero entry after a zero or a different value, and at the zero after a non-zero
    entry; ``nz[i] < nz[i] + 1 <= nz[i + 1]`` keeps the two kinds in order interleaved."""
    if nz.size == 0:
        return np.zeros(1, dtype=np.int64)
    gap_after = np.r_[nz[1:] != nz[:-1] + 1, True]
    at = np.empty(2 * nz.size, dtype=np.int64)
    at[0::2], at[1::2] = nz, nz + 1
    keep = np.empty(2 * nz.size, dtype=bool)
    keep[0::2] = np.r_[True, gap_after[:-1]] | np.r_[True, val[1:] != val[:-1]]
    keep[1::2] = gap_after & (nz + 1 < n)
    starts = at[keep]
    return starts if starts[0] == 0 else np.r_[np.int64(0), starts]


def _encode(name: str, a: np.ndarray, out: dict) -> None:
    """The smallest of: the non-zero entries (``sp_idx``/``sp_val``), the runs
    (``rle_start``/``rle_val``), or the array itself (``dense``)."""
    n, item = a.size, a.dtype.itemsize
    nz = _nonzero_up_to(a, n * item // (8 + item))
    if nz is not None:
        val = a[nz]
        runs = _runs_of_sparse(n, nz, val)
        if nz.size * (8 + item) <= runs.size * (8 + item):
            out[f"{name}.sp_idx"] = nz
            out[f"{name}.sp_val"] = val
            return
    else:
        runs = _run_starts(a)
    if runs.size * (8 + item) <= n * item:
        out[f"{name}.rle_start"] = runs
        out[f"{name}.rle_val"] = a[runs]
        return
    out[f"{name}.dense"] = a


def _decode(name: str, n: int, dtype, z, conv=None) -> np.ndarray:
    """Inverse of :func:`_encode`, vectorised; raises ValueError on inconsistent data.
    ``conv`` (values -> values of ``dtype``, 0 -> 0) reads an array saved in another form
    (count_info of format 2 into its flags or its count) without making the saved array
    whole first, unless it was saved dense.  Zero runs and absent entries stay untouched
    pages (:func:`~.frametable.sparse_zeros`)."""
    from .frametable import sparse_zeros
    conv = conv or (lambda v: v)
    if f"{name}.dense" in z.files:
        a = np.asarray(z[f"{name}.dense"])
        if a.shape != (n,):
            raise ValueError(f"{name}: {a.size} entries, expected {n}")
        return np.asarray(conv(a)).astype(dtype, copy=False)
    if f"{name}.sp_idx" in z.files:
        idx, val = z[f"{name}.sp_idx"], z[f"{name}.sp_val"]
        if idx.shape != val.shape or (idx.size and (idx.min() < 0 or idx.max() >= n)):
            raise ValueError(f"{name}: sparse indices out of range")
        a = sparse_zeros(n, dtype)
        val = np.asarray(conv(val)).astype(dtype, copy=False)
        nz = val != 0
        a[idx[nz]] = val[nz]
        return a
    starts = np.asarray(z[f"{name}.rle_start"], dtype=np.int64)
    vals = np.asarray(conv(z[f"{name}.rle_val"])).astype(dtype, copy=False)
    if starts.size == 0 or starts.shape != vals.shape or starts[0] != 0 \
            or (np.diff(starts) <= 0).any() or starts[-1] >= n:
        raise ValueError(f"{name}: run-length data inconsistent")
    if starts.size <= 4096:
        # Few runs: fill them in place and leave zero runs alone.
        a = sparse_zeros(n, dtype)
        ends = np.append(starts[1:], n)
        for s_, e_, v in zip(starts.tolist(), ends.tolist(), vals.tolist()):
            if v:
                a[s_:e_] = v
        return a
    lengths = np.diff(np.append(starts, n))
    return np.repeat(vals, lengths)


def _read_frame_table(n: int, z) -> dict[str, np.ndarray]:
    """The frame table's arrays from a saved host's ``frames.npz`` (one saved before format 3
    holds count_info as one array: it is split as it is read)."""
    from .frametable import FLAGS_SHIFT, FrameTable
    arrs = {}
    legacy = not any(k.startswith("pgc_flags.") for k in z.files)
    for k in FrameTable.FIELDS:
        dt = FrameTable.DTYPES[k]
        if legacy and k == "pgc_flags":  # format 1-2: count_info as one uint64 array
            arrs[k] = _decode("count_info", n, dt, z, lambda v: np.asarray(v, np.uint64) >> np.uint64(FLAGS_SHIFT))
        elif legacy and k == "pgc_count":
            arrs[k] = _decode("count_info", n, dt, z, lambda v: np.asarray(v, np.uint64) & np.uint64(mm.PGC_count_mask))
        else:
            arrs[k] = _decode(k, n, dt, z)
    for k in ("pages_mfn", "pages_data"):
        if k in z:
            arrs[k] = z[k]
    return arrs


def _generation(p: Path, name: str) -> int | None:
    """``<name>.g<N>`` -> N."""
    rest = p.name[len(name) + 2:] if p.name.startswith(name + ".g") else ""
    return int(rest) if rest.isdigit() else None




def save(host: "Host", path: Path) -> None:
    """Write atomically, with one rename: ``path`` is a symbolic link to the current
    generation ``<path>.g<N>``; the host is written (and fsync'd) into generation N+1, a new
    link to it is renamed over ``path``, then the old generation is removed.  A kill at any
    point leaves ``path`` naming a complete host; what it left beside it is cleaned up by
    :func:`tidy`.  (A host saved by an older xenpage as a plain directory is moved aside to
    a generation of its own first; :func:`tidy` finds it again if a kill comes in between.)"""
    path = Path(path)
    parent, name = path.parent, path.name
    parent.mkdir(parents=True, exist_ok=True)
    gens = [g for g in (_generation(p, name) for p in parent.iterdir()) if g is not None]
    gen = max(gens, default=0) + 1
    tmp = parent / f"{name}.g{gen}"
    tmp.mkdir()
    try:
        _write_generation(host, tmp)
    except Exception:  # (a kill leaves it to tidy())
        # a full disk, a quota, an I/O error, no memory: the half-written generation goes
        # at once (it would keep the disk full); ``path`` still names the previous host
        _remove_tree(tmp)
        raise
    old = Path(os.path.join(parent, os.readlink(path))) if path.is_symlink() else None
    if path.is_dir() and not path.is_symlink():  # an older xenpage's plain directory
        old = parent / f"{name}.g{gen - 1 if gen > 1 else 0}"
        if old.exists():
            old = parent / f"{name}.legacy"
        os.rename(path, old)
    try:
        _point(path, tmp)  # the one rename: readers see the old host or the new one
    except Exception:
        if not (path.is_symlink() and os.readlink(path) == tmp.name):
            _remove_tree(tmp)  # never made current: nothing names it
        raise
    if old is not None and old.name != tmp.name:
        _remove_tree(old)


def _write_generation(host: "Host", tmp: Path) -> None:
    """The host's files in the new generation directory ``tmp``, fsync'd."""
    arrays: dict[str, np.ndarray] = {}
    for k, a in host.ft.to_arrays().items():
        if k in host.ft.FIELDS:
            _encode(k, a, arrays)
        else:
            arrays[k] = a
    for k, a in host.heap.to_arrays().items():
        arrays[f"heap.{k}"] = a
    for domid, p in host.p2m.items():
        arrays[f"p2m.{domid}"] = p
    for k, a in host.extra_arrays().items():
        arrays[f"x.{k}"] = a
    np.savez(tmp / "frames.npz", **arrays)
    del arrays
    header = {
        "format": FORMAT,
        "frames_digest": _digest_file(tmp / "frames.npz"),
        "e820": host.e820.to_state(),
        "nr_pcpus": host.nr_pcpus,
        "quirks": host.quirks.to_state(),
        "heap": "frames.npz",  # heap.* arrays
        "domains": [d.to_state() for d in host.domains.values()],
        "xenstore": host.xenstore.to_state(),
        "next_domid": host.next_domid,
        "xen_phys_start": host.xen_phys_start,
        "xen_image": list(host.xen_image),
        "xen_init": list(host.xen_init),
        "xen_image_bytes": host.xen_image_bytes,
        "xenheap_internal": host.xenheap_internal,
        "m2p_chunks": host.m2p_chunks,
        "anonymous": host.anonymous,
        "cmdline": host.cmdline,
        "log": host.log[-1000:],
        "extra": host.extra_state(),
    }
    blob = json.dumps(header).encode()
    for name, data in (("host.json", blob), (DIGEST_FILE, (_digest_bytes(blob) + "\n").encode())):
        with open(tmp / name, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    with open(tmp / "frames.npz", "rb") as f:
        os.fsync(f.fileno())
    _fsync_dir(tmp)


def _point(path: Path, generation: Path) -> None:
    """Make the link ``path`` name ``generation`` with one rename of a fresh link over it."""
    link = path.parent / f".{path.name}.link{os.getpid()}"
    if os.path.lexists(link):
        link.unlink()
    os.symlink(generation.name, link)
    os.replace(link, path)
    _fsync_dir(path.parent)


def _remove_tree(d: Path) -> None:
    import shutil
    if d.is_symlink() or d.is_file():
        d.unlink(missing_ok=True)
    elif d.exists():
        shutil.rmtree(d, ignore_errors=True)


def leftovers(path: Path) -> list[Path]:
    """What saves of the host at ``path`` left beside it: other generations, temporary
    directories and links of earlier formats (``host.tmp<pid>``, ``host.old<pid>``)."""
    path = Path(path)
    cur = path.resolve() if path.is_symlink() else None
    out = []
    if not path.parent.is_dir():
        return out
    for p in path.parent.iterdir():
        n = p.name
        if p == path or (cur is not None and p.resolve() == cur):
            continue
        if (_generation(p, path.name) is not None or n == path.name + ".legacy"
                or n.startswith(path.name + ".tmp") or n.startswith(path.name + ".old")
                or n.startswith(f".{path.name}.link")):
            out.append(p)
    return sorted(out)


def tidy(path: Path) -> str | None:
    """Before a saved host is used (under its lock): when ``path`` names a host, remove what
    interrupted saves left beside it; when it names none but a complete host was left beside
    it, make that one current again (returns a sentence saying so); when only damaged
    leftovers are there, raise :class:`HostFileError` -- never let a new host silently take
    the place of one that was saved.  Returns None when there was nothing to recover."""
    path = Path(path)
    left = leftovers(path)
    if os.path.exists(path):  # a link to a generation, or an older xenpage's directory
        for p in left:
            _remove_tree(p)
        return None
    if not left:
        return None
    if os.path.lexists(path):
        path.unlink()  # a dangling link
    complete = []
    for p in left:
        if p.is_dir() and not p.is_symlink() and (p / "host.json").exists():
            try:
                verify(p)
            except HostFileError:
                continue
            complete.append(p)
    if not complete:
        raise HostFileError(f"{path} is missing and what an interrupted save left beside it "
                            f"({', '.join(p.name for p in left)}) is not a complete host: "
                            "nothing was changed -- move them away to start a new host")
    best = max(complete, key=lambda p: (p / "host.json").stat().st_mtime_ns)
    gen = max([g for g in (_generation(p, path.name) for p in left) if g is not None], default=0) + 1
    target = best if _generation(best, path.name) is not None else best.rename(path.parent / f"{path.name}.g{gen}")
    _point(path, target)
    for p in leftovers(path):
        _remove_tree(p)
    return f"recovered the saved host from {best.name} (an interrupted save had left it)"


def verify(path: Path) -> dict:
    """The header of the host saved in ``path`` once its format and checksums (host.json
    and frames.npz) are found right; :class:`HostFileError` saying what is wrong otherwise."""
    path = Path(path)
    try:
        blob = (path / "host.json").read_bytes()
    except OSError as e:
        raise HostFileError(f"cannot read saved host {path}: {e}") from e
    try:
        header = json.loads(blob)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise HostFileError(f"saved host {path} is corrupt: host.json is not valid JSON "
                            f"(truncated or modified?): {e}") from e
    fmt = header.get("format")
    if fmt not in READABLE_FORMATS:
        raise HostFileError(f"saved host {path} has format {fmt}, expected {FORMAT}")
    if fmt >= 2:
        try:
            want = (path / DIGEST_FILE).read_text().strip()
        except OSError as e:
            raise HostFileError(f"saved host {path} is incomplete: no {DIGEST_FILE} ({e.strerror})") from e
        if _digest_bytes(blob) != want:
            raise HostFileError(f"saved host {path} is corrupt: host.json does not match its "
                                "checksum (truncated or modified)")
        try:
            got = _digest_file(path / "frames.npz")
        except OSError as e:
            raise HostFileError(f"saved host {path} is incomplete: cannot read frames.npz ({e.strerror})") from e
        if got != header.get("frames_digest"):
            raise HostFileError(f"saved host {path} is corrupt: frames.npz does not match its "
                                "checksum (truncated or modified)")
    return header


def load(cls, path: Path) -> "Host":
    from .domain import Domain
    from .e820 import E820Map
    from .frametable import FrameTable
    from .page_alloc import Heap
    from .quirks import Quirks
    from .xenstore import Xenstore

    path = Path(path)
    header = verify(path)
    try:
        e820 = E820Map.from_state(header["e820"])
        host = cls(e820, header["nr_pcpus"], Quirks.from_state(header["quirks"]))
        n = host.nframes
        with np.load(path / "frames.npz") as z:
            arrs = _read_frame_table(n, z)
            p2m = {int(k.split(".", 1)[1]): np.array(z[k]) for k in z.files if k.startswith("p2m.")}
            extra_arrays = {k[2:]: np.array(z[k]) for k in z.files if k.startswith("x.")}
            heap_arrays = {k[5:]: z[k] for k in z.files if k.startswith("heap.")}
        host.ft = FrameTable.from_arrays(n, arrs)
        if isinstance(header["heap"], dict):  # format 1: the lists in the header
            host.heap = Heap.from_state(host.ft, header["heap"])
        else:
            host.heap = Heap.from_arrays(host.ft, heap_arrays)
        host.heap.quirks = host.quirks
        host.domains = {d["domid"]: Domain.from_state(d) for d in header["domains"]}
        host.p2m = p2m
        host.xenstore = Xenstore.from_state(header["xenstore"])
        host.next_domid = header["next_domid"]
        host.xen_phys_start = header["xen_phys_start"]
        host.xen_image = tuple(header["xen_image"])
        host.xen_init = tuple(header["xen_init"])
        host.xen_image_bytes = header.get("xen_image_bytes", host.xen_image_bytes)
        host.xenheap_internal = header["xenheap_internal"]
        host.m2p_chunks = header.get("m2p_chunks", [])
        host.ft.set_m2p_frames(host.m2p_chunks)
        host.anonymous = header["anonymous"]
        host.cmdline = header.get("cmdline", "")
        host.log = header["log"]
        host.load_extra_state(header.get("extra", {}), extra_arrays)
    except HostFileError:
        raise
    except Exception as e:  # anything a damaged file can make numpy, zipfile or json raise
        raise HostFileError(f"saved host {path} is corrupt: {e!r}") from e
    return host
