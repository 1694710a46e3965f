"""A fuzz of the whole CLI (issue 15, item 2): every command of the command tree (and
xen-hptool's words and prefixes), random arguments -- MFN-like words and typos, every option
of the command with good and bad values, files that are directories, binary, empty, missing
or unreadable, global options naming a file as the state directory -- run in-process on a
small saved host.  Whatever comes in:

* the exit code is 0, 1 or 2, and no Python traceback is printed (only SystemExit ends a
  command);
* under ``--json`` a failure is one JSON document, the schema's error envelope;
* a command that failed without handing a frame to Xen changed nothing in the state
  directory (lock files aside: their content is compared, not their times).

Bounded for ``make test``: a fixed number of examples, no deadline, derandomized (the same
inputs on every run; ``XENPAGE_FUZZ_EXAMPLES`` and ``XENPAGE_FUZZ_SEED`` explore further by
hand).  Commands that would run for long with good arguments (``retired`` follows its logs,
``year``, ``demo``, ``fleet``) always get one argument that bounds or refuses them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import click
import jsonschema
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, event, given, seed, settings
from hypothesis import strategies as st

from xenpage.cli import output
from xenpage.cli.main import cli

from test_cli_operator import HPTOOL_ONLY, leaf_commands, snapshot

EXAMPLES = int(os.environ.get("XENPAGE_FUZZ_EXAMPLES", "120"))
SEED = int(os.environ.get("XENPAGE_FUZZ_SEED", "15"))

SCHEMA = json.loads((Path(output.__file__).with_name("schema") / output.SCHEMA_NAME).read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)

LOCKS = {"lock", "mem-offline.lock"}

MFNS = ["9e", "100", "0x100", "3f1o0", "zz", "", "-1", "+1", " 1", "0x", "100-103", "103-100",
        "9e,a0", "1,,2", "ffffffffff", "100000000", "a0", "7ffe0", "-", "1-2-3", "0X1F"]
VALUES = ["0", "1", "-1", "2", "64", "128", "nan", "inf", "-inf", "1e309", "abc", "", "on", "off",
          "migrate", "exchange", "none", "first-error", "row", "x:8", "a:1", "dup:4", "1000:0.1",
          "1:2:3", "0:0:0", "fast", "full"]


FILES = ["@empty", "@binary", "@text", "@list.json", "@bad.json", "@adir", "@elf", "@missing",
         "/proc/self/mem", "/dev/null"]


def _make_files(d: Path) -> None:
    """The files an example may name (fresh per example: a command may create or fill one)."""
    d.mkdir()
    (d / "empty").write_bytes(b"")
    (d / "binary").write_bytes(bytes(range(256)) * 8)
    (d / "text").write_text("not a machine check\n" * 3)
    (d / "list.json").write_text('{"frames": [], "command": "badpages", "exit": 0}')
    (d / "bad.json").write_text("{")
    (d / "adir").mkdir()
    shutil.copy("/bin/true", d / "elf")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small saved host; its state directory is copied for each example."""
    base = tmp_path_factory.mktemp("fuzz") / "base"
    r = CliRunner().invoke(cli, ["--backend", "sim", "--state-dir", str(base), "host", "create",
                                 "--mem", "96", "--dom0", "24", "--pv", "domu1:8",
                                 "--hvm", "hvm1:4", "--pvh", "pvh1:4"])
    assert r.exit_code == 0, r.output
    return base


def _options(path: str) -> list[click.Option]:
    c: click.Command = cli
    for w in path.split():
        c = c.commands[w]  # type: ignore[attr-defined]
    return [p for p in c.params if isinstance(p, click.Option)]


#: what a command is run with, last, so that it ends soon (or is refused) whatever else it got
BOUND = {
    "retired": ["--no-follow", "--max-seconds", "0"],
    "year": ["--hosts", "0"],
    "demo": ["--bogus-option"],
    "fleet study": ["--hosts", "0"],
    "fleet inventory": ["--chunk", "0"],
}

#: every command once, the mem-* ones (and their prefixes) more often; one of xen-hptool's CPU
#: words and an unknown one
PATHS = [p for p in leaf_commands() if p not in HPTOOL_ONLY] + \
    ["mem-offline", "mem-online", "mem-status", "mem-", "m", "mem-o", "help", "cpu-on", "nonsense"]


GOOD_MFNS = ["9e", "100", "0x100", "100-103", "9e,100", "a0", "7ffe0", "200", "3f0-3f2"]


def _good_value(o: click.Option):
    """A value of the option's own type (the fuzz's well-formed half reaches the commands)."""
    t = o.type
    if isinstance(t, click.Choice):
        return st.sampled_from(list(t.choices))
    if isinstance(t, click.IntRange):
        lo = t.min if t.min is not None else 0
        return st.integers(lo, lo + 3).map(str)
    if t is click.INT:
        return st.sampled_from(["1", "2", "3"])
    if t is click.FLOAT:
        return st.sampled_from(["0", "0.5", "1", "2"])
    if isinstance(t, click.Path):
        return st.sampled_from(FILES)
    return st.one_of(st.sampled_from(VALUES), st.sampled_from(GOOD_MFNS))


