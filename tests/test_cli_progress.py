"""Progress is drawn on a terminal only: under a pseudo-terminal ``mem-offline`` of a range
shows a bar and ends with its summary line; piped, the same command prints only the line;
a wait on the host lock says who holds it, on a terminal with a spinner."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

XENPAGE = [str(Path(sys.executable).with_name("xenpage"))]


def _run_pty(argv, env, timeout=120.0) -> tuple[int, str]:
    """Run under a pseudo-terminal (stdout and stderr both): (exit code, everything shown)."""
    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover (child)
        os.execvpe(argv[0], argv, env)
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ, XENPAGE_STATE_DIR=str(tmp_path / "s"), XENPAGE_BACKEND="sim",
             TERM="xterm", COLUMNS="100")
    subprocess.run(XENPAGE + ["host", "create", "--mem", "1024", "--dom0", "256", "--no-guests"], env=e,
                   check=True, capture_output=True)
    return e


def test_range_progress_on_a_terminal_only(env):
    argv = XENPAGE + ["mem-offline", "10000-17fff"]
    rc, shown = _run_pty(argv, env)
    assert rc == 0
    assert "offlining" in shown and "frames" in shown          # rich's bar was drawn
    assert "xenpage: mem-offline of 32768 frames: 32768 offlined" in shown
    p = subprocess.run(XENPAGE + ["mem-offline", "18000-1ffff"], env=env, capture_output=True, text=True)
    assert p.returncode == 0 and p.stderr == ""
    assert p.stdout == "xenpage: mem-offline of 32768 frames: 32768 offlined\n"


def test_single_frame_output_is_xen_hptools_even_on_a_terminal(env):
    rc, shown = _run_pty(XENPAGE + ["mem-offline", "20000"], env)
    assert rc == 0
    lines = [l for l in shown.replace("\r", "").splitlines() if l]
    assert lines == ["Prepare to offline MEMORY mfn 20000",
                     "Memory mfn 20000 offlined successfully, current state is [PG_OFFLINE_OFFLINED]"]


def test_lock_wait_says_who_holds_it(env, tmp_path):
    lock = tmp_path / "s" / "lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.pwrite(fd, b"4242\n", 0)
    try:
        p = subprocess.Popen(XENPAGE + ["mem-offline", "21000"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        time.sleep(3)
        assert p.poll() is None  # still waiting
    finally:
        os.close(fd)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert f"xenpage: waiting for another xenpage holding {lock} (pid 4242)" in err
    assert out.startswith("Prepare to offline MEMORY mfn 21000")
