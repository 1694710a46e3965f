"""Simulated guest kernels. They act on the simulated host only through hypercalls,
xenstore and writes to their own memory (``guests -> hypervisor``)."""

from __future__ import annotations

from ..hypervisor import guest_models


def restore_guest(host, domid: int, state: dict, arrays: dict):
    kind = state.get("kind")
    if kind in ("linux-pv", "linux-pv-migratable"):  # the latter: hosts saved before the fold
        from .linux_pv import LinuxPV
        return LinuxPV.from_state(host, domid, state, arrays)
    if kind == "hvm":
        from .hvm import HvmGuest
        return HvmGuest.from_state(host, domid, state, arrays)
    if kind == "pvh":
        from .hvm import PvhGuest
        return PvhGuest.from_state(host, domid, state, arrays)
    raise ValueError(f"unknown guest kind {kind!r}")


guest_models.plug(restore_guest)
