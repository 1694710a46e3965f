"""``xenpage mem-offline`` on an HVM guest's page, in subprocesses: live migration to the same
host (the default), in place (``--hvm=exchange``), left pending as xen-hptool does
(``--hvm=none``), to another saved host (``--migrate-to``), and option errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from xenpage.abi import hvm as H

from xenpage.backends.sim import host_path
from xenpage.hypervisor import invariants
from xenpage.hypervisor.host import Host

SWAPPED = ("Memory mfn {m:x} offlined successfully, this page is DOM{d} page and being swapped "
           "successfully, current state is [PG_OFFLINE_OFFLINED, PG_OFFLINE_OWNED]")


def hvm_mfn(state, gfn: int = 1000, domid: int = 2) -> int:
    return int(Host.load(host_path(state)).p2m[domid][gfn])


def load_ok(state) -> Host:
    h = Host.load(host_path(state))
    assert invariants.check(h) == []
    assert all(g.verify() == [] for g in h.guests.values())
    return h


def test_hvm_page_is_retired_by_live_migration_to_the_same_host(cli_state, xenpage_cli):
    m = hvm_mfn(cli_state)
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}")
    assert (r.returncode, r.stderr) == (0, "")
    out = r.stdout.splitlines()
    assert out[:2] == [f"Prepare to offline MEMORY mfn {m:x}", SWAPPED.format(m=m, d=2)]
    assert out[2].startswith(f"xenpage: mfn {m:x}: live-migrated d2 to d4 on the same host")  # d3: the PVH guest
    assert "downtime" in out[2] and out[2].endswith("old frame offlined")
    r = xenpage_cli(cli_state, "mem-status", f"{m:x}")
    assert r.stdout.splitlines()[-1] == "Memory Status 2: [ PAGE_OFFLINED ]"
    h = load_ok(cli_state)
    assert 2 not in h.domains and h.domains[4].name == "hvm1" and h.domains[4].hvm
    r = xenpage_cli(cli_state, "list")
    assert any(line.split()[:3] == ["hvm1", "4", "HVM"] for line in r.stdout.splitlines())


def test_hvm_page_exchanged_in_place(cli_state, xenpage_cli):
    m = hvm_mfn(cli_state, 4321)
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}", "--hvm=exchange", "--json")
    assert r.returncode == 0
    data = json.loads(r.stdout)
    o = data["outcomes"][0]
    assert (o["kind"], o["domid"], o["gpfn"]) == ("exchanged", 2, 4321)
    assert o["extra"]["offlined"] and o["extra"]["downtime_s"] < 1e-3
    assert data["stdout"][1] == SWAPPED.format(m=m, d=2)
    assert "in place (decrease_reservation + populate_physmap" in data["stdout"][2]
    h = load_ok(cli_state)
    assert 2 in h.domains and int(h.p2m[2][4321]) == o["new_mfn"]


def test_hvm_none_answers_as_xen_hptool(cli_state, xenpage_cli):
    m = hvm_mfn(cli_state, 77)
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}", "--hvm", "none")
    assert r.returncode == 1
    assert r.stdout == f"Prepare to offline MEMORY mfn {m:x}\n"
    assert r.stderr.splitlines()[:2] == ["DOM2: No suspend port, try live migration",
                                         f"Failed to suspend guest 2 for mfn {m:x}"]
    r = xenpage_cli(cli_state, "mem-status", f"{m:x}")
    assert r.stdout.splitlines()[-1] == "Memory Status 8: [ PAGE_OFFLINE_PENDING  PAGE_ONLINED ]"


def test_migrate_to_another_saved_host(cli_state, xenpage_cli, tmp_path):
    other = tmp_path / "other"
    r = xenpage_cli(other, "host", "create", "--mem", "512", "--dom0", "128", "--no-guests")
    assert r.returncode == 0
    m = hvm_mfn(cli_state, 20000)
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}", f"--migrate-to={other}", "--link=1000:0.2")
    assert r.returncode == 0, r.stderr
    assert "live-migrated d2 to d1 on the destination host" in r.stdout
    src, dst = load_ok(cli_state), load_ok(other)
    assert 2 not in src.domains and dst.domains[1].name == "hvm1"
    assert src.ft.state(m) == 2 and m in src.heap.offlined_list


def test_option_errors_change_nothing(cli_state, xenpage_cli):
    m = hvm_mfn(cli_state)
    for bad in (["--hvm=teleport"], ["--fallback=pray"], ["--link=fast"], ["--hvm"]):
        r = xenpage_cli(cli_state, "mem-offline", f"{m:x}", *bad)
        assert r.returncode == 1 and "nothing done" in r.stderr, bad
    r = xenpage_cli(cli_state, "mem-status", f"{m:x}")
    assert r.stdout.splitlines()[-1] == "Memory Status 0: [ PAGE_ONLINED ]"


def test_pvh_guest_is_listed_and_retired_in_place(cli_state, xenpage_cli):
    r = xenpage_cli(cli_state, "list")
    rows = {ln.split()[0]: ln.split() for ln in r.stdout.splitlines()[1:]}
    assert rows["pvh1"][2] == "PVH" and rows["hvm1"][2] == "HVM" and rows["domu1"][2] == "PV"
    data = json.loads(xenpage_cli(cli_state, "list", "--json").stdout)
    assert {d["name"]: d["type"] for d in data["domains"]}["pvh1"] == "pvh"
    m = hvm_mfn(cli_state, 777, domid=3)
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}", "--hvm=exchange", "--json")
    assert r.returncode == 0, r.stderr
    o = json.loads(r.stdout)["outcomes"][0]
    assert (o["kind"], o["domid"], o["gpfn"], o["extra"]["type"]) == ("exchanged", 3, 777, "pvh")
    load_ok(cli_state)


def test_killed_in_place_retirement_is_completed_by_recover(cli_state, xenpage_cli):
    """SIGKILL right after the pages were journaled and the gfns given back: the guest is
    left paused with a hole; ``xenpage recover`` repopulates it from the journal."""
    import os
    import subprocess
    import sys
    m = hvm_mfn(cli_state, 1234)
    crashrun = Path(__file__).resolve().with_name("crashrun.py")
    r = subprocess.run([sys.executable, str(crashrun), "--crash-at", "hvm-decreased", "--",
                        "--backend", "sim", "mem-offline", f"{m:x}", "--hvm=exchange"],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, XENPAGE_STATE_DIR=str(cli_state)))
    assert r.returncode == -9, r.stderr
    assert (cli_state / "hvm-exchange.journal").exists()
    h = Host.load(host_path(cli_state))
    assert h.domains[2].pause_count == 1 and h.ept[2].type[1234] == H.p2m_invalid
    assert h.guests[2].verify() != []                                   # the guest's memory is not whole
    r = xenpage_cli(cli_state, "recover")
    assert r.returncode == 0, r.stderr
    assert "unpaused" in r.stdout
    h = load_ok(cli_state)
    assert not h.domains[2].pause_count and not (cli_state / "hvm-exchange.journal").exists()


def test_migrate_to_a_missing_host_is_refused(cli_state, xenpage_cli, tmp_path):
    """--migrate-to must name a saved host: a typo never creates one and never moves the
    guest into it (issue 15)."""
    m = hvm_mfn(cli_state)
    r = xenpage_cli(cli_state, "mem-offline", f"{m:x}", f"--migrate-to={tmp_path / 'typo'}")
    # refused before this host is opened (exit 1, like every refused input)
    assert r.returncode == 1 and "no saved host" in r.stderr and "nothing done" in r.stderr, r.stderr
    assert not (tmp_path / "typo" / "host").exists()
    h = load_ok(cli_state)
    assert 2 in h.domains and h.ft.state(m) == 0


def test_crossed_migrations_give_up_instead_of_deadlocking(cli_state, xenpage_cli, tmp_path):
    """mem-offline --migrate-to B on host A while the same runs from B to A: each holds its own
    host's lock and waits for the other's.  The destination's lock is waited for a bounded
    time, with a message, then the command gives up (exit 2) having done nothing (issue 19,
    item 4).  First with B's lock held by this test (the crossing for certain), then two real
    processes started together: both end."""
    import shutil
    import subprocess
    import sys
    import time
    from xenpage.backends.locking import locked
    from xenpage.cli.retire_opts import DEST_LOCK_TIMEOUT
    other = tmp_path / "B"
    shutil.copytree(cli_state, other, symlinks=True)
    m = hvm_mfn(cli_state)
    with locked(other / "lock"):
        t0 = time.monotonic()
        r = xenpage_cli(cli_state, "mem-offline", f"{m:x}", f"--migrate-to={other}")
        waited = time.monotonic() - t0
    assert r.returncode == 2, r.stderr
    assert "waiting for another xenpage holding" in r.stderr and "gave up after" in r.stderr
    assert waited >= DEST_LOCK_TIMEOUT and "Traceback" not in r.stderr
    assert load_ok(cli_state).ft.state(m) == 0          # nothing done
    exe = Path(sys.executable).with_name("xenpage")
    env = dict(os.environ, XENPAGE_BACKEND="sim")
    procs = [subprocess.Popen([str(exe), "--state-dir", str(a), "mem-offline", f"{hvm_mfn(a):x}",
                               f"--migrate-to={b}"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for a, b in ((cli_state, other), (other, cli_state))]
    for p in procs:
        out, err = p.communicate(timeout=6 * DEST_LOCK_TIMEOUT)
        assert p.returncode in (0, 1, 2) and "Traceback" not in err, err
    load_ok(cli_state), load_ok(other)