@st.composite
def argv(draw, files: list[str] = FILES):
    path = draw(st.sampled_from(PATHS))
    words = path.split()
    if path in leaf_commands() and path not in HPTOOL_ONLY and not path.startswith("mem-"):
        opts = _options(path)
    else:  # the mem-* commands parse their own options
        opts = []
    mem_opts = ["--force", "--no-split-guard", "--hvm", "--fallback", "--migrate-to", "--link"]
    clean = draw(st.booleans())  # well-formed words only, or anything
    token = st.sampled_from(GOOD_MFNS) if clean else st.one_of(
        st.sampled_from(MFNS),
        st.from_regex(r"[0-9a-fxo,\- ]{0,5}", fullmatch=True),
        st.sampled_from(files),
        st.sampled_from(VALUES),
        st.sampled_from(["--json", "--bogus", "-x", "--"]),
    )
    args: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.integers(0, 3))
        if kind == 0 and (opts or path.startswith("mem-")):
            if opts:
                o = draw(st.sampled_from(opts))
                name = draw(st.sampled_from(o.opts + o.secondary_opts))
                args.append(name)
                if not o.is_flag and not o.count:
                    bad = st.one_of(st.sampled_from(VALUES), st.sampled_from(files),
                                    st.sampled_from(MFNS))
                    args.append(draw(_good_value(o) if clean else bad))
            else:
                name = draw(st.sampled_from(mem_opts))
                good = {"--hvm": ["migrate", "exchange", "none"], "--fallback": ["migrate"],
                        "--link": ["1000", "100:1"], "--migrate-to": ["@adir"]}.get(name, [""])
                val = draw(st.sampled_from(good) if clean else
                           st.one_of(st.sampled_from(VALUES), st.sampled_from(files)))
                args.append(name if name in ("--force", "--no-split-guard") else f"{name}={val}")
        else:
            args.append(draw(token))
    if draw(st.integers(0, 4)) == 0:
        args.append("--json")
    glob: list[str] = []
    g = draw(st.integers(0, 9))
    if g == 0:
        glob = ["--state-dir", draw(st.sampled_from(files))]
    elif g == 1:
        glob = ["--backend", "xen"]
    return glob, words + args + BOUND.get(path, [])


def _stable(snap: dict) -> dict:
    """The state without its lock files (taking a lock is not a change of state; that a
    lock is left empty -- no stale pid -- is checked on its own)."""
    return {k: v for k, v in snap.items() if Path(k).name not in LOCKS}


def _acted(out: str) -> bool:
    """Did the command hand a frame to Xen (then a failure may have changed the host)?"""
    return any(s in out for s in ("Prepare to", "Querying MEMORY", '"frames"', '"outcomes"',
                                  "records;", '"records"', "cleared", "rebooted", "created a",
                                  "appended"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize=False, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                 HealthCheck.data_too_large, HealthCheck.filter_too_much])
@seed(SEED)
@given(data=st.data())
def test_the_whole_cli_never_tracebacks(world, tmp_path_factory, data):
    base = world
    glob, args = data.draw(argv())
    here = Path(tmp_path_factory.mktemp("s"))
    state = here / "state"
    shutil.copytree(base, state, symlinks=True)
    _make_files(here / "files")
    glob = [str(here / "files" / a[1:]) if a.startswith("@") else a for a in glob]
    args = [str(here / "files" / a[1:]) if a.startswith("@") else a for a in args]
    if glob[:1] != ["--state-dir"]:
        glob = ["--state-dir", str(state)] + glob
    before = _stable(snapshot(state))
    r = CliRunner().invoke(cli, ["--backend", "sim", *glob, *args], input="", prog_name="xenpage")
    out, err = r.stdout, r.stderr
    shown = f"xenpage {' '.join(glob + args)!r}\nexit {r.exit_code}\n{out[-1500:]}\n{err[-1500:]}"
    assert r.exception is None or isinstance(r.exception, SystemExit), \
        f"{shown}\n{r.exception!r}"
    assert r.exit_code in (0, 1, 2), shown
    assert "Traceback" not in out + err, shown
    event(f"exit {r.exit_code}")  # --hypothesis-show-statistics: what the fuzz reached
    event(f"{args[0]} -> exit {r.exit_code}")
    helped = any(a in ("-h", "--help") for a in args)
    if "--json" in args and r.exit_code != 0 and not helped:
        lines = out.strip().splitlines()
        doc = json.loads(lines[-1]) if args[0] == "retired" else json.loads(out)
        assert doc["exit"] == r.exit_code, shown
        errors = list(VALIDATOR.iter_errors(doc))
        assert not errors, f"{shown}\n{errors[0].message[:300]}"
    if r.exit_code != 0 and not _acted(out + err):
        assert _stable(snapshot(state)) == before, shown
    for name in LOCKS:
        lock = state / name
        assert not lock.exists() or lock.read_bytes() == b"", shown
    shutil.rmtree(here, ignore_errors=True)
