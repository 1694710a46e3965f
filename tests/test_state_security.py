"""The state directory runs as root in dom0 and its journals hold copies of guest pages
(issue 19, item 8): it is created 0700, every file in it 0600 whatever the umask, a symbolic
link planted where xenpage writes is refused and its target left alone, and a state
directory owned by another user is refused.  Item 7: a state directory that cannot be
written gives a clear message, never a traceback."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from xenpage import statefiles
from xenpage.backends.sim import host_path
from xenpage.hypervisor.host import Host
from simworld import small_host

HERE = Path(__file__).resolve().parent
CRASHRUN = HERE / "crashrun.py"
EXE = Path(sys.executable).with_name("xenpage")


def _run(state, *args, crash=None, umask=0o022):
    env = dict(os.environ, XENPAGE_STATE_DIR=str(state), XENPAGE_BACKEND="sim")
    cmd = ([sys.executable, str(CRASHRUN), "--crash-at", crash, "--"] if crash else [str(EXE)])
    return subprocess.run(cmd + ["--backend", "sim"] + [str(a) for a in args], capture_output=True,
                          text=True, env=env, timeout=120, preexec_fn=lambda: os.umask(umask))


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def state(tmp_path):
    d = tmp_path / "state"
    host, _ = small_host()
    host.save(host_path(d))
    return d


def _pv_frame(state) -> int:
    h = Host.load(host_path(state))
    g = h.guests[1]
    return g.mfn(g.user_pages("shared")[0])


def test_journal_and_records_are_owner_only_under_a_lax_umask(state):
    m = _pv_frame(state)
    r = _run(state, "mem-offline", f"{m:x}", crash="snapshot+")    # the journal holds the page
    assert r.returncode < 0
    jp = state / "exchange.journal"
    assert jp.exists() and b"snapshot" in jp.read_bytes()
    assert _mode(jp) == 0o600 and _mode(state / "mem-offline.lock") == 0o600
    assert _mode(state) == 0o700 or os.stat(state).st_uid == os.geteuid()
    assert _run(state, "recover").returncode == 0
    assert _run(state, "mce-inject", f"{m:x}").returncode == 0
    assert _mode(state / "mcelog") == 0o600
    assert _run(state, "retire", "--from", state / "mcelog").returncode == 0
    assert _mode(state / "retired.db") == 0o600


def test_a_new_state_directory_is_0700(tmp_path):
    d = tmp_path / "new" / "state"
    assert _run(d, "mem-status", "100", umask=0o000).returncode == 0
    assert _mode(d) == 0o700


@pytest.mark.parametrize("name", ["exchange.journal", "mem-offline.lock", "mcelog",
                                  "split-guard.json.tmp", "lock", "retired.db"])
def test_a_planted_symlink_is_never_written_through(state, tmp_path, name):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.symlink(victim, state / name)
    m = _pv_frame(state)
    for args in (("mem-offline", f"{m:x}"), ("mce-inject", f"{m:x}"),
                 ("retire", "--from", state / "nothing"), ("badpages",)):
        r = _run(state, *args)
        assert "Traceback" not in r.stderr, (name, args, r.stderr)
    assert victim.read_text() == "precious\n"


def test_private_helpers_refuse_links_and_foreign_directories(tmp_path):
    target = tmp_path / "t"
    target.write_text("x")
    link = tmp_path / "l"
    os.symlink(target, link)
    with pytest.raises(OSError):
        statefiles.open_private(link, "a")
    with pytest.raises(PermissionError, match="symbolic link"):
        statefiles.state_dir(link)
    statefiles.replace_durably(tmp_path / "rec.json", "{}")
    os.symlink(target, tmp_path / "rec2.json.tmp")
    statefiles.replace_durably(tmp_path / "rec2.json", "{}")       # the planted tmp is replaced
    assert target.read_text() == "x" and _mode(tmp_path / "rec2.json") == 0o600
    if os.geteuid() == 0:
        other = tmp_path / "other"
        other.mkdir()
        os.chown(other, 12345, 12345)
        with pytest.raises(PermissionError, match="uid 12345"):
            statefiles.state_dir(other)


def test_a_state_directory_that_cannot_be_written_says_so(state, monkeypatch):
    """EROFS/EACCES/ENOSPC while saving the host after a command: 'xenpage: cannot save ...',
    exit 2.  (Running as root, a chmod would not stop the save: the failure is injected.)"""
    import errno

    from click.testing import CliRunner

    from xenpage.cli.main import cli
    from xenpage.hypervisor import persist

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(persist, "save", refuse)
    r = CliRunner().invoke(cli, ["--backend", "sim", "mem-offline", "100"],
                           env={"XENPAGE_STATE_DIR": str(state)})
    assert r.exit_code == 2 and "Read-only file system" in r.stderr, r.output
    assert not isinstance(r.exception, OSError)
