"""Deterministic fault injection for any :class:`~xenpage.toolstack.hypervisor.Hypervisor`.

:class:`FaultyHypervisor` is a real ``Hypervisor``: it delegates every call to the backend it
wraps (the simulator or real Xen) and follows a :class:`FaultPlan`:

* ``fail``: the N-th call (counted over every call, or over calls of one method) returns an
  errno *without reaching the backend*, in the shape that method returns errors; a batch
  (``mmu_update``/``mmuext_op``/``memory_exchange``) may instead be made to fail part-way,
  after the backend did the first ``partial`` items -- as Xen's batches do;
* ``actions``: a callable run just before (or after) the N-th call, with the backend as
  argument: "the world acts" between two hypercalls of the toolstack (dom0 maps a frame,
  another toolstack onlines it, the guest is destroyed, the process is killed...).

Every call is logged (``calls``: ``(seq, method, nth_of_method)``), so a first clean run
enumerates the fail points and later runs hit each one.  No simulator internals are touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..abi import errno as E

_EMPTY_I = np.zeros(0, dtype=np.int64)


def _fail_value(method: str, err: int):
    """What ``method`` returns when the hypercall fails with ``-err``."""
    rc = -abs(err)
    if method in ("page_offline_op",):
        return rc, None
    if method in ("mmu_update", "mmuext_op"):
        return rc, 0
    if method == "memory_exchange":
        return rc, 0, []
    if method in ("pv_p2m_frames", "pv_p2m_frame_lists"):
        return rc, _EMPTY_I, 0
    if method == "page_types":
        return rc, np.zeros(0, dtype=np.uint32)
    if method == "grant_entries":
        return rc, np.zeros(0, dtype=np.uint64)
    if method in ("domain_info", "xs_read"):
        return None
    if method in ("populate_physmap",):
        return rc, _EMPTY_I
    if method in ("read_pages",):
        return rc, None
    return rc  # decrease_reservation, write_pages, map_foreign, pause, unpause, resume, destroy, set_vcpu_affinity, xs_write


#: Calls that can fail with an errno (the others -- physinfo, m2p, domain_list, wait,
#: vcpu_affinity -- are reads of mapped tables or local).
FALLIBLE = ("page_offline_op", "page_offline_each", "pause", "unpause", "resume", "destroy", "set_vcpu_affinity",
            "xs_read", "xs_write", "domain_info", "pv_p2m_frames", "pv_p2m_frame_lists",
            "map_foreign", "page_types", "grant_entries", "mmu_update", "mmuext_op",
            "memory_exchange", "decrease_reservation", "populate_physmap", "read_pages",
            "write_pages")
#: Calls that change the host.
MUTATING = ("page_offline_op", "page_offline_each", "pause", "unpause", "resume", "destroy", "set_vcpu_affinity",
            "xs_write", "mmu_update", "mmuext_op", "memory_exchange", "map_foreign", "wait",
            "decrease_reservation", "populate_physmap", "write_pages")
WRAPPED = FALLIBLE + ("physinfo", "max_mfn", "domain_list", "vcpu_affinity", "m2p", "wait")

DEFAULT_ERRNO = {"memory_exchange": E.ENOMEM, "mmu_update": E.EINVAL, "mmuext_op": E.EINVAL,
                 "map_foreign": E.EFAULT, "page_offline_op": E.EBUSY, "page_offline_each": E.EBUSY,
                 "xs_write": E.EACCES,
                 "resume": E.EINVAL}


@dataclass
class Fault:
    """Fail the ``nth`` (1-based) call of ``method`` (``None``: the ``nth`` call of any
    method, counted over every wrapped call)."""

    nth: int
    method: str | None = None
    errno: int | None = None
    #: for batches: let the backend do this many items first (Xen's partial completion)
    partial: int = 0


@dataclass
class Action:
    """Run ``fn(backend)`` just before (``when="before"``) or after the ``nth`` call of
    ``method`` (``None``: of any method)."""

    nth: int
    fn: Callable
    method: str | None = None
    when: str = "before"


@dataclass
class FaultPlan:
    faults: list[Fault] = field(default_factory=list)
    actions: list[Action] = field(default_factory=list)

    @classmethod
    def fail_at(cls, nth: int, method: str | None = None, errno: int | None = None,
                partial: int = 0) -> "FaultPlan":
        return cls([Fault(nth, method, errno, partial)])

    @classmethod
    def act_at(cls, nth: int, fn: Callable, method: str | None = None,
               when: str = "before") -> "FaultPlan":
        return cls(actions=[Action(nth, fn, method, when)])


class FaultyHypervisor:
    """A ``Hypervisor`` that delegates to ``inner`` and follows ``plan``."""

    def __init__(self, inner, plan: FaultPlan | None = None):
        self.inner = inner
        self.plan = plan or FaultPlan()
        self.kind = inner.kind
        self.capabilities = inner.capabilities
        self.calls: list[tuple[int, str, int]] = []
        self.per_method: dict[str, int] = {}
        self.injected: list[tuple[int, str, int, int]] = []  # (seq, method, nth, errno)
        self.acted: list[tuple[int, str, int]] = []

    def __getattr__(self, name):
        # anything not wrapped (checkpoint, a simulated backend's host, ...) goes to the backend
        return getattr(self.inner, name)

    def _match(self, item, seq: int, method: str, nth: int) -> bool:
        return (item.method is None and item.nth == seq) or (item.method == method and item.nth == nth)

    def _call(self, method: str, *args, **kw):
        seq = len(self.calls) + 1
        nth = self.per_method.get(method, 0) + 1
        self.per_method[method] = nth
        self.calls.append((seq, method, nth))
        for a in self.plan.actions:
            if a.when == "before" and self._match(a, seq, method, nth):
                self.acted.append((seq, method, nth))
                a.fn(self.inner)
        fault = next((f for f in self.plan.faults if self._match(f, seq, method, nth)), None)
        if fault is not None and method in FALLIBLE:
            err = fault.errno or DEFAULT_ERRNO.get(method, E.EFAULT)
            self.injected.append((seq, method, nth, err))
            result = self._fail(method, err, fault.partial, args, kw)
        else:
            result = getattr(self.inner, method)(*args, **kw)
        for a in self.plan.actions:
            if a.when == "after" and self._match(a, seq, method, nth):
                self.acted.append((seq, method, nth))
                a.fn(self.inner)
        return result

    def _fail(self, method: str, err: int, partial: int, args, kw):
        if method == "page_offline_each":
            # one hypercall per frame: the call for frame ``partial`` fails (status
            # untouched), the calls before and after it reach the backend
            from ..abi import sysctl as S
            cmd, mfns = args[0], np.asarray(args[1] if len(args) > 1 else kw["mfns"], dtype=np.int64)
            rcs = np.zeros(mfns.size, dtype=np.int32)
            sts = np.full(mfns.size, S.STATUS_UNTOUCHED, dtype=np.uint32)
            k = min(partial, max(mfns.size - 1, 0))
            for sl in (slice(0, k), slice(k + 1, mfns.size)):
                if mfns[sl].size:
                    rcs[sl], sts[sl] = self.inner.page_offline_each(cmd, mfns[sl])
            if mfns.size:
                rcs[k] = -abs(err)
            return rcs, sts
        if partial and method == "mmu_update":
            reqs, fd = args[0], args[1] if len(args) > 1 else kw["foreigndom"]
            reqs = np.asarray(reqs, dtype=np.uint64).reshape(-1, 2)
            k = min(partial, len(reqs) - 1)
            if k > 0:
                rc, done = self.inner.mmu_update(reqs[:k], fd)
                return (rc, done) if rc else (-abs(err), done)
        if partial and method == "mmuext_op":
            ops, fd = list(args[0]), args[1] if len(args) > 1 else kw["foreigndom"]
            k = min(partial, len(ops) - 1)
            if k > 0:
                rc, done = self.inner.mmuext_op(ops[:k], fd)
                return (rc, done) if rc else (-abs(err), done)
        if partial and method == "memory_exchange":
            domid, ins, outs = args[0], list(args[1]), list(args[2])
            k = min(partial, len(ins) - 1)
            if k > 0:
                rc, nr, out = self.inner.memory_exchange(domid, ins[:k], outs[:k])
                return (rc, nr, out) if rc else (-abs(err), nr, out)
        if partial and method in ("decrease_reservation", "populate_physmap"):
            # Xen stops at the extent it cannot do and returns the number done
            domid, gfns = args[0], np.asarray(args[1], dtype=np.int64).ravel()
            k = min(partial, gfns.size - 1)
            if k > 0:
                r = getattr(self.inner, method)(domid, gfns[:k])
                return r
        return _fail_value(method, err)


def _make(method: str):
    def f(self, *args, **kw):
        return self._call(method, *args, **kw)
    f.__name__ = method
    return f


for _m in WRAPPED:
    setattr(FaultyHypervisor, _m, _make(_m))
del _m


def enumerate_calls(run: Callable[[FaultyHypervisor], object], inner) -> list[tuple[int, str, int]]:
    """Run ``run`` once through a plan-less wrapper and return its calls (the fail points)."""
    fh = FaultyHypervisor(inner)
    run(fh)
    return fh.calls
