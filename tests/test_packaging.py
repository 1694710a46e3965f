"""xenpage as an installed dom0 tool: --version, the man page, shell completion, the systemd
unit in contrib/, the optional [plot] extra, and a CLI start-up that loads only what the
command needs."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from importlib.metadata import version as dist_version
from pathlib import Path

import pytest
from click.testing import CliRunner

from xenpage.cli import manpage
from xenpage.cli.main import cli

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib" / "xenpage-retired.service"
BIN = Path(sys.executable).parent
CI = bool(os.environ.get("CI"))


def _xenpage() -> str:
    exe = BIN / "xenpage"
    if not exe.exists():  # pragma: no cover
        pytest.fail(f"{exe} missing: install the package (make venv)")
    return str(exe)


def _need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if CI:
            pytest.fail(f"{tool} is missing on a CI machine")
        pytest.skip(f"{tool} is not installed")
    return path


# -- --version ---------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_from_package_metadata(flag):
    r = CliRunner().invoke(cli, [flag])
    assert r.exit_code == 0, r.output
    assert r.output == f"xenpage {dist_version('xenpage')}\n"


def test_source_tree_version_matches_the_metadata():
    """``xenpage.__version__`` (what --version says when xenpage runs uninstalled from a
    source tree) and pyproject's version agree."""
    import tomllib

    import xenpage
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert xenpage.__version__ == proj["version"] == dist_version("xenpage")


def test_version_of_the_installed_script():
    r = subprocess.run([_xenpage(), "-V"], capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"xenpage {dist_version('xenpage')}\n", "")


# -- the man page --------------------------------------------------------------------------

def _all_command_paths() -> list[str]:
    """Every command and subcommand, read from click's tree independently of manpage.py."""
    import click
    out = []

    def walk(group, prefix):
        for name, cmd in group.commands.items():
            if cmd.hidden:
                continue
            out.append(" ".join(prefix + [name]))
            if isinstance(cmd, click.Group):
                walk(cmd, prefix + [name])
    walk(cli, [])
    return sorted(out)


def test_manpage_documents_every_command(tmp_path):
    page = manpage.render()
    paths = _all_command_paths()
    assert len(paths) >= 20 and "mem-offline" in paths and "host create" in paths
    assert sorted(manpage.commands()) == paths
    for p in paths:
        assert re.search(r'^\.SS "xenpage ' + re.escape(manpage.esc(p)) + r'[ "]', page, re.M), p
    assert f"xenpage {manpage.esc(dist_version('xenpage'))}" in page
    for opt in ("\\-\\-state\\-dir", "\\-\\-backend", "\\-\\-version", "\\-\\-hosts", "\\-\\-uc"):
        assert opt in page
    for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "COMMANDS", "FILES", "ENVIRONMENT",
                    "EXIT STATUS", "SEE ALSO"):
        assert f".SH {section}" in page


