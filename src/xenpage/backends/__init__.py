"""Implementations of the ``Hypervisor`` protocol: ``sim`` (the simulated host) and ``xen``
(real Xen 4.17 through its libraries).  :func:`open_backend` picks one."""

from __future__ import annotations

import os
from pathlib import Path


def is_xen_control_domain() -> bool:
    """True when this process runs in a Xen control domain (``/proc/xen/capabilities``
    says ``control_d``)."""
    try:
        return "control_d" in Path("/proc/xen/capabilities").read_text()
    except OSError:
        return False


def default_state_dir() -> Path:
    env = os.environ.get("XENPAGE_STATE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "xenpage"
