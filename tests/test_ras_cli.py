"""The service's commands against a saved simulated host: mce-inject, retire --from,
badpages (--boot-option, --history, clear), retire-switch, host reboot, and the foreground
service (follows its log, stops on SIGTERM).  Most run in-process (click's runner); the
service and an end-to-end pass run as the real ``xenpage`` command in subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from click.testing import CliRunner

from xenpage.cli.main import cli

PV = "3f100"     # a frame of the PV guest domu1 on the default host
DOM0 = "40b88"   # a frame of dom0
FREE = "4e8"     # a free frame


class Done:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


@pytest.fixture
def run(monkeypatch):
    """``run(state_dir, *args, input=None, **env)`` in-process, like the subprocess fixture."""
    def go(state_dir, *args, input=None, **env):
        e = {"XENPAGE_STATE_DIR": str(state_dir), "XENPAGE_BACKEND": "sim", **env}
        r = CliRunner().invoke(cli, [str(a) for a in args], input=input, env=e,
                               catch_exceptions=False)
        return Done(r)
    return go


def js(p):
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_inject_retire_status(cli_state, xenpage_cli):
    run = xenpage_cli       # end to end: the installed command, in subprocesses
    p = run(cli_state, "mce-inject", PV, DOM0, FREE, "--repeat", "2")
    assert p.returncode == 0 and "appended 6 records" in p.stdout
    assert (cli_state / "mcelog").read_text().count("Hardware event. This is not a software error.") == 6
    p = run(cli_state, "retire", "--from", cli_state / "mcelog")
    assert p.returncode == 0, p.stderr
    assert f"transition mfn=0x{PV} xen=online->offlined state=new->retired action=soft outcome=exchanged" in p.stdout
    assert "frames: 2 retired, 1 pending, 0 failed" in p.stdout
    st = js(run(cli_state, "badpages", "--json"))
    assert st["counts"] == {"retired": 2, "pending": 1, "failed": 0, "accounted": 0}
    by = {f["mfn_hex"]: f for f in st["frames"]}
    assert by[PV]["outcome"] == "exchanged" and by[DOM0]["outcome"] == "dom0"
    assert by[PV]["errors"] == 2 and "exceeded 2 / 24h" in by[PV]["reason"]
    p = run(cli_state, "badpages")
    assert "2 retired (8 KiB), 1 pending" in p.stdout and f"0x{DOM0}" in p.stdout
    p = run(cli_state, "badpages", "--boot-option")
    assert p.stdout == f"badpage=0x{FREE},0x{PV},0x{DOM0}\n"
    h = js(run(cli_state, "badpages", "--history", PV, "--json"))
    assert [d["trigger"] for d in h["decisions"]] == ["page"] and len(h["events"]) == 2
    # the host really changed: the frame is offlined, the guest moved
    p = run(cli_state, "mem-status", PV)
    assert "PAGE_OFFLINED" in p.stdout
    # a second pass reads nothing new
    res = js(run(cli_state, "retire", "--from", cli_state / "mcelog", "--json"))
    assert res["records"] == 0 and res["replay"]["still_offlined"] == 2


def test_uncorrected_and_reboot(cli_state, run):
    inj = js(run(cli_state, "mce-inject", "3f089", "--uc", "--json"))
    assert inj["injected"][0]["xen"]["effect"] == "crashed"
    run(cli_state, "mce-inject", PV, "--repeat", "2")
    res = js(run(cli_state, "retire", "--from", cli_state / "mcelog", "--json"))
    kinds = {t["mfn"]: t for t in res["transitions"]}
    assert kinds["0x3f089"]["xen"] == "offlining+broken->offlining+broken"
    # domu1 was crashed by Xen: the exchange cannot suspend it; the frame stays pending
    assert kinds[f"0x{PV}"]["state"] == "new->pending"
    p = run(cli_state, "host", "reboot", "--json")
    r = js(p)
    assert r["badpage"] == f"0x3f089,0x{PV}" and r["withheld"] == 2
    res = js(run(cli_state, "retire", "--from", cli_state / "mcelog", "--json"))
    assert res["records"] == 0
    st = js(run(cli_state, "badpages", "--json"))
    assert st["counts"]["retired"] == 2
    assert all("badpage" in f["detail"] for f in st["frames"])
    p = run(cli_state, "list")
    assert "domu1" in p.stdout and "c-" not in p.stdout          # rebooted, runs again
    # reboot without badpage=: the list is replayed, frames exchanged out of the guests
    run(cli_state, "host", "reboot", "--no-badpage")
    res = js(run(cli_state, "retire", "--from", cli_state / "mcelog", "--json"))
    assert res["replay"]["retired_again"] == 2
    assert {t["outcome"] for t in res["transitions"]} <= {"exchanged", "offlined"}
    assert "c-" not in run(cli_state, "list").stdout               # nobody crashed


def test_clear_after_dimm_swap(cli_state, run):
    run(cli_state, "mce-inject", FREE, "4ea", "--repeat", "2")
    run(cli_state, "retire", "--from", cli_state / "mcelog")
    assert run(cli_state, "badpages", "--boot-option").stdout == "badpage=0x4e8,0x4ea\n"
    res = js(run(cli_state, "badpages", "clear", FREE, "--online", "--json"))
    assert res["cleared"] == ["0x4e8"] and res["boot_option"]["option"] == "badpage=0x4ea"
    assert res["onlined"][0]["exit"] == 0
    assert "PAGE_ONLINED" in run(cli_state, "mem-status", FREE).stdout
    run(cli_state, "mce-inject", "4ec", "--repeat", "2")
    run(cli_state, "retire", "--from", cli_state / "mcelog")
    loc = js(run(cli_state, "badpages", "--json"))["frames"]
    where = {f["mfn_hex"]: f["location"] for f in loc}
    d = where["4ec"]
    res = js(run(cli_state, "badpages", "clear", "--dimm", f"{d['socketid']}:{d['channel']}:{d['dimm']}",
                 "--json"))
    assert "0x4ec" in res["cleared"] and all(
        (where[m[2:]]["channel"], where[m[2:]]["dimm"]) == (d["channel"], d["dimm"]) for m in res["cleared"])
    assert run(cli_state, "badpages", "clear", "--dimm", "x").returncode == 1
    p = run(cli_state, "badpages", "clear", "--all")
    assert "cleared" in p.stdout and "remove badpage=" in p.stdout
    p = run(cli_state, "badpages", "clear")
    assert p.returncode == 1
    p = run(cli_state, "badpages", "--boot-option")
    assert p.stdout == "" and "no badpage= needed" in p.stderr


def test_switch_and_policy_file(cli_state, run):
    assert js(run(cli_state, "retire-switch", "off", "--json")) == \
        {"command": "retire-switch", "exit": 0, "switch": "off"}
    run(cli_state, "mce-inject", FREE, "--repeat", "3")
    run(cli_state, "retire", "--from", cli_state / "mcelog")
    assert js(run(cli_state, "badpages", "--json"))["counts"]["retired"] == 0
    assert run(cli_state, "retire-switch").stdout.strip() == "page retirement is off"
    run(cli_state, "retire-switch", "on")
    (cli_state / "retired.conf").write_text("[page]\nmemory-ce-threshold = 1 / 1h\nmemory-ce-action = account\n")
    run(cli_state, "mce-inject", "4ea")
    res = js(run(cli_state, "retire", "--from", cli_state / "mcelog", "--json"))
    assert res["status"]["counts"]["accounted"] == 1
    (cli_state / "retired.conf").write_text("[page]\nmemory-ce-threshold = 1 / 1s\n")
    p = run(cli_state, "retire", "--from", cli_state / "mcelog")
    assert p.returncode == 2 and "retired.conf:2" in p.stderr and "no 's'" in p.stderr


def test_retire_from_stdin_and_errors(cli_state, run, tmp_path):
    assert run(cli_state, "retire", "--from", tmp_path / "nope").returncode == 1
    p = run(cli_state, "mce-inject", "a0")
    assert p.returncode == 1 and "not RAM" in p.stderr
    p = run(cli_state, "mce-inject", "zz")
    assert p.returncode == 1
    text = ("CPU 0 BANK 13\nSTATUS 9c00000000800090\nADDR 4e8000\nTIME 1700000000\n\n"
            "CPU 0 BANK 13\nSTATUS 9c00000000800090\nADDR 4e8000\nTIME 1700000010\n")
    res = js(run(cli_state, "retire", "--from", "-", "--json", input=text))
    assert res["records"] == 2 and res["status"]["counts"]["retired"] == 1


def test_rasdaemon_environment(cli_state, run):
    run(cli_state, "mce-inject", FREE, "--repeat", "2")
    p = run(cli_state, "retire", "--from", cli_state / "mcelog", PAGE_CE_THRESHOLD="3",
            PAGE_CE_ACTION="soft")
    assert "Threshold of memory Corrected Errors is 3 / 86400s" in p.stdout
    assert "frames: 0 retired" in p.stdout


def test_service_follows_and_stops_on_sigterm(cli_state, xenpage_cli):
    env = dict(os.environ, XENPAGE_STATE_DIR=str(cli_state), XENPAGE_BACKEND="sim",
               JOURNAL_STREAM="8:1234")
    exe = str(Path(sys.executable).with_name("xenpage"))
    (cli_state / "mcelog").write_text("")
    proc = subprocess.Popen([exe, "retired", "--interval", "0.2"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        xenpage_cli(cli_state, "mce-inject", FREE, "--repeat", "2")
        while time.monotonic() < deadline:
            st = js(xenpage_cli(cli_state, "badpages", "--json"))
            if st["counts"]["retired"]:
                break
            time.sleep(0.3)
        assert st["counts"]["retired"] == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert any(l.startswith("<6>xenpage-retired: started backend=sim") for l in lines)
    assert any(l.startswith("<5>xenpage-retired: transition mfn=0x4e8 xen=online->offlined") for l in lines)
    assert lines[-1].startswith("<6>xenpage-retired: stopped records=2")


def test_service_json_no_follow(cli_state, run):
    run(cli_state, "mce-inject", FREE, "--repeat", "2")
    p = run(cli_state, "retired", "--no-follow", "--json")
    recs = [json.loads(l) for l in p.stdout.splitlines()]
    assert p.returncode == 0
    *events, env = recs                      # JSON lines: the events, then the envelope
    assert [r["event"] for r in events if r["event"] in ("started", "transition", "stopped")] == [
        "started", "transition", "stopped"]
    assert (env["command"], env["exit"], env["records"]) == ("retired", 0, 2)


def test_simulator_only_commands_refuse_on_xen(cli_state, run):
    for args in (["mce-inject", FREE], ["host", "reboot"]):
        p = run(cli_state, *args, XENPAGE_BACKEND="xen")
        # one clear message, exit 2, nothing done (tests/test_state_paths.py has them all)
        assert p.returncode == 2 and "exists only on the simulated host" in p.stderr



POISON = [
    # a 5000-digit SOCKETID: past Python's int() digit limit
    "Hardware event. This is not a software error.\nMCE 0\nCPU 0 BANK 8\nADDR 3f100000\n"
    "STATUS 8c00004000010092 MCGSTATUS 0\nMCGCAP 7000c16 APICID 0 SOCKETID " + "9" * 5000 + "\n",
    # a 5000-digit CPU
    "Hardware event. This is not a software error.\nMCE 1\nCPU " + "7" * 5000 + " BANK 8\n"
    "ADDR 3f100000\nSTATUS 8c00004000010092 MCGSTATUS 0\n",
    # an address >= 2^63 (SQLite's integers stop there)
    "Hardware event. This is not a software error.\nMCE 2\nCPU 0 BANK 8\nADDR ffffffffffff0000\n"
    "STATUS 8c00004000010092 MCGSTATUS 0\n",
]


@pytest.mark.parametrize("poison", POISON, ids=["socketid", "cpu", "addr"])
def test_poison_record_is_quarantined_and_the_rest_retired(cli_state, run, poison):
    """A record that cannot be parsed or stored is kept in quarantine, counted and reported;
    the records after it are retired, and a restart neither stops on it nor counts it again
    (issue 19, item 6)."""
    assert run(cli_state, "mce-inject", PV, "--repeat", "2").returncode == 0
    good = (cli_state / "mcelog").read_text()
    log = cli_state / "poisoned.log"
    log.write_text(poison + "\n" + good)
    for _ in range(2):  # the second run is a restart over the same log
        p = run(cli_state, "retire", "--from", log)
        assert p.returncode == 0, p.stderr
    st = js(run(cli_state, "badpages", "--json"))
    assert st["counts"]["retired"] == 1
    assert [f["mfn_hex"] for f in st["frames"]] == [PV]
    assert len(st["quarantined"]) == 1 and "poisoned.log" in st["quarantined"][0]["source"]
    assert st["quarantined"][0]["reason"]
    assert "1 records quarantined" in run(cli_state, "badpages").stdout


def _garbage(db):
    db.write_bytes(b"this is not a database\n" * 200)


def _truncated(db):
    db.write_bytes(db.read_bytes()[:1500])


def _sql(stmt):
    def damage(db):
        import sqlite3
        c = sqlite3.connect(db, isolation_level=None)
        c.execute(stmt)
        c.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the damage in the file itself, no WAL left
        c.close()
    return damage


DAMAGE = {
    "garbage": (_garbage, "not a usable retired-page list"),
    "truncated": (_truncated, "retired.db"),
    "dropped-table": (_sql("DROP TABLE frames"), "table frames missing"),
    "bad-json": (_sql("UPDATE frames SET location = '{not json'"), "bad JSON"),
    "bad-position": (_sql("INSERT OR REPLACE INTO meta VALUES('source:/x', '[[')"), "bad JSON"),
    "future-schema": (_sql("UPDATE meta SET value = '99' WHERE key = 'schema'"), "newer xenpage"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_damaged_list_is_refused_and_left_alone(cli_state, run, kind):
    """A damaged retired.db (or one from a newer xenpage) is refused with a clear message,
    exit 2, and left byte for byte as it was (issue 19, item 7)."""
    assert run(cli_state, "mce-inject", PV, "--repeat", "2").returncode == 0
    assert run(cli_state, "retire", "--from", cli_state / "mcelog").returncode == 0
    db = cli_state / "retired.db"
    import sqlite3
    c = sqlite3.connect(db)
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    c.close()
    damage, words = DAMAGE[kind]
    damage(db)
    before = db.read_bytes()
    for args in (("badpages",), ("badpages", "--json"), ("badpages", "--boot-option"),
                 ("retire", "--from", cli_state / "mcelog"), ("retire-switch", "off")):
        p = run(cli_state, *args)
        assert p.returncode == 2, (args, p.stdout, p.stderr)
        assert p.stderr.startswith("xenpage: ") and words in p.stderr, p.stderr
        assert "Traceback" not in p.stderr + p.stdout
    assert db.read_bytes() == before


@pytest.mark.parametrize("args", [("--time", "nan"), ("--time", "inf"), ("--time", "-1"),
                                  ("--interval", "nan"), ("--count", "0"), ("--count", "32769"),
                                  ("--repeat", "0"), ("--repeat", "-1")])
def test_mce_inject_refuses_bad_numbers(cli_state, run, args):
    """Counts below one and times that are not times are refused (exit 2) and nothing is
    written to the log (issues 15 and 19)."""
    p = run(cli_state, "mce-inject", PV, *args)
    assert p.returncode == 2 and "Traceback" not in p.stderr and "Invalid value" in p.stderr
    assert not (cli_state / "mcelog").exists()


def test_badpages_summary_groups_by_dimm_bank_row(cli_state, run):
    """``badpages --summary``: the list grouped like ``ras-mc-ctl --summary`` -- per DIMM,
    then bank and row -- with every frame and error counted exactly once per level."""
    assert run(cli_state, "badpages", "--summary").stdout == "No Memory errors.\n"
    run(cli_state, "mce-inject", PV, DOM0, FREE, "4ea", "--repeat", "2")
    run(cli_state, "mce-inject", "3f089", "--uc")
    run(cli_state, "retire", "--from", cli_state / "mcelog")
    st = js(run(cli_state, "badpages", "--json"))
    s = js(run(cli_state, "badpages", "--summary", "--json"))
    assert s["command"] == "badpages" and s["exit"] == 0
    dimms = s["dimms"]
    frames = st["frames"]
    assert sum(d["nframes"] for d in dimms) == len(frames)
    assert sum(d["corrected"] for d in dimms) == sum(f["errors"] for f in frames)
    assert sum(d["uncorrected"] for d in dimms) == sum(f["uncorrected"] for f in frames) >= 1
    for d in dimms:
        mine = [f for f in frames if (f["location"].get("socketid"), f["location"].get("channel"),
                                      f["location"].get("dimm")) == (d["socket"], d["channel"], d["dimm"])]
        assert d["nframes"] == len(mine)
        assert {k: v for k, v in d["frames"].items() if v} == \
            {s_: sum(f["state"] == s_ for f in mine) for s_ in {f["state"] for f in mine}}
        assert sum(b["nframes"] for b in d["banks"]) <= d["nframes"]
        for b in d["banks"]:
            assert sum(r["nframes"] for r in b["rows"]) <= b["nframes"]
    text = run(cli_state, "badpages", "--summary").stdout.splitlines()
    assert text[0] == "Memory controller events summary:"
    labelled = [d for d in dimms if d["label"] != "location unknown"]
    assert labelled, "the simulated machine decodes DIMM locations"
    assert any(l.startswith(f"\tDIMM {labelled[0]['label']} (socket:channel:dimm): ") for l in text)
    assert any(l.startswith("\t\t\trow 0x") for l in text) == any(b["rows"] for d in dimms for b in d["banks"])
