"""Each backend's capabilities (``Hypervisor.capabilities``, toolstack/hypervisor.py): what it
claims it has, and what the toolstack does with what it does not claim.  Run against every
backend available (conftest.py): the simulator in ``make test``, the simulator and real Xen
in the lab's dom0 (group flagship).

* a claimed capability comes with its calls, and they answer as the protocol says;
* an unclaimed one is never used: no checkpoint before journal records, HVM frames left
  pending with the backend named instead of a migration attempt.
"""

from __future__ import annotations

import numpy as np
import pytest

from xenpage.abi import errno as E
from xenpage.toolstack import journal
from xenpage.toolstack.hypervisor import (CAP_CHECKPOINT, CAP_HVM_INPLACE, CAP_MIGRATE, CAPABILITIES,
                                          CheckpointHypervisor, MigrationHypervisor)
from xenpage.toolstack.outcomes import Kind, Reason
from xenpage.toolstack.retire import RetireOptions, retire_hvm

#: what each backend claims today (real Xen: live migration through xl and the in-place
#: retirement of translated guests' frames, both proved in the lab; no checkpoint needed)
EXPECTED = {"sim": CAPABILITIES, "xen": frozenset({CAP_MIGRATE, CAP_HVM_INPLACE})}


def test_capabilities_declared(hv, backend):
    caps = hv.capabilities
    assert isinstance(caps, frozenset)
    assert caps <= CAPABILITIES, caps - CAPABILITIES
    assert caps == EXPECTED[backend]
    assert CAPABILITIES == {"migrate", "hvm-inplace", "checkpoint"}   # the names, once


def _hvm_domid(hv):
    return next((d.domid for d in hv.domain_list() if d.hvm and not d.dying), None)


@pytest.mark.parametrize("cap", sorted(CAPABILITIES))
def test_each_capability(hv, backend, pv_domid, cap, tmp_path):
    if cap in hv.capabilities:
        CLAIMED[cap](hv, pv_domid)
    else:
        UNCLAIMED[cap](hv, pv_domid, tmp_path)


# -- claimed: the calls are there and answer ----------------------------------------------------

def _migrate(hv, pv_domid):
    assert isinstance(hv, MigrationHypervisor)
    t0 = hv.now()
    assert isinstance(t0, float) and hv.now() >= t0
    r = hv.live_migrate(0x7000)            # no such domain: refused, nothing done
    assert not r.ok and r.rc < 0 and r.new_domid is None
    # the pages read for a stream are the guest's own, word for word
    p2m = _p2m(hv, pv_domid)
    mfn = int(p2m[np.flatnonzero(p2m < np.uint64(hv.max_mfn()))[200]])
    rc, data = hv.read_pages(pv_domid, [mfn])
    assert rc == 0 and len(data) == 1
    m = hv.map_foreign(pv_domid, [mfn], False)
    assert not isinstance(m, int)
    assert (data.words(0) == m.array[0]).all()
    m.unmap()
    assert hv.read_pages(pv_domid, [hv.max_mfn() + 7])[0] < 0


def _hvm_inplace(hv, pv_domid):
    assert isinstance(hv, MigrationHypervisor) and callable(hv.pause)
    rc, mfns, types, orders = hv.hvm_p2m(0x7000, [0])
    assert rc == -E.ESRCH and mfns.size == 0
    assert hv.decrease_reservation(0x7000, [0]) == 0       # do_memory_op: 0 extents done
    assert hv.populate_physmap(0x7000, [0])[0] == 0
    d = _hvm_domid(hv)
    if d is None:
        return
    rc, mfns, types, orders = hv.hvm_p2m(d, [0x100, 0x101])
    assert rc == 0 and mfns.size == 2 and (mfns < hv.max_mfn()).all()
    assert set(orders.tolist()) <= {0, 9, 18}


def _checkpoint(hv, pv_domid):
    assert isinstance(hv, CheckpointHypervisor)
    hv.checkpoint()


CLAIMED = {CAP_MIGRATE: _migrate, CAP_HVM_INPLACE: _hvm_inplace, CAP_CHECKPOINT: _checkpoint}


# -- not claimed: never used ------------------------------------------------------------------

class _Spy:
    """The backend, with a checkpoint() that only counts (whatever the backend has)."""

    def __init__(self, inner):
        self.inner = inner
        self.kind = inner.kind
        self.capabilities = inner.capabilities
        self.checkpoints = 0

        self.inplace_calls = 0

    def checkpoint(self) -> None:
        self.checkpoints += 1

    def hvm_p2m(self, *a):
        self.inplace_calls += 1
        return self.inner.hvm_p2m(*a)

    def decrease_reservation(self, *a):
        self.inplace_calls += 1
        return self.inner.decrease_reservation(*a)

    def populate_physmap(self, *a):
        self.inplace_calls += 1
        return self.inner.populate_physmap(*a)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _no_migrate(hv, pv_domid, tmp_path):
    d = _hvm_domid(hv) or 0x7000
    for how in ("migrate", "exchange"):
        outs = retire_hvm(hv, d, [0x1234], RetireOptions(hvm=how))
        assert [o.kind for o in outs] == [Kind.PENDING]
        assert outs[0].reason == Reason.MIGRATION_NEEDED
        assert f"the {hv.kind} backend cannot" in outs[0].detail


def _no_hvm_inplace(hv, pv_domid, tmp_path):
    # --hvm=exchange on such a backend: the frame stays pending, no in-place call is made
    spy = _Spy(hv)
    d = _hvm_domid(hv) or 0x7000
    outs = retire_hvm(spy, d, [0x1234], RetireOptions(hvm="exchange"))
    assert [o.kind for o in outs] == [Kind.PENDING]
    assert spy.inplace_calls == 0


def _no_checkpoint(hv, pv_domid, tmp_path):
    spy = _Spy(hv)
    jn = journal.Journal(spy, tmp_path)
    jn.begin(pv_domid, [0x1234], False)
    jn.step("suspended")
    assert journal.read(tmp_path)[0]["op"] == "begin"
    jn.end()
    assert spy.checkpoints == 0 and not journal.journal_path(tmp_path).exists()


UNCLAIMED = {CAP_MIGRATE: _no_migrate, CAP_HVM_INPLACE: _no_hvm_inplace, CAP_CHECKPOINT: _no_checkpoint}


def test_checkpoint_before_each_record_when_claimed(hv, pv_domid, tmp_path):
    """The journal's side of CAP_CHECKPOINT, whatever this backend claims: claimed, the host
    is saved before each record; not claimed, never."""
    for caps, want in ((frozenset({CAP_CHECKPOINT}), 3), (frozenset(), 0)):
        spy = _Spy(hv)
        spy.capabilities = caps
        jn = journal.Journal(spy, tmp_path)
        jn.begin(pv_domid, [0x1234], False)
        jn.step("suspended")
        jn.end()
        assert spy.checkpoints == want


def _p2m(hv, domid):
    rc, frames, n = hv.pv_p2m_frames(domid)
    assert rc == 0
    m = hv.map_foreign(domid, frames, False)
    assert not isinstance(m, int)
    a = m.array.ravel()[:n].copy()
    m.unmap()
    return a
