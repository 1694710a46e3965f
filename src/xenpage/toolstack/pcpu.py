"""Keeping page-offline hypercalls off physical CPU 0 (the Xen 4.17 PoD-lock hang).

On Xen 4.17 ``offline_page`` of a frame owned by a PV domain takes that domain's
never-initialised PoD lock (``p2m_pod_offline_or_broken_hit``); taken first on pCPU 0 the lock
is corrupted and the next offline of that domain's frames, or its destruction, hangs the host.
Taken first on any other pCPU it stays sane.  So every offline is issued with dom0's vCPUs
pinned away from pCPU 0, and their affinity is restored afterwards
(xen-lab.md, "A hang in Xen 4.17's page offlining").
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator

from .hypervisor import Hypervisor


class SinglePcpuHost(Exception):
    """The host has one physical CPU: an owned-frame offline cannot avoid pCPU 0."""


_FORCED: ContextVar[bool] = ContextVar("xenpage_single_pcpu_forced", default=False)


@contextmanager
def allow_single_pcpu(allow: bool = True) -> Iterator[None]:
    """Within this block, offlines on a single-pCPU host go ahead (from pCPU 0) instead of
    raising :class:`SinglePcpuHost` (``xenpage mem-offline --force``)."""
    tok = _FORCED.set(allow)
    try:
        yield
    finally:
        _FORCED.reset(tok)


@contextmanager
def off_pcpu0(hv: Hypervisor, force: bool = False) -> Iterator[list[int]]:
    """Pin every dom0 vCPU to the physical CPUs other than 0 for the duration."""
    n = hv.physinfo().nr_cpus
    if n < 2:
        if not (force or _FORCED.get()):
            raise SinglePcpuHost(
                "this host has a single physical CPU: on Xen 4.17 offlining a frame owned by a "
                "PV domain from pCPU 0 corrupts that domain's PoD lock and the next offline or "
                "its destruction hangs the host; nothing done (use 'mem-offline --force' to "
                "offline anyway)")
        yield []
        return
    d0 = hv.domain_info(0)
    nv = d0.nr_vcpus if d0 else 1
    saved = [hv.vcpu_affinity(0, v) for v in range(nv)]
    target = list(range(1, n))
    changed = []
    try:
        for v in range(nv):
            if 0 in saved[v]:
                rc = hv.set_vcpu_affinity(0, v, target)
                if rc < 0:
                    raise OSError(-rc, f"cannot pin dom0 vCPU {v} off pCPU 0")
                changed.append(v)
        yield target
    finally:
        for v in changed:
            hv.set_vcpu_affinity(0, v, saved[v])