def test_manpage_parses_without_warnings_and_renders(tmp_path):
    f = tmp_path / "xenpage.1"
    assert manpage.main([str(f)]) == 0
    groff = _need("groff")
    r = subprocess.run([groff, "-t", "-man", "-Tutf8", "-ww", "-z", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (0, "")
    man = _need("man")
    r = subprocess.run([man, "-l", str(f)], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MANPAGER": "cat", "PAGER": "cat", "MANWIDTH": "100"})
    assert r.returncode == 0, r.stderr
    text = re.sub(".\b", "", r.stdout)
    assert text.startswith("XENPAGE(1)")
    for p in _all_command_paths():
        assert re.search(r"^\s+xenpage " + re.escape(p) + r"( |$)", text, re.M), p


def test_a_broken_page_is_caught_by_groff(tmp_path):
    """The groff check above can fail: an unknown request is reported with -ww."""
    groff = _need("groff")
    f = tmp_path / "bad.1"
    f.write_text(manpage.render() + ".XX not a request\n\\fQ\n")
    r = subprocess.run([groff, "-t", "-man", "-Tutf8", "-ww", "-z", str(f)],
                       capture_output=True, text=True, timeout=60)
    assert r.stderr != ""


# -- shell completion ----------------------------------------------------------------------

def test_bash_completion_script_is_produced_and_completes():
    exe = _xenpage()
    r = subprocess.run([exe], env={**os.environ, "_XENPAGE_COMPLETE": "bash_source"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "complete -o nosort -F _xenpage_completion xenpage" in r.stdout
    bash = _need("bash")
    # source the script in a real bash and ask it what `xenpage mem-<TAB>` and
    # `xenpage host <TAB>` complete to
    script = (f'eval "$(_XENPAGE_COMPLETE=bash_source {exe})"\n'
              f'COMP_WORDS=(xenpage mem-); COMP_CWORD=1; _xenpage_completion {exe}\n'
              'echo "A:${COMPREPLY[*]}"; COMPREPLY=()\n'
              f'COMP_WORDS=(xenpage host ""); COMP_CWORD=2; _xenpage_completion {exe}\n'
              'echo "B:${COMPREPLY[*]}"\n')
    r = subprocess.run([bash, "--norc", "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "A:mem-offline mem-online mem-status" in r.stdout
    assert "B:create reboot show" in r.stdout


# -- the systemd unit ----------------------------------------------------------------------

def _unit_with(tmp_path: Path, exe: str, text: str | None = None) -> Path:
    """A copy of the shipped unit whose ExecStart names ``exe`` (verify needs it to exist),
    and the man page its Documentation= names."""
    d = tmp_path / "unit"
    (d / "man" / "man1").mkdir(parents=True)
    manpage.main([str(d / "man" / "man1" / "xenpage.1")])
    text = text if text is not None else UNIT.read_text()
    assert "ExecStart=/usr/local/bin/xenpage " in text
    u = d / "xenpage-retired.service"
    u.write_text(text.replace("ExecStart=/usr/local/bin/xenpage ", f"ExecStart={exe} "))
    return u


def _verify(unit: Path) -> subprocess.CompletedProcess:
    sa = _need("systemd-analyze")
    return subprocess.run([sa, "verify", str(unit)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MANPATH": str(unit.parent / "man"),
                               "SYSTEMD_LOG_COLOR": "0"})


def test_unit_passes_systemd_analyze_verify(tmp_path):
    r = _verify(_unit_with(tmp_path, _xenpage()))
    assert (r.returncode, r.stderr.strip(), r.stdout.strip()) == (0, "", "")


def test_unit_says_what_the_service_needs():
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            keys.setdefault(k.strip(), []).append(v.strip())
    assert keys["Type"] == ["notify"]
    assert keys["StateDirectory"] == ["xenpage"] and keys["ConfigurationDirectory"] == ["xenpage"]
    cmd = keys["ExecStart"][0].split()
    assert cmd[:5] == ["/usr/local/bin/xenpage", "--backend", "xen", "--state-dir", "/var/lib/xenpage"]
    assert cmd[5:] == ["retired", "--from", "/dev/mcelog"]
    # what would cut the service off /dev/xen, /dev/mcelog, /proc/xen or /run/xenpage.lock
    for k in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock", "ProtectProc",
              "ProcSubset", "InaccessiblePaths"):
        assert k not in keys, k
    assert keys["ProtectSystem"] == ["full"]
    # the service really takes these options, in this order
    r = CliRunner().invoke(cli, cmd[1:5] + ["retired", "--help"])
    assert r.exit_code == 0 and "--from" in r.output


def test_verify_catches_a_broken_unit(tmp_path):
    """systemd-analyze really checks: a missing ExecStart binary and a bad Type= fail."""
    r = _verify(_unit_with(tmp_path, str(tmp_path / "no-such-xenpage")))
    assert r.returncode != 0 and "no-such-xenpage" in r.stderr
    bad = UNIT.read_text().replace("Type=notify", "Type=notifyy")
    r = _verify(_unit_with(tmp_path / "b", _xenpage(), bad))
    assert "notifyy" in r.stderr


# -- the [plot] extra ----------------------------------------------------------------------

def test_year_plot_without_matplotlib_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` -> ImportError
    r = CliRunner().invoke(cli, ["year", "--hosts", "1", "--days", "1", "--plot",
                                 str(tmp_path / "y.png")])
    assert r.exit_code == 2
    assert "matplotlib" in r.output and "xenpage[plot]" in r.output
    assert not (tmp_path / "y.png").exists()


def test_matplotlib_is_not_a_core_dependency():
    from importlib.metadata import requires
    core = [r for r in requires("xenpage") if "extra ==" not in r]
    assert not any(r.lower().startswith("matplotlib") for r in core), core
    assert any(r.lower().startswith("matplotlib") and 'extra == "plot"' in r
               for r in requires("xenpage"))


# -- start-up: mem-status loads only what it uses -------------------------------------------

_PROBE = """
import json, sys
from xenpage.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    code = e.code
print(json.dumps({"exit": code, "modules": sorted(sys.modules)}), file=sys.__stderr__)
"""

HEAVY = ("numpy", "rich", "matplotlib", "dask", "distributed", "pyarrow", "xenpage.hypervisor", "xenpage.guests",
         "xenpage.backends.sim", "xenpage.ras")


def _modules_after(args: list[str], tmp_path: Path) -> tuple[int, set[str]]:
    env = {**os.environ, "XENPAGE_LOCK": str(tmp_path / "xenpage.lock"),
           "XENPAGE_STATE_DIR": str(tmp_path / "state")}
    r = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True,
                       timeout=120, env=env)
    last = r.stderr.strip().splitlines()[-1]
    d = json.loads(last)
    return d["exit"], set(d["modules"])


def _heavy(mods: set[str], names=HEAVY) -> list[str]:
    return sorted(m for m in mods if any(m == h or m.startswith(h + ".") for h in names))


def test_cli_start_up_imports_no_numpy_rich_or_simulator(tmp_path):
    """Loading the CLI and resolving an hptool command (bad usage: hptool's help, exit 1)
    imports none of numpy, rich, matplotlib, the simulator or the service."""
    code, mods = _modules_after(["mem-status"], tmp_path)
    assert code == 1
    assert _heavy(mods) == []
    code, mods = _modules_after(["-V"], tmp_path)
    assert code == 0 and _heavy(mods) == []


def test_mem_status_on_real_xen_path_loads_no_numpy_or_simulator(tmp_path):
    """``--backend xen mem-status``: the real backend (ctypes) and nothing of numpy, the
    simulator, rich or matplotlib.  Off Xen it stops where the libraries or privcmd are
    missing (exit 2); in the lab's dom0 ``tests_xen/test_dom0_package.py`` runs the query to
    its end and checks the same."""
    if Path("/proc/xen/privcmd").exists() or Path("/dev/xen/privcmd").exists():
        pytest.skip("a real Xen control domain: the command would act")
    code, mods = _modules_after(["--backend", "xen", "mem-status", "0"], tmp_path)
    assert code == 2
    assert "xenpage.backends.xen" in mods and "ctypes" in mods
    assert _heavy(mods) == []


def test_the_start_up_check_can_fail(tmp_path):
    """The same probe on a simulator command sees the simulator and numpy come in."""
    code, mods = _modules_after(["--backend", "sim", "mem-status", "0"], tmp_path)
    assert code == 0
    assert "numpy" in mods and "xenpage.backends.sim" in mods and "xenpage.hypervisor.host" in mods


@pytest.mark.parametrize("module", ["xenpage", "xenpage.cli.main"])
def test_python_dash_m_has_every_command(module, tmp_path):
    """``python -m xenpage`` (and ``-m xenpage.cli.main``, which dom0 scripts fall back to)
    runs the same command tree as the ``xenpage`` script: the service's and the simulator's
    commands included, not only the ones defined in main.py."""
    env = {**os.environ, "XENPAGE_STATE_DIR": str(tmp_path / "state"),
           "XENPAGE_LOCK": str(tmp_path / "xenpage.lock")}
    for cmd in ("badpages", "retired", "recover", "year"):
        r = subprocess.run([sys.executable, "-m", module, cmd, "--help"], capture_output=True,
                           text=True, timeout=120, env=env)
        assert r.returncode == 0, (cmd, r.stderr)
        assert "Usage:" in r.stdout and cmd in r.stdout
