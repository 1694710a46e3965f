"""Saving and loading a simulated host: one directory with a JSON header and one ``.npz`` of
the frame-table arrays.  Arrays are stored sparse (indices + values) or run-length encoded
when that is smaller, so that a bare 256 GiB host saves and loads in seconds."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

FORMAT = 1


def _encode(name: str, a: np.ndarray, out: dict) -> None:
    n = a.size
    nz = np.flatnonzero(a)
    if nz.size <= n // 8:
        out[f"{name}.sp_idx"] = nz.astype(np.int64)
        out[f"{name}.sp_val"] = a[nz]
        return
    change = np.flatnonzero(a[1:] != a[:-1]) + 1
    if change.size <= n // 8:
        starts = np.concatenate(([0], change)).astype(np.int64)
        out[f"{name}.rle_start"] = starts
        out[f"{name}.rle_val"] = a[starts]
        return
    out[f"{name}.dense"] = a


def _decode(name: str, n: int, dtype, z) -> np.ndarray:
    if f"{name}.dense" in z:
        return np.array(z[f"{name}.dense"], dtype=dtype)
    a = np.zeros(n, dtype=dtype)
    if f"{name}.sp_idx" in z:
        a[z[f"{name}.sp_idx"]] = z[f"{name}.sp_val"]
        return a
    starts = z[f"{name}.rle_start"]
    vals = z[f"{name}.rle_val"]
    ends = np.append(starts[1:], n)
    for s, e, v in zip(starts.tolist(), ends.tolist(), vals.tolist()):
        if v:
            a[s:e] = v
    return a


def save(host: "Host", path: Path) -> None:
    """Write atomically: a temporary directory renamed over the old one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {}
    for k, a in host.ft.to_arrays().items():
        if k in host.ft.FIELDS:
            _encode(k, a, arrays)
        else:
            arrays[k] = a
    for domid, p in host.p2m.items():
        arrays[f"p2m.{domid}"] = p
    for k, a in host.extra_arrays().items():
        arrays[f"x.{k}"] = a
    np.savez(tmp / "frames.npz", **arrays)
    header = {
        "format": FORMAT,
        "e820": host.e820.to_state(),
        "nr_pcpus": host.nr_pcpus,
        "quirks": host.quirks.to_state(),
        "heap": host.heap.to_state(),
        "domains": [d.to_state() for d in host.domains.values()],
        "xenstore": host.xenstore.to_state(),
        "next_domid": host.next_domid,
        "xen_phys_start": host.xen_phys_start,
        "xen_image": list(host.xen_image),
        "xen_init": list(host.xen_init),
        "xenheap_internal": host.xenheap_internal,
        "anonymous": host.anonymous,
        "log": host.log[-1000:],
        "extra": host.extra_state(),
    }
    with open(tmp / "host.json", "w") as f:
        json.dump(header, f)
        f.flush()
        os.fsync(f.fileno())
    old = path.with_name(path.name + f".old{os.getpid()}")
    if path.exists():
        os.rename(path, old)
    os.rename(tmp, path)
    if old.exists():
        for p in old.iterdir():
            p.unlink()
        old.rmdir()


def load(cls, path: Path) -> "Host":
    from .domain import Domain
    from .e820 import E820Map
    from .frametable import FrameTable
    from .page_alloc import Heap
    from .quirks import Quirks
    from .xenstore import Xenstore

    path = Path(path)
    try:
        with open(path / "host.json") as f:
            header = json.load(f)
    except (OSError, ValueError) as e:
        raise HostFileError(f"cannot read saved host {path}: {e}") from e
    if header.get("format") != FORMAT:
        raise HostFileError(f"saved host {path} has format {header.get('format')}, expected {FORMAT}")
    try:
        e820 = E820Map.from_state(header["e820"])
        host = cls(e820, header["nr_pcpus"], Quirks.from_state(header["quirks"]))
        n = host.nframes
        with np.load(path / "frames.npz") as z:
            arrs = {}
            for k in FrameTable.FIELDS:
                arrs[k] = _decode(k, n, getattr(host.ft, k).dtype, z)
            for k in ("pages_mfn", "pages_data"):
                if k in z:
                    arrs[k] = z[k]
            p2m = {int(k.split(".", 1)[1]): np.array(z[k]) for k in z.files if k.startswith("p2m.")}
            extra_arrays = {k[2:]: np.array(z[k]) for k in z.files if k.startswith("x.")}
        host.ft = FrameTable.from_arrays(n, arrs)
        host.heap = Heap.from_state(host.ft, header["heap"])
        host.domains = {d["domid"]: Domain.from_state(d) for d in header["domains"]}
        host.p2m = p2m
        host.xenstore = Xenstore.from_state(header["xenstore"])
        host.next_domid = header["next_domid"]
        host.xen_phys_start = header["xen_phys_start"]
        host.xen_image = tuple(header["xen_image"])
        host.xen_init = tuple(header["xen_init"])
        host.xenheap_internal = header["xenheap_internal"]
        host.anonymous = header["anonymous"]
        host.log = header["log"]
        host.load_extra_state(header.get("extra", {}), extra_arrays)
    except (KeyError, ValueError, TypeError, OSError, EOFError) as e:
        raise HostFileError(f"saved host {path} is corrupt: {e!r}") from e
    return host


class HostFileError(Exception):
    """A saved host that cannot be read (missing, truncated, corrupted)."""
