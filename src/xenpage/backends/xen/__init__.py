"""The real-Xen backend: the ``Hypervisor`` protocol over Xen 4.17's libraries (ctypes).

:func:`open_xen` is what the CLI uses: it takes the host-wide lock (two xenpage processes never
interleave their hypercalls), opens the libraries, and closes everything afterwards.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ...paths import XEN_LOCK, xen_lock
from ..locking import LockTimeout, locked
from .hypervisor import XenBackendError, XenForeignMap, XenHypervisor

__all__ = ["open_xen", "XenHypervisor", "XenForeignMap", "XenBackendError", "LOCK_PATH", "lock_path"]

LOCK_PATH = XEN_LOCK


def lock_path() -> Path:
    """The host-wide lock (:mod:`xenpage.paths`: ``/run/xenpage.lock``)."""
    return xen_lock()


@contextmanager
def host_lock(path: Path | None = None, timeout: float | None = None, quiet: bool = False) -> Iterator[Path]:
    """``flock`` the host-wide lock file (:mod:`..locking`); say once on stderr if another
    xenpage holds it.  ``timeout`` None waits for ever; on expiry raise :class:`XenBackendError`."""
    path = Path(path or lock_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with locked(path, timeout, quiet) as p:
            yield p
    except LockTimeout as e:
        raise XenBackendError(str(e)) from None


@contextmanager
def open_xen(lock: bool = True, timeout: float | None = None) -> Iterator[XenHypervisor]:
    """Lock the host, yield dom0's view of the Xen host it runs on, close everything."""
    if lock:
        with host_lock(timeout=timeout):
            with XenHypervisor() as hv:
                yield hv
    else:
        with XenHypervisor() as hv:
            yield hv
