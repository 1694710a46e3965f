"""Keeping page-offline hypercalls off physical CPU 0 (the Xen 4.17 PoD-lock hang).

On Xen 4.17 ``offline_page`` of a frame owned by a PV domain takes that domain's
never-initialised PoD lock (``p2m_pod_offline_or_broken_hit``); taken first on pCPU 0 the lock
is corrupted and the next offline of that domain's frames, or its destruction, hangs the host.
Taken first on any other pCPU it stays sane.  So every offline is issued with dom0's vCPUs
pinned away from pCPU 0, and their affinity is restored afterwards
(xen-lab.md, "A hang in Xen 4.17's page offlining").

A toolstack killed while dom0 is pinned cannot restore the affinity itself.  With a
``record_dir`` (``mem-offline`` passes its journal directory) the affinity as it was is
written there first (``dom0-affinity.json``, fsync'd) and removed once restored;
:func:`restore_recorded` -- run by ``xenpage recover`` and at the start of the next
``mem-offline`` -- puts back what a killed process left pinned.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Iterator

from ..statefiles import fsync_dir as _fsync_dir
from .. import statefiles
from . import crashpoint
from .hypervisor import Hypervisor

#: in the state directory while dom0's vCPUs are pinned off physical CPU 0
AFFINITY_RECORD = "dom0-affinity.json"


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


def _write_record(path: Path, saved: dict[int, list[int]]) -> None:
    statefiles.replace_durably(path, json.dumps({"dom0_vcpus": {str(v): c for v, c in saved.items()}}))




def restore_recorded(hv: Hypervisor, state_dir) -> dict[int, list[int]]:
    """Put back the dom0 vCPU affinity a killed toolstack recorded in ``state_dir`` before
    pinning it off pCPU 0, then drop the record.  Returns ``{vcpu: cpus}`` restored (empty
    when there was no record).  Raises ``ValueError`` for an unreadable record (left in
    place) and ``OSError`` when Xen refuses an affinity (record kept: try again)."""
    path = Path(state_dir) / AFFINITY_RECORD
    if not path.exists():
        return {}
    try:
        saved = {int(v): [int(c) for c in cpus]
                 for v, cpus in json.loads(path.read_text())["dom0_vcpus"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: unreadable record of dom0's vCPU affinity ({e}); "
                         "nothing restored") from e
    d0 = hv.domain_info(0)
    nv = d0.nr_vcpus if d0 else 0
    done = {}
    for v, cpus in sorted(saved.items()):
        if v >= nv or not cpus:
            continue
        if hv.vcpu_affinity(0, v) == cpus:
            continue
        rc = hv.set_vcpu_affinity(0, v, cpus)
        if rc < 0:
            raise OSError(-rc, f"cannot restore dom0 vCPU {v}'s affinity to {cpus}")
        done[v] = cpus
    path.unlink()
    _fsync_dir(path.parent)
    return done


@contextmanager
def off_pcpu0(hv: Hypervisor, force: bool = False, record_dir=None) -> Iterator[list[int]]:
    """Pin every dom0 vCPU to the physical CPUs other than 0 for the duration.  With
    ``record_dir`` the affinity as it was is recorded there (fsync'd) before anything is
    pinned, and the record removed once it is restored (:func:`restore_recorded`)."""
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
    record = None
    if record_dir is not None and any(0 in c for c in saved):
        record = Path(record_dir) / AFFINITY_RECORD
        statefiles.state_dir(record_dir)
        _write_record(record, {v: c for v, c in enumerate(saved) if 0 in c})
    try:
        for v in range(nv):
            if 0 in saved[v]:
                rc = hv.set_vcpu_affinity(0, v, target)
                if rc < 0:
                    raise OSError(-rc, f"cannot pin dom0 vCPU {v} off pCPU 0")
                changed.append(v)
        if changed:
            crashpoint.reached("pinned", hv)
        yield target
    finally:
        failed = False
        for v in changed:
            failed |= hv.set_vcpu_affinity(0, v, saved[v]) < 0
        if record is not None and not failed:
            record.unlink(missing_ok=True)
