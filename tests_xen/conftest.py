"""Real-Xen tests: run INSIDE a Xen control domain (the lab's dom0, scenario
``lab/scenarios/xenpage-xen.sh``), never by ``make test``.  Elsewhere every test here is
skipped.

Each test's result is also reported live on the lab console as a step ``xen:<test>``, so a
hung host still tells which test was running."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from xenpage.backends import is_xen_control_domain  # noqa: E402

HERE = Path(__file__).resolve().parent

#: every xenpage process a test starts prints its Python stack if it dies of a signal (a
#: SIGSEGV in dom0 otherwise leaves only exit -11 and a kernel line)
os.environ.setdefault("PYTHONFAULTHANDLER", "1")


#: Run order.  Offlines that can leave misaligned free chunks in Xen 4.17's heap (a pending
#: frame freed when its domain is destroyed; see xenpage/backends/xen/quirks.py) come last, after
#: every domain creation, so that a later allocation cannot trip over them.
ORDER = ["test_pvh.py", "test_hvm.py", "test_pvh_after.py", "test_memtest_offline.py", "test_crash_recover.py",
         "test_stock_exchange.py", "test_page_kinds.py", "test_split_guard.py", "test_hang_guard.py"]


#: the translated-guest part of the backend contract: in a run with a PVH or HVM group's guests
#: (test_pvh.py, test_hvm.py) it runs on those guests, after their in-place steps and before
#: their live migration (which comes last: see ORDER)
TRANSLATED_CONTRACT = "test_translated_contract.py"
GUEST_MODULES = ("test_pvh.py", "test_hvm.py")


def pytest_collection_modifyitems(config, items):
    names = {Path(str(it.fspath)).name for it in items}
    host = next((m for m in GUEST_MODULES if m in names), None)

    def key(it):
        p = Path(str(it.fspath))
        if p.name == TRANSLATED_CONTRACT and host:
            return (ORDER.index(host), 1)
        if HERE not in p.resolve().parents:
            return (-1, 0)
        i = ORDER.index(p.name) if p.name in ORDER else len(ORDER)
        last = 3 if "no_guest_crashed" in it.name else 2 if "live_migration" in it.name else 0
        return (i, last if p.name == host else 0)
    items.sort(key=key)      # stable: keeps the order inside each module
    if os.environ.get("XENPAGE_LAB_CONTRACT_MIGRATE") == "0":
        # the contract's migration case left out (run_lab.py: group hvm)
        out = [it for it in items if Path(str(it.fspath)).name == TRANSLATED_CONTRACT
               and it.name.startswith("test_live_migrate_reports_alike")]
        if out:
            config.hook.pytest_deselected(items=out)
            items[:] = [it for it in items if it not in out]
    if is_xen_control_domain():
        return
    skip = pytest.mark.skip(reason="tests_xen/ runs in a Xen control domain: lab/scenarios/xenpage-xen.sh")
    for it in items:
        if HERE in Path(str(it.fspath)).resolve().parents:
            it.add_marker(skip)


def _lab():
    if not os.environ.get("LAB_OUT"):
        return None
    try:
        sys.path.insert(0, "/xenpage/lab/dom0")
        import labproto
        return labproto
    except ImportError:
        return None


def pytest_runtest_logstart(nodeid, location):
    lab = _lab()
    if lab:
        lab.step_begin("xen:" + nodeid.split("::")[-1][:80])


def pytest_runtest_logreport(report):
    lab = _lab()
    if not lab:
        return
    name = "xen:" + report.nodeid.split("::")[-1][:80]
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if report.passed:
            lab.step_ok(name, f"{report.duration:.1f}s")
        elif report.skipped:
            lab.step_ok(name, "skipped")
        else:
            msg = str(report.longrepr).strip().splitlines()
            lab.step_fail(name, (msg[-1] if msg else "failed")[:300])


@pytest.fixture(scope="session")
def xen():
    from xenpage.backends.xen import XenHypervisor
    with XenHypervisor() as hv:
        yield hv


@pytest.fixture(scope="session")
def rec():
    from helpers import Recorder
    return Recorder()


@pytest.fixture(scope="session")
def memtest():
    """The lab's memtest PV guest (started by the scenario, or here)."""
    from helpers import start_guest
    return start_guest("memtest")
