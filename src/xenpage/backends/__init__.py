"""Implementations of the ``Hypervisor`` protocol: ``sim`` (the simulated host) and ``xen``
(real Xen 4.17 through its libraries).  :func:`open_backend` picks one."""

from __future__ import annotations

from pathlib import Path

from ..paths import sim_state_dir, state_paths


def is_xen_control_domain() -> bool:
    """True when this process runs in a Xen control domain (``/proc/xen/capabilities``
    says ``control_d``)."""
    try:
        return "control_d" in Path("/proc/xen/capabilities").read_text()
    except OSError:
        return False


def default_state_dir() -> Path:
    """The simulator's state directory (:func:`xenpage.paths.sim_state_dir`)."""
    return sim_state_dir()


def choose_backend(kind: str = "auto") -> str:
    """``auto`` -> ``xen`` in a Xen control domain, ``sim`` elsewhere; ``sim``/``xen`` as
    given (``$XENPAGE_BACKEND`` is read by the CLI)."""
    if kind not in ("auto", "sim", "xen"):
        raise ValueError(f"unknown backend {kind!r} (auto, sim or xen)")
    if kind == "auto":
        return "xen" if is_xen_control_domain() else "sim"
    return kind


def open_backend(kind: str = "auto", state_dir: Path | None = None, save: bool = True):
    """A context manager yielding a ``Hypervisor``: the real host (locked) or the saved
    simulated host in ``state_dir``."""
    if choose_backend(kind) == "xen":
        from .xen import open_xen
        return open_xen()
    from .sim import open_host
    return open_host(state_paths("sim", state_dir).state_dir, save=save)
