"""Simulated guest kernels. They act on the simulated host only through hypercalls,
xenstore and writes to their own memory (``guests -> hypervisor``)."""

from __future__ import annotations


def restore_guest(host, domid: int, state: dict, arrays: dict):
    kind = state.get("kind")
    if kind == "linux-pv":
        from .linux_pv import LinuxPV
        return LinuxPV.from_state(host, domid, state, arrays)
    if kind == "linux-pv-migratable":
        from .linux_pv_migratable import MigratableLinuxPV
        return MigratableLinuxPV.from_state(host, domid, state, arrays)
    if kind == "hvm":
        from .hvm import HvmGuest
        return HvmGuest.from_state(host, domid, state, arrays)
    raise ValueError(f"unknown guest kind {kind!r}")
