"""Where xenpage keeps its state (xenpage/paths.py), the journal directory handed explicitly to
the toolstack on both backends, simulator-only commands refused on real Xen, and the crash
hook that only the tests install."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from xenpage import paths
from xenpage.backends.sim import SimHypervisor, host_path
from xenpage.cli.main import Ctx, cli
from xenpage.hypervisor.host import Host
from xenpage.toolstack import crashpoint, journal
from xenpage.toolstack.offline import mem_offline

CRASHRUN = Path(__file__).resolve().with_name("crashrun.py")
EXE = Path(sys.executable).with_name("xenpage")


def test_real_xen_paths():
    p = paths.state_paths("xen", env={})
    assert p.state_dir == Path("/var/lib/xenpage") == p.journal_dir
    assert p.config == Path("/etc/xenpage/retired.conf")
    assert p.lock == Path("/run/xenpage.lock")
    # the systemd unit's --state-dir /var/lib/xenpage is the default itself
    assert paths.state_paths("xen", "/var/lib/xenpage", env={}) == p
    # --state-dir moves state and policy, never the host-wide lock
    q = paths.state_paths("xen", "/srv/x", env={})
    assert (q.state_dir, q.config, q.lock) == (Path("/srv/x"), Path("/srv/x/retired.conf"),
                                               Path("/run/xenpage.lock"))
    assert paths.state_paths("xen", env={"XENPAGE_STATE_DIR": "/srv/y"}).state_dir == Path("/srv/y")


def test_simulator_paths():
    home = os.path.expanduser("~")
    p = paths.state_paths("sim", env={})
    assert p.state_dir == Path(home) / ".local/state/xenpage"
    assert p.config == p.state_dir / "retired.conf" and p.lock == p.state_dir / "lock"
    assert paths.state_paths("sim", env={"XDG_STATE_HOME": "/st"}).state_dir == Path("/st/xenpage")
    assert paths.state_paths("sim", env={"XDG_STATE_HOME": "/st", "XENPAGE_STATE_DIR": "/e"}
                             ).state_dir == Path("/e")
    assert paths.state_paths("sim", "/o", env={"XENPAGE_STATE_DIR": "/e"}).state_dir == Path("/o")
    with pytest.raises(ValueError):
        paths.state_paths("auto")


def test_operator_commands_and_service_share_the_real_list(monkeypatch):
    """retire-switch, badpages and the service's store and journal: one directory on Xen."""
    monkeypatch.delenv("XENPAGE_STATE_DIR", raising=False)
    from xenpage.cli import ras
    obj = Ctx(None, "xen")
    assert obj.kind == "xen"
    assert ras._state_dir(obj) == obj.paths.journal_dir == Path("/var/lib/xenpage")
    assert obj.paths.config == Path("/etc/xenpage/retired.conf")
    obj = Ctx(None, "sim")
    assert ras._state_dir(obj) == paths.sim_state_dir()


def test_switch_set_on_xen_is_the_switch_the_service_reads(tmp_path):
    """Without opening a backend: the switch an operator sets with --backend xen is read back
    from the same directory (and the simulator reads the same file given the same dir)."""
    r = CliRunner().invoke(cli, ["--backend", "xen", "--state-dir", str(tmp_path), "retire-switch", "off"])
    assert r.exit_code == 0 and "off" in r.output
    r = CliRunner().invoke(cli, ["--backend", "sim", "--state-dir", str(tmp_path), "retire-switch", "--json"])
    assert json.loads(r.output) == {"command": "retire-switch", "exit": 0, "switch": "off"}


SIM_ONLY = [("host", "show"), ("host", "create"), ("host", "reboot"), ("demo",),
            ("mce-inject", "3f100"), ("year", "--days", "1")]


@pytest.mark.parametrize("argv", SIM_ONLY, ids=" ".join)
def test_simulator_only_commands_refuse_on_real_xen(tmp_path, argv):
    sd = tmp_path / "state"
    r = CliRunner().invoke(cli, ["--backend", "xen", "--state-dir", str(sd), *argv])
    assert r.exit_code == 2, r.output
    word = "host" if argv[0] == "host" else argv[0]
    assert f"xenpage: '{word}" in r.output and "exists only on the simulated host" in r.output
    assert "nothing done" in r.output
    assert not sd.exists()                    # nothing done, nothing opened


def test_simulator_only_refusal_as_a_process(tmp_path):
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "xenpage.cli.main"]
    r = subprocess.run(cmd + ["--backend", "xen", "--state-dir", str(tmp_path / "s"), "host", "show"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == ("xenpage: 'host' exists only on the simulated host (--backend sim); "
                        "this is real Xen: nothing done\n")


def _pv_targets(host, n=2):
    g = host.guests[1]
    return [g.mfn(p) for p in g.user_pages("private")[:n]]


class _Stop(BaseException):
    pass


def test_journal_goes_where_it_is_told(cli_state, tmp_path):
    """A backend with no state directory of its own (like the real one) journals into the
    directory it is given; without one, nothing is written anywhere."""
    host = Host.load(host_path(cli_state))
    hv = SimHypervisor(host)
    assert hv.state_dir is None
    seen = []

    def hook(point, _hv):
        seen.append(point)
        if point == "clearing+":
            raise _Stop()
    crashpoint.hook = hook
    try:
        with pytest.raises(_Stop):
            mem_offline(hv, _pv_targets(host), journal_dir=tmp_path / "j")
    finally:
        crashpoint.hook = None
    recs = journal.read(tmp_path / "j")
    assert [r["op"] for r in recs] == ["begin", "clearing"]
    assert seen[-5:] == ["begin", "begin+", "suspended", "clearing", "clearing+"]
    assert seen[:3] == ["pinned", "guarded", "pinned"]     # the 4.17 split guard, then marks
    res = journal.recover(hv, tmp_path / "j")
    assert res.ok and not journal.journal_path(tmp_path / "j").exists()
    before = set(os.listdir(tmp_path))
    r = mem_offline(hv, _pv_targets(host))
    assert all(o.ok for o in r.outcomes)
    assert set(os.listdir(tmp_path)) == before and not (tmp_path / "j" / "exchange.journal").exists()


def test_the_product_reads_no_crash_variable(cli_state):
    """The old environment switch does nothing now: only tests/crashrun.py installs a hook."""
    host = Host.load(host_path(cli_state))
    mfns = _pv_targets(host)
    env = dict(os.environ, XENPAGE_STATE_DIR=str(cli_state), XENPAGE_BACKEND="sim",
               XENPAGE_CRASH_AT="clearing")
    cmd = [str(EXE)] if EXE.exists() else [sys.executable, "-m", "xenpage.cli.main"]
    r = subprocess.run(cmd + ["mem-offline", *[f"{m:x}" for m in mfns]], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert crashpoint.hook is None


def test_crashrun_kills_at_the_named_point(cli_state):
    host = Host.load(host_path(cli_state))
    mfns = _pv_targets(host)
    env = dict(os.environ, XENPAGE_STATE_DIR=str(cli_state))
    r = subprocess.run([sys.executable, str(CRASHRUN), "--crash-at", "snapshot+", "--", "--backend", "sim",
                        "mem-offline", *[f"{m:x}" for m in mfns]], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == -signal.SIGKILL
    assert [x["op"] for x in journal.read(cli_state)][-1] == "snapshot"
    bad = subprocess.run([sys.executable, str(CRASHRUN), "--crash-at", "nowhere", "--", "list"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 64 and "unknown crash point" in bad.stderr
