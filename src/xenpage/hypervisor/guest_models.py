"""The guest kernel models a simulated host runs (``Host.guests``), plugged in from above.

The hypervisor model keeps each guest's model with the host and saves it, but it never
imports :mod:`xenpage.guests` (imports go downwards only: guests -> hypervisor): the guest
package plugs in its restore function when it is imported, which the simulator's wing
(:mod:`xenpage.backends.sim`) does.  A saved host or an HVM context carrying a guest model is
restored through :func:`restore`.
"""

from __future__ import annotations

from typing import Callable

_restore: Callable | None = None


def plug(restore_fn: Callable) -> None:
    """Register ``restore_fn(host, domid, state, arrays) -> guest model``."""
    global _restore
    _restore = restore_fn


def restore(host, domid: int, state: dict, arrays: dict):
    """A guest model rebuilt from its saved ``state`` and ``arrays``."""
    if _restore is None:
        raise RuntimeError("no guest models plugged in: import xenpage.backends.sim (or "
                           "xenpage.guests) before loading a host that runs guest kernels")
    return _restore(host, domid, state, arrays)
