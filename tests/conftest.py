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
    """A fresh default simulated host (2 GiB, dom0, a PV, an HVM and a PVH guest)."""
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


# -- fixtures of the FOUNDATION tests (simulated host, page-offline sysctl, hptool CLI) ------

@pytest.fixture
def small_host():
    """Factory of small bare hosts (64 MiB by default: cheap enough for property tests).

    They split free buddies as xen-semantics.md 1.8 says (the fixed Xen): the foundation
    tests check that heap frame by frame.  Xen 4.17's misaligned split (quirk
    ``reserve_misaligned``, on in the default host) has its own tests: test_split_guard.py."""
    from xenpage.hypervisor.host import Host, HostConfig
    from xenpage.hypervisor.quirks import Quirks

    def make(mem_mib: int = 64, dom0_pages: int = 2048, nr_pcpus: int = 2, **cfg):
        cfg.setdefault("quirks", Quirks(reserve_misaligned=False))
        return Host.boot(HostConfig(mem_bytes=mem_mib << 20, nr_pcpus=nr_pcpus, **cfg),
                         dom0_pages=dom0_pages)
    return make


@pytest.fixture(scope="session")
def saved_default_host(tmp_path_factory):
    """A state directory holding the saved default host, built once per session; copy it
    (see ``cli_state``) rather than changing it."""
    from xenpage.backends.sim import build_host, host_path
    d = tmp_path_factory.mktemp("default-state")
    build_host().save(host_path(d))
    return d


@pytest.fixture
def cli_state(saved_default_host, tmp_path):
    """A private copy of the saved default host's state directory."""
    import shutil
    d = tmp_path / "cli-state"
    shutil.copytree(saved_default_host, d)
    return d


@pytest.fixture
def xenpage_cli():
    """Run the installed ``xenpage`` command in a subprocess: ``run(state_dir, *args)``
    returns the CompletedProcess (stdout and stderr as text, kept apart)."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("xenpage")
    cmd = [str(exe)] if exe.exists() else [shutil.which("xenpage") or "xenpage"]

    def run(state_dir, *args, timeout: float = 120):
        env = dict(os.environ, XENPAGE_STATE_DIR=str(state_dir), XENPAGE_BACKEND="sim")
        return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True,
                              env=env, timeout=timeout)
    return run
