"""Random-delay SIGKILL over the real CLI (issue 19): ``xenpage mem-offline`` of a simulated
host killed at random times, then ``xenpage recover``, then nothing lost -- the invariant
checker, every guest's content check, the guest running with its memory, every frame retired
after a re-run (``tests/randomkill.py``).  A bounded number here; ``make soak`` runs more."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import randomkill
from simworld import small_host
from xenpage.backends.sim import host_path

KILLS = 10


def test_random_kills_then_recover(tmp_path):
    shm = Path("/dev/shm")
    work = shm / f"xenpage-test-{uuid.uuid4().hex}" if shm.is_dir() and os.access(shm, os.W_OK) \
        else tmp_path / "work"
    work.mkdir()
    try:
        base = work / "base"
        host, _ = small_host()
        host.save(host_path(base))
        c = randomkill.run(base, work, KILLS, seed=int.from_bytes(os.urandom(2), "little"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert c["kills"] == KILLS
    print(dict(c))
