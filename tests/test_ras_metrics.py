"""``xenpage retired --metrics-file``: the Prometheus text exposition format (0.0.4) for
node_exporter's textfile collector, parsed strictly here -- every line a HELP, a TYPE or a
sample of a declared family, names and labels by the format's grammar, each family once and
contiguous, no duplicate series -- and its figures equal to the retired-page list's."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
from click.testing import CliRunner

from xenpage.cli.main import cli

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|NaN|[+-]Inf)"
SAMPLE = re.compile(rf"({NAME})(?:\{{((?:{LABEL})(?:,{LABEL})*)?\}})? ({VALUE})(?: (-?\d+))?")
HELP = re.compile(rf"# HELP ({NAME}) (.*)")
TYPE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)")


def parse(text: str) -> dict[str, dict]:
    """{family: {"type", "help", "samples": {frozenset(labels): value}}}; AssertionError on
    anything the exposition format does not allow."""
    assert text.endswith("\n") and "\r" not in text
    fams: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        assert line, "no blank lines"
        if m := HELP.fullmatch(line):
            name = m.group(1)
            assert name not in fams, f"family {name} twice"
            fams[name] = {"help": m.group(2), "type": None, "samples": {}}
            current = name
            continue
        if m := TYPE.fullmatch(line):
            assert m.group(1) == current and fams[current]["type"] is None and not fams[current]["samples"]
            fams[current]["type"] = m.group(2)
            continue
        assert not line.startswith("#"), line
        m = SAMPLE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        assert name == current, f"{name} outside its family"
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        assert labels not in fams[name]["samples"], f"duplicate series {line}"
        v = float(m.group(3).replace("Inf", "inf"))
        if fams[name]["type"] == "counter":
            assert name.endswith("_total") and v >= 0
        fams[name]["samples"][labels] = v
    assert all(f["type"] for f in fams.values())
    return fams


def test_the_parser_refuses_what_the_format_does_not_allow():
    good = "# HELP a_b x\n# TYPE a_b gauge\na_b{x=\"1\"} 2\n"
    assert parse(good)["a_b"]["samples"] == {frozenset({("x", "1")}): 2.0}
    for bad in (good + "a_b{x=\"1\"} 3\n", good.replace(" 2\n", " two\n"), good + "c 1\n",
                good.replace("{x=\"1\"}", "{1x=\"1\"}"), good + "\n", good[:-1]):
        with pytest.raises(AssertionError):
            parse(bad)


@pytest.fixture
def run():
    def go(state_dir, *args):
        e = {"XENPAGE_STATE_DIR": str(state_dir), "XENPAGE_BACKEND": "sim"}
        return CliRunner().invoke(cli, [str(a) for a in args], env=e, catch_exceptions=False)
    return go


def test_service_writes_parsable_metrics_that_match_the_list(cli_state, run, tmp_path):
    prom = tmp_path / "textfile" / "xenpage.prom"
    r = run(cli_state, "retired", "--no-follow", "--metrics-file", prom)
    assert r.exit_code == 2 and not prom.exists()          # its directory must exist
    prom.parent.mkdir()
    r = run(cli_state, "retired", "--no-follow", "--metrics-file", prom)
    assert r.exit_code == 0, r.stderr
    f = parse(prom.read_text())
    assert f["xenpage_frames"]["samples"][frozenset({("state", "retired")})] == 0
    run(cli_state, "mce-inject", "3f100", "40b88", "4e8", "--repeat", "2")
    run(cli_state, "mce-inject", "3f089", "--uc")
    r = run(cli_state, "retired", "--no-follow", "--metrics-file", prom)
    assert r.exit_code == 0, r.stderr
    assert stat.S_IMODE(os.stat(prom).st_mode) == 0o644
    assert not any(p.name.endswith(".tmp") for p in prom.parent.iterdir())
    f = parse(prom.read_text())
    st = json.loads(run(cli_state, "badpages", "--json").stdout)
    for state, n in st["counts"].items():
        assert f["xenpage_frames"]["samples"][frozenset({("state", state)})] == n
    assert st["counts"]["retired"] >= 1 and st["counts"]["pending"] >= 1
    assert f["xenpage_memory_retired_bytes"]["samples"][frozenset()] == 4096 * st["counts"]["retired"]
    errs = f["xenpage_frame_errors"]["samples"]
    assert errs[frozenset({("type", "corrected")})] == sum(x["errors"] for x in st["frames"])
    assert errs[frozenset({("type", "uncorrected")})] == sum(x["uncorrected"] for x in st["frames"]) >= 1
    per_dimm = f["xenpage_dimm_frames"]["samples"]
    assert sum(per_dimm.values()) == len(st["frames"])
    assert f["xenpage_service_records_total"]["type"] == "counter"
    assert f["xenpage_service_records_total"]["samples"][frozenset()] >= 7
    assert f["xenpage_retirement_enabled"]["samples"][frozenset()] == 1
