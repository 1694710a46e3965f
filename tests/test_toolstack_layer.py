"""The toolstack never imports the simulator, a backend, the CLI or the service: it talks
only to the ``Hypervisor`` protocol -- so on real Xen no simulator code (the migration model
included) can run against the host."""

from __future__ import annotations

import ast
from pathlib import Path

import xenpage.toolstack as ts

FORBIDDEN = ("backends", "hypervisor", "guests", "cli", "ras", "testing")


def test_toolstack_imports_only_abi_and_itself():
    bad = []
    for f in sorted(Path(ts.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level >= 2 and mod.split(".")[0] in FORBIDDEN:
                    bad.append(f"{f.name}: from {'.' * node.level}{mod}")
                if node.level == 0 and mod.startswith("xenpage.") and mod.split(".")[1] in FORBIDDEN:
                    bad.append(f"{f.name}: from {mod}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("xenpage.") and a.name.split(".")[1] in FORBIDDEN:
                        bad.append(f"{f.name}: import {a.name}")
    assert bad == []


def test_the_migration_model_lives_with_the_simulator():
    assert not (Path(ts.__file__).parent / "migrate.py").exists()
    assert not (Path(ts.__file__).parent / "migrate_pv.py").exists()
