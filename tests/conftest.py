import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture
def host():
    """A fresh default simulated host (2 GiB, dom0, a PV and an HVM guest)."""
    from xenpage.backends.sim import build_host
    return build_host()


@pytest.fixture
def hv(host):
    from xenpage.backends.sim import SimHypervisor
    return SimHypervisor(host)


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("XENPAGE_STATE_DIR", str(d))
    return d
