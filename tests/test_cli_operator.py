"""The CLI as an operator meets it (issue 15, items 1-4): strict input on every command,
ranges and lists for every mem-* command, options validated, -h/--help everywhere, one JSON
envelope that a JSON Schema (``src/xenpage/cli/schema/envelope.json``) describes, errors in
JSON too, and commands that only read leave the state directory exactly as it was.

In-process (click's runner) on a small saved host, except where the real command's streams
matter (a subprocess, as an operator runs it)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import click
import jsonschema
import pytest
from click.testing import CliRunner

from xenpage.cli import output
from xenpage.cli.main import cli
from xenpage.toolstack import hptool

SCHEMA_PATH = Path(output.__file__).with_name("schema") / output.SCHEMA_NAME
SCHEMA = json.loads(SCHEMA_PATH.read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


class Ran:
    def __init__(self, r):
        self.code, self.out, self.err, self.exc = r.exit_code, r.stdout, r.stderr, r.exception

    @property
    def doc(self) -> dict:
        return json.loads(self.out)


def invoke(state, *args, input=None) -> Ran:
    r = CliRunner().invoke(cli, ["--backend", "sim", "--state-dir", str(state), *map(str, args)],
                           input=input, prog_name="xenpage")
    ran = Ran(r)
    # never a traceback: only SystemExit may end a command
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"{args}: {r.exception!r}\n{r.stderr}"
    assert "Traceback" not in ran.out + ran.err
    return ran


@pytest.fixture(scope="module")
def small_state(tmp_path_factory):
    """A small saved host (128 MiB: dom0, a PV, an HVM and a PVH guest): cheap to load."""
    d = tmp_path_factory.mktemp("small")
    r = invoke(d, "host", "create", "--mem", "128", "--dom0", "32", "--pv", "domu1:8",
               "--hvm", "hvm1:4", "--pvh", "pvh1:4")
    assert r.code == 0, r.err
    return d


@pytest.fixture
def state(small_state, tmp_path):
    d = tmp_path / "state"
    shutil.copytree(small_state, d, symlinks=True)
    return d


def snapshot(d: Path) -> dict:
    """Every entry under ``d``: kind, mtime, size and content hash (a symlink's target)."""
    out = {}
    for root, dirs, files in os.walk(d):
        for n in dirs + files:
            p = Path(root) / n
            st = p.lstat()
            if p.is_symlink():
                what = os.readlink(p)
            elif p.is_file():
                what = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                what = "dir"
            out[str(p.relative_to(d))] = (st.st_mtime_ns, st.st_size, what)
    return out


def free_frame(state) -> int:
    """A free frame of the saved host: the middle of its largest free chunk."""
    from xenpage.backends.sim import host_path
    from xenpage.hypervisor.host import Host
    host = Host.load(host_path(state))
    head, order = max(host.heap.chunks(), key=lambda c: (c[1], c[0]))
    return head + (1 << order) // 2


# -- 1. strict input --------------------------------------------------------------------------------

TYPOS = ["3f1o0", "3f1zz", "0x", "", " 10", "+10", "-10", "10-", "-", "1-2-3", "1,,2", "10,", "0x1g",
         "100000000", "2-1", "0-100000"]


@pytest.mark.parametrize("cmd", ["mem-status", "mem-online", "mem-offline"])
@pytest.mark.parametrize("arg", TYPOS)
def test_a_typo_is_refused_with_what_was_typed_and_nothing_done(state, cmd, arg):
    before = snapshot(state)
    r = invoke(state, cmd, arg)
    assert r.code == 1 and r.out == ""
    assert r.err.startswith("xenpage: ") and r.err.endswith("; nothing done\n")
    assert (f"'{arg}'" if arg else "''") in r.err or arg in r.err
    assert snapshot(state) == before


def test_the_issue_typo_says_what_xen_hptool_would_have_read(state):
    r = invoke(state, "mem-offline", "3f1o0")
    assert r.err == ("xenpage: '3f1o0' is not a hexadecimal MFN (xen-hptool would read it as "
                     "3f1); nothing done\n")


@pytest.mark.parametrize("cmd", ["mce-inject", "badpages clear"])
def test_other_commands_taking_frames_are_as_strict(state, cmd):
    before = snapshot(state)
    r = invoke(state, *cmd.split(), "3f1o0")
    assert r.code == 1 and "'3f1o0' is not a hexadecimal MFN" in r.err
    assert snapshot(state) == before
    r = invoke(state, "badpages", "--history", "3f1o0")
    assert r.code == 1 and "'3f1o0' is not a hexadecimal MFN" in r.err


@pytest.mark.parametrize("value", ["zz", "3f1o0", "0x10,,0x20", "-1", "0x10;0x20", "0x1" * 40])
def test_host_reboot_refuses_a_badpage_value_xen_would_misread(state, value):
    before = snapshot(state)
    r = invoke(state, "host", "reboot", "--badpage", value)
    assert r.code == 1 and "nothing done" in r.err
    assert snapshot(state) == before


def test_parse_mfn_args_ranges_and_lists():
    from xenpage.cli.main import parse_mfn_args
    assert parse_mfn_args(["10-12,20", "0x30", "40,41-42"]) == [0x10, 0x11, 0x12, 0x20, 0x30,
                                                                0x40, 0x41, 0x42]
    for bad in ("10-", "-10", "1,,2", "a-b-c", "2-1", "x"):
        with pytest.raises(hptool.BadMfn):
            parse_mfn_args([bad])


@pytest.mark.parametrize("cmd,fn", [("mem-status", hptool.mem_status), ("mem-online", hptool.mem_online)])
def test_ranges_and_lists_answer_each_frame_as_xen_hptool_would(state, cmd, fn):
    """``a-b`` and ``a,b`` for mem-status and mem-online: every frame's lines, in order, as
    xen-hptool run once per frame (the toolstack's own hptool functions) prints them; exit 1
    if any frame's would be."""
    from xenpage.backends.sim import SimHypervisor, host_path
    from xenpage.hypervisor.host import Host
    r = invoke(state, cmd, "9e-a1,3", "0x4")   # 9e, 9f RAM; a0, a1 the VGA hole; 3; 4
    host = Host.load(host_path(state))
    hv = SimHypervisor(host)
    want = [fn(hv, m) for m in (0x9E, 0x9F, 0xA0, 0xA1, 0x3, 0x4)]
    assert r.out == "".join(w.stdout for w in want)
    assert r.err == "".join(w.stderr for w in want)
    assert r.code == max(w.exit_code for w in want)
    assert cmd != "mem-status" or r.code == 1   # the VGA hole cannot be queried
    doc = invoke(state, cmd, "9e-a1,3", "0x4", "--json").doc
    assert [f["mfn"] for f in doc["frames"]] == [0x9E, 0x9F, 0xA0, 0xA1, 0x3, 0x4]
    assert [f["exit"] for f in doc["frames"]] == [w.exit_code for w in want]


def test_mem_online_of_a_range_onlines_every_frame(state):
    m = free_frame(state)
    rng = f"{m:x}-{m + 3:x}"
    assert invoke(state, "mem-offline", rng).code == 0
    st = invoke(state, "mem-status", rng, "--json").doc
    assert [f["status"]["flags"] for f in st["frames"]] == [["OFFLINED"]] * 4
    r = invoke(state, "mem-online", rng)
    assert r.code == 0 and r.out.count("onlined successfully") == 4
    st = invoke(state, "mem-status", rng, "--json").doc
    # Xen never sets PG_OFFLINE_STATUS_ONLINE (xen-semantics.md C.4): an online frame is 0
    assert [f["status"]["status"] for f in st["frames"]] == [0] * 4


def test_migrate_to_and_link_are_validated(state, tmp_path):
    before = snapshot(state)
    for opt in ("--link=inf", "--link=nan", "--link=1000:nan", "--link=0", "--link=-5:1",
                f"--migrate-to={tmp_path / 'nowhere'}", "--hvm=sideways", "--fallback=never"):
        r = invoke(state, "mem-offline", "9e", opt)
        assert r.code in (1, 2) and ("nothing done" in r.err or "no saved host" in r.err), (opt, r.err)
        assert snapshot(state) == before, opt
    assert not (tmp_path / "nowhere").exists()


@pytest.mark.parametrize("args,says", [
    (["--dom0", "4096", "--mem", "2048"], "the sizes do not fit: dom0 has 4096 MiB of a 2048 MiB host"),
    (["--dom0", "1900", "--mem", "2048"], "the sizes do not fit: dom0 1900 MiB + guests 288 MiB"),
    (["--dom0", "2040", "--mem", "2048", "--no-guests"], "the sizes do not fit in a 2048 MiB host"),
    (["--dom0", "0"], "dom0 needs at least 1 MiB"),
    (["--mem", "2047"], "an even number of MiB"),
    (["--mem", str(1 << 30)], "an even number of MiB from 64"),
    (["--pv", "a:8", "--hvm", "a:8"], "guest names must be unique"),
    (["--pv", "a:8", "--pv", "a:8"], "guest names must be unique"),
    (["--pv", "Domain-0:8"], "guest names must be unique"),
    (["--pv", "a:1"], "a PV guest has 2 to"),
    (["--pv", "a b:8"], "NAME:MiB"),
    (["--hvm", "x:-3"], "NAME:MiB"),
    (["--no-guests", "--pv", "a:8"], "contradict"),
    (["--pcpus", "0"], "--pcpus"),
])
def test_host_create_refuses_what_cannot_be_built(state, args, says):
    before = snapshot(state)
    r = invoke(state, "host", "create", *args)
    assert r.code in (1, 2) and says in r.err, r.err
    assert "cannot be destroyed" not in r.err
    assert snapshot(state) == before


@pytest.mark.parametrize("args", [
    ["year", "--hosts", "0"], ["year", "--hosts", "-1"], ["year", "--days", "nan"],
    ["year", "--days", "inf"], ["year", "--days", "0"], ["year", "--seed", "-1"],
    ["mce-inject", "9e", "--count", "0"], ["mce-inject", "9e", "--repeat", "-1"],
    ["mce-inject", "9e", "--interval", "nan"], ["mce-inject", "9e", "--time", "inf"],
    ["fleet", "study", "--hosts", "0"], ["fleet", "study", "--days", "nan"],
    ["fleet", "study", "--workers", "0"], ["fleet", "inventory", "--chunk", "0", "."],
    ["dump-p2m", "--", "-1"], ["dump-p2m", "1", "--limit", "-1"],
    ["retired", "--interval", "nan", "--no-follow"], ["retired", "--interval", "-1", "--no-follow"],
])
def test_counts_and_numbers_are_validated(state, args):
    before = snapshot(state)
    r = invoke(state, *args)
    assert r.code in (1, 2) and r.err, r.err
    assert snapshot(state) == before


def test_source_files_that_are_no_logs_are_refused(state, tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("")
    cases = {str(tmp_path): "is a directory", "/bin/ls": "a binary file",
             str(tmp_path / "typo"): "no such file", "/proc/self/mem": "nothing done"}
    before = snapshot(state)
    for cmd in ("retire", "retired"):
        for f, says in cases.items():
            extra = ["--no-follow"] if cmd == "retired" else []
            r = invoke(state, cmd, "--from", f, *extra)
            assert r.code in (1, 2) and says in r.err and "started" not in r.out, (cmd, f, r.err)
            assert snapshot(state) == before, (cmd, f)
    r = invoke(state, "retire", "--from", empty)        # an empty log is a log: 0 records
    assert r.code == 0 and "0 records" in r.out


def test_retired_from_a_missing_file_says_so_at_once(tmp_path, xenpage_cli, state):
    """The issue's 'follows a missing file forever without a word': a subprocess that would
    hang is stopped by the timeout."""
    r = xenpage_cli(state, "retired", "--from", tmp_path / "typo", timeout=60)
    assert r.returncode == 1 and "no such file" in r.stderr


# -- 3. help ------------------------------------------------------------------------------------------

def leaf_commands(group: click.Group = cli, prefix: str = "") -> list[str]:
    out = []
    for name, c in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(c, click.Group):
            if c.invoke_without_command:
                out.append(path)
            out += leaf_commands(c, path + " ")
        else:
            out.append(path)
    return sorted(out)


HPTOOL_ONLY = {"help", "cpu-online", "cpu-offline", "smt-enable", "smt-disable"}


@pytest.mark.parametrize("path", [p for p in leaf_commands() if p not in HPTOOL_ONLY])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_every_command_explains_itself(state, path, flag):
    before = snapshot(state)
    r = invoke(state, *path.split(), flag)
    assert r.code == 0 and r.out.startswith(f"Usage: xenpage {path}") and r.err == ""
    assert snapshot(state) == before


def test_xenpage_help_lists_every_command(state):
    r = invoke(state, "help")
    assert r.code == 0 and r.out == "" and r.err.startswith(hptool.HELP)
    listed = r.err[len(hptool.HELP):]
    for path in leaf_commands():
        if path not in HPTOOL_ONLY and not path.startswith("mem-"):
            assert f"\n  {path} " in listed, path
    for word in ("retire", "retired", "badpages", "mce-inject", "year", "recover", "fleet study"):
        assert f"\n  {word} " in listed


def test_xen_hptool_help_and_unknown_words_are_untouched(state):
    r = invoke(state)
    assert (r.code, r.out, r.err) == (0, "", hptool.HELP)
    r = invoke(state, "-h")   # xen-hptool reads any first word as a command
    assert (r.code, r.err) == (1, "Unrecognised command '-h' -- try 'xen-hptool help'\n")
    r = invoke(state, "mem-status")
    assert (r.code, r.out, r.err) == (1, "", hptool.HELP)


# -- 4. one JSON envelope -------------------------------------------------------------------------------

def _samples(state: Path, tmp: Path) -> dict[str, list[list[str]]]:
    """argv lists that give each command's --json output (run in this order)."""
    m = free_frame(state)
    log = state / "mcelog"
    (tmp / "lists").mkdir()
    return {
        "host create": [["host", "create", "--mem", "128", "--dom0", "32", "--pv", "domu1:8",
                         "--hvm", "hvm1:4", "--pvh", "pvh1:4"]],
        "host show": [["host", "show"]],
        "list": [["list"]],
        "owner": [["owner", f"{m:x}", "7fa00-7fa01"]],
        "mem-status": [["mem-status", f"{m:x}", "a0-a1"]],
        "mem-offline": [["mem-offline", f"{m:x}", "a0"]],
        "mem-online": [["mem-online", f"{m:x}", "a0"]],
        "dump-p2m": [["dump-p2m", "1", "--limit", "3"], ["dump-p2m", "99"]],
        "mce-inject": [["mce-inject", f"{m + 1:x}", "--repeat", "3"]],
        "retire": [["retire", "--from", str(log)]],
        "retired": [["retired", "--no-follow"]],
        "badpages": [["badpages"], ["badpages", "--boot-option"], ["badpages", "--history", f"{m + 1:x}"],
                     ["badpages", "--summary"]],
        "badpages clear": [["badpages", "clear", f"{m + 1:x}"]],
        "retire-switch": [["retire-switch"], ["retire-switch", "on"]],
        "recover": [["recover"]],
        "host reboot": [["host", "reboot"]],
        "year": [["year", "--days", "3", "--hosts", "1", "--policy", "first-error"]],
        "demo": [["demo"]],
        "fleet study": [["fleet", "study", "--hosts", "2", "--threads", "--workers", "1",
                         "--days", "30", "--policy", "first-error", "--out", str(tmp / "study")]],
        "fleet inventory": [["fleet", "inventory", str(tmp / "lists"), "--threads", "--workers", "1",
                             "--out", str(tmp / "inv")]],
    }


def _validate(doc: dict) -> None:
    errors = sorted(VALIDATOR.iter_errors(doc), key=lambda e: list(e.path))
    assert not errors, [(list(e.path), e.message[:200]) for e in errors[:5]]


@pytest.mark.slow
def test_every_command_json_follows_the_schema(state, tmp_path):
    samples = _samples(state, tmp_path)
    # every command is sampled: a new command needs its sample here and its schema
    assert set(samples) == set(leaf_commands()) - HPTOOL_ONLY
    assert set(samples) == {c.replace("_", " ") for c in SCHEMA["$defs"]["command"]}
    for path, argvs in samples.items():
        for argv in argvs:
            if path == "fleet inventory":
                (tmp_path / "lists" / "h1.json").write_text(invoke(state, "badpages", "--json").out)
            r = invoke(state, *argv, "--json")
            lines = r.out.strip().splitlines()
            if path == "retired":   # JSON lines: the events, then the envelope
                docs = [json.loads(x) for x in lines]
                for ev in docs[:-1]:
                    jsonschema.validate(ev, SCHEMA["$defs"]["retired-event"])
                doc = docs[-1]
            else:
                doc = json.loads(r.out)
            assert doc["command"] == path and doc["exit"] == r.code, (argv, doc.get("error"))
            _validate(doc)


def test_the_schema_can_fail():
    good = {"command": "retire-switch", "exit": 0, "switch": "on"}
    _validate(good)
    for bad in ({"command": "retire-switch", "exit": 0, "switch": 1},
                {"command": "retire-switch", "exit": 0},
                {"command": "retire-switch", "exit": 3, "switch": "on"},
                {"exit": 0, "switch": "on"},
                {"command": "no-such", "exit": 0},
                {"command": "mem-status", "exit": 0, "stdout": [], "stderr": [],
                 "frames": [{"mfn": 1, "mfn_hex": "1", "rc": 0, "errno": 0, "errno_name": None,
                             "status": 2, "exit": 0}]},
                {"command": "list", "exit": 0, "error": "x"}):
        assert list(VALIDATOR.iter_errors(bad)), bad


@pytest.mark.parametrize("argv", [
    ["mem-status", "zz"], ["mem-offline", "3f1o0"], ["mem-online"], ["mem-status", "--bogus"],
    ["list", "--bogus"], ["host", "create", "--dom0", "4096", "--mem", "2048"], ["year", "--hosts", "0"],
    ["retire", "--from", "/bin/ls"], ["dump-p2m", "x"], ["badpages", "--history", "zz"],
    ["mce-inject", "9e", "--count", "0"], ["no-such-command"], ["cpu-online", "1"],
    ["badpages", "clear"], ["fleet", "study", "--hosts", "0"],
])
def test_errors_under_json_are_one_json_document(state, argv):
    before = snapshot(state)
    r = invoke(state, *argv, "--json")
    doc = r.doc                       # stdout is exactly one JSON document
    assert r.code in (1, 2) and doc["exit"] == r.code and doc["error"]
    _validate(doc)
    assert r.err.strip()              # and people still read why on stderr
    assert snapshot(state) == before


def test_status_words_decode_the_same_everywhere(state):
    m = free_frame(state)
    off = invoke(state, "mem-offline", f"{m:x}", "--json").doc["outcomes"][0]["status"]
    st = invoke(state, "mem-status", f"{m:x}", "--json").doc["frames"][0]["status"]
    on = invoke(state, "mem-online", f"{m:x}", "--json").doc["frames"][0]["status"]
    assert set(off) == set(st) == set(on) == {"op", "status", "hex", "flags", "owner", "untouched"}
    assert (off["op"], off["flags"]) == ("offline", ["OFFLINED"])
    assert (st["op"], st["flags"], st["owner"]) == ("query", ["OFFLINED"], None)
    assert (on["op"], on["flags"]) == ("online", ["ONLINED"])
    # Xen's own offline of a frame hit by an uncorrected error (mce-inject): the same object
    mc = invoke(state, "mce-inject", f"{m + 1:x}", "--uc", "--json").doc["injected"][0]["xen"]["status"]
    assert set(mc) == set(off) and (mc["op"], mc["flags"]) == ("offline", ["OFFLINED", "BROKEN"])


# -- reading never writes ---------------------------------------------------------------------------------

READERS = [["mem-status", "9e"], ["mem-status", "100-101", "--json"], ["list"], ["list", "--json"],
           ["host", "show"], ["host", "show", "--json"], ["dump-p2m", "1", "--limit", "2"],
           ["badpages"], ["badpages", "--json"], ["badpages", "--boot-option"],
           ["badpages", "--boot-option", "--json"], ["badpages", "--history", "9e", "--json"],
           ["retire-switch"], ["retire-switch", "--json"], ["help"], ["-V"]]


def test_reading_never_writes(state):
    m = free_frame(state)
    # a list with frames in it, as the service leaves it
    invoke(state, "mce-inject", f"{m:x}", "--repeat", "3")
    assert invoke(state, "retire", "--from", state / "mcelog").code == 0
    before = snapshot(state)
    for argv in READERS:
        r = invoke(state, *argv)
        assert r.code == 0, (argv, r.err)
        assert snapshot(state) == before, argv


def test_badpages_json_shows_the_boot_option_without_asking_for_it(state):
    m = free_frame(state)
    invoke(state, "mce-inject", f"{m:x}", "--repeat", "3")
    invoke(state, "retire", "--from", state / "mcelog")
    doc = invoke(state, "badpages", "--json").doc
    assert doc["boot_option"]["option"] == f"badpage={m:#x}"
    assert invoke(state, "badpages", "--boot-option").out == f"badpage={m:#x}\n"
