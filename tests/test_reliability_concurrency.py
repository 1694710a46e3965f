"""Two (and more) toolstack processes on the same host at once: the state directory's lock
(and mem-offline's own lock file, like xen-hptool's per-operation lock files) serialises
them -- no frame is exchanged twice, no process's update is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xenpage.abi.mm import STATE_OFFLINED
from xenpage.backends.sim import host_path
from xenpage.hypervisor.host import Host
from simworld import image, problems, small_host
from xenpage.toolstack import journal

EXE = Path(sys.executable).with_name("xenpage")


@pytest.fixture
def state(tmp_path):
    host, _ = small_host()
    host.save(host_path(tmp_path))
    return tmp_path


def _spawn(state, *args):
    env = dict(os.environ, XENPAGE_STATE_DIR=str(state), XENPAGE_BACKEND="sim")
    return subprocess.Popen([str(EXE), "--backend", "sim", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_racing_mem_offline_processes(state):
    host = Host.load(host_path(state))
    g1, g2 = host.guests[1], host.guests[2]
    same = [g1.mfn(p) for p in g1.user_pages("private")[:4]]
    a = [g1.mfn(p) for p in g1.user_pages("private")[10:13]]
    b = [g2.mfn(p) for p in g2.user_pages("private")[:3]]
    before = {d: image(host, d) for d in (1, 2)}
    jobs = [("same", same), ("same", same), ("a", a), ("b", b), ("same", same)]
    procs = [(k, m, _spawn(state, "mem-offline", *[f"{x:x}" for x in m], "--json")) for k, m in jobs]
    outs = []
    for k, m, p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode in (0, 1), err
        outs.append((k, json.loads(out)))
    host = Host.load(host_path(state))
    assert problems(host) == []
    for d in (1, 2):
        assert image(host, d).same_memory(before[d])
        assert not host.domains[d].is_shutting_down
    # every frame of every process was retired: no lost update
    for m in same + a + b:
        assert host.ft.owner(m) is None and host.ft.state(m) == STATE_OFFLINED, hex(m)
    # the contested frames were exchanged exactly once, the other racers saw them offlined
    exchanged = [o["mfn"] for k, d in outs for o in d["outcomes"] if o["kind"] == "exchanged"]
    assert sorted(exchanged) == sorted(same + a + b)
    assert not journal.journal_path(state).exists()


def test_recover_waits_for_a_running_mem_offline(state):
    host = Host.load(host_path(state))
    g = host.guests[1]
    mfns = [g.mfn(p) for p in g.user_pages("private")[:8]]
    p1 = _spawn(state, "mem-offline", *[f"{x:x}" for x in mfns])
    p2 = _spawn(state, "recover", "--json")
    p1.communicate(timeout=300)
    out, _ = p2.communicate(timeout=300)
    assert p2.returncode == 0 and json.loads(out)["ok"]
    host = Host.load(host_path(state))
    assert problems(host) == [] and not host.domains[1].is_shutting_down
