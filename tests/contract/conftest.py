"""The ``Hypervisor`` contract, run against every backend available here.

``hv`` is parametrised by backend: ``sim`` (a fresh simulated default host) everywhere, and
``xen`` (the real host, through :class:`xenpage.backends.xen.XenHypervisor`) when the tests
run in a Xen control domain -- in the lab's dom0.  ``$XENPAGE_CONTRACT_BACKENDS`` (e.g.
``sim`` or ``sim,xen``) overrides the choice; asking for ``xen`` where it cannot open fails.

Contract tests leave the host as they found it: every frame they offline is put back online,
every affinity restored, every domain unpaused.
"""

from __future__ import annotations

import os

import pytest

from xenpage.backends import is_xen_control_domain


def backends() -> list[str]:
    env = os.environ.get("XENPAGE_CONTRACT_BACKENDS")
    if env:
        return [b.strip() for b in env.split(",") if b.strip()]
    return ["sim"] + (["xen"] if is_xen_control_domain() else [])


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend", backends(), scope="module")


@pytest.fixture(scope="module")
def hv(backend):
    if backend == "sim":
        from xenpage.backends.sim import SimHypervisor, build_host
        yield SimHypervisor(build_host())
        return
    from xenpage.backends.xen import XenHypervisor, host_lock
    with host_lock(timeout=300):
        with XenHypervisor() as x:
            yield x


@pytest.fixture(scope="module")
def pv_domid(hv):
    """A running PV guest: the simulated host's ``domu1``; on real Xen the first running PV
    domU (the lab's xenpage-xen scenario starts the memtest guest before the tests)."""
    for d in hv.domain_list():
        if d.domid and not d.hvm and not d.dying and not d.shutdown:
            return d.domid
    pytest.skip("no running PV domU on this host")
