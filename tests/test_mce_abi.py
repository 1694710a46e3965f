"""``struct mce`` and the ``/dev/mcelog`` ioctls of :mod:`xenpage.abi.mce` against the
kernel's uapi header (``asm/mce.h``, Debian's linux-libc-dev): a small C program prints
``sizeof``/``offsetof`` of every member and the ioctl numbers; the test compares them.

Needs the header and a C compiler (``make test`` installs linux-libc-dev as root); skipped
without them -- except under ``CI=true``, where it fails and says what to install.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from xenpage.abi import mce as M

HEADER = "asm/mce.h"
INSTALL = "apt-get install -y --no-install-recommends linux-libc-dev gcc libc6-dev"


def _cc_or_skip() -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    found = cc and subprocess.run([cc, "-E", "-x", "c", "-"], input=f"#include <{HEADER}>\n",
                                  capture_output=True, text=True).returncode == 0
    if found:
        return cc
    msg = f"the struct mce check needs <{HEADER}> and a C compiler; install them with: {INSTALL}"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict:
    cc = _cc_or_skip()
    d: Path = tmp_path_factory.mktemp("mceabi")
    lines = ["#include <stdio.h>", "#include <stddef.h>", f"#include <{HEADER}>", "int main(void) {",
             '  printf("S %zu\\n", sizeof(struct mce));']
    for name, _, _ in M.STRUCT_MCE:
        lines.append(f'  printf("M {name} %zu %zu\\n", offsetof(struct mce, {name}), '
                     f'sizeof(((struct mce *)0)->{name}));')
    for k in ("MCE_GET_RECORD_LEN", "MCE_GET_LOG_LEN", "MCE_GETCLEAR_FLAGS"):
        lines.append(f'  printf("C {k} %lu\\n", (unsigned long)({k}));')
    lines += ["  return 0;", "}"]
    (d / "mce.c").write_text("\n".join(lines) + "\n")
    subprocess.run([cc, "-Wall", "-Werror", "-o", str(d / "mce"), str(d / "mce.c")], check=True,
                   capture_output=True, text=True)
    out = subprocess.run([str(d / "mce")], check=True, capture_output=True, text=True).stdout
    res: dict = {"members": {}, "consts": {}}
    for line in out.splitlines():
        kind, *rest = line.split()
        if kind == "S":
            res["size"] = int(rest[0])
        elif kind == "M":
            res["members"][rest[0]] = (int(rest[2]), int(rest[1]))
        else:
            res["consts"][rest[0]] = int(rest[1])
    return res


def test_struct_mce_layout_matches_the_header(c_layout):
    assert c_layout["size"] == M.SIZEOF_STRUCT_MCE
    for name, size, off in M.STRUCT_MCE:
        assert c_layout["members"][name] == (size, off), name


def test_mcelog_ioctls_match_the_header(c_layout):
    for k in ("MCE_GET_RECORD_LEN", "MCE_GET_LOG_LEN", "MCE_GETCLEAR_FLAGS"):
        assert c_layout["consts"][k] == getattr(M, k), k


def test_xen_record_is_the_uapi_prefix_up_to_ppin():
    """xen-mcelog's ``struct xen_mce`` ends with ``ppin``: its 112 bytes are the uapi
    structure's first 112 (the lab's dom0 answered MCE_GET_RECORD_LEN = 112)."""
    ppin = {n: (s, o) for n, s, o in M.STRUCT_MCE}["ppin"]
    assert ppin[1] + ppin[0] == M.XEN_MCE_RECORD_LEN
    dt = M.numpy_dtype(M.XEN_MCE_RECORD_LEN)
    assert dt.itemsize == 112 and "ppin" in dt.names and "microcode" not in dt.names
    assert M.numpy_dtype(M.SIZEOF_STRUCT_MCE).names[-1] == "kflags"
