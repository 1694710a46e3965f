"""The real-Xen backend's ABI against libxen-dev's C headers (Xen 4.17).

A small C program is generated from ``xenpage.backends.xen.structs`` (every structure, every
member, nested members flattened), ``xenpage.backends.xen.libs.PROTOTYPES`` (every function
the backend calls) and ``xenpage.abi`` (every constant), compiled against the installed
headers and run.  It prints ``sizeof``/``offsetof`` and the constants' values; the test
compares them with the Python side, and the function prototypes are checked at compile time
(``__builtin_types_compatible_p``), so any mismatch fails loudly.

Needs ``libxen-dev`` (headers) and a C compiler (``gcc``, ``libc6-dev``).  When they are
missing the test is skipped -- except under ``CI=true``, where it fails and says what to
install.  No Xen is needed: only headers.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from xenpage.abi import domctl, errno as errno_mod, grant, hvm, memory, sysctl, xen
from xenpage.backends.xen import libs, structs

INCLUDE = Path("/usr/include")
HEADERS = ["xenctrl.h", "xenguest.h", "xencall.h", "xenforeignmemory.h", "xenstore.h", "xentoollog.h",
           "xen/grant_table.h", "xen/memory.h", "xen/sched.h", "xen/features.h", "xen/errno.h",
           "xen/version.h"]
INSTALL = "apt-get install -y --no-install-recommends libxen-dev gcc libc6-dev"

#: Constants of xenpage.abi that are xenpage's own (no C macro of that name exists).
PROJECT_ONLY = {
    "STATUS_UNTOUCHED", "MFN_FIELD_MAX", "SHARED_M2P_ENTRY", "INVALID_M2P_ENTRY",
    "M2P_SHIFT", "M2P_CHUNK_SIZE", "M2P_ENTRIES_PER_CHUNK", "GRANT_V1_ENTRY_SIZE",
    "GRANT_V1_PER_FRAME", "GETPAGEFRAMEINFO3_MAX", "MMU_CMD_MASK",
    "XEN_COMMANDLINE_LEN",   # sizeof(xen_commandline_t): a typedef, checked below
}
#: xenpage name -> C name, where they differ.
C_NAME = {"PAGE_SHIFT": "XC_PAGE_SHIFT", "PAGE_SIZE": "XC_PAGE_SIZE"}
#: enum members (not macros: no #ifdef possible) checked directly.
ENUMS = {f"XTL_{n}": getattr(structs, f"XTL_{n}") for n in
         ("NONE", "DEBUG", "VERBOSE", "DETAIL", "PROGRESS", "INFO", "NOTICE", "WARN", "ERROR",
          "CRITICAL", "NUM_LEVELS")}
#: domctl/sysctl interface versions the struct layouts were written for (Xen 4.17).
INTERFACE_VERSIONS = {"XEN_DOMCTL_INTERFACE_VERSION": 0x15, "XEN_SYSCTL_INTERFACE_VERSION": 0x15}


def _abi_constants() -> dict[str, int]:
    out: dict[str, int] = {}
    for mod in (domctl, sysctl, xen, memory, grant):
        for k, v in vars(mod).items():
            if k.isupper() or (k[:1].isupper() and not k.startswith("_")):
                if isinstance(v, int) and not isinstance(v, bool) and not k.startswith("_"):
                    out[k] = v
    for k, v in vars(domctl).items():       # XEN_DOMCTL_PFINFO_* etc. have lower-case parts
        if k.startswith(("XEN_", "_XEN")) and isinstance(v, int):
            out[k] = v
    for k in ("sysctl_page_offline", "sysctl_page_online", "sysctl_query_page_offline"):
        out[k] = getattr(sysctl, k)
    out["XBT_NULL"] = structs.XBT_NULL
    for k, v in vars(hvm).items():          # log-dirty control (public/domctl.h)
        if k.startswith("XEN_DOMCTL_SHADOW_") and isinstance(v, int):
            out[k] = v
    return out


def _c_name(k: str) -> str:
    if k.startswith("HYPERVISOR_"):
        return "__" + k
    return C_NAME.get(k, k)


def _toolchain_or_skip() -> str:
    cc = shutil.which("gcc") or shutil.which("cc")
    missing = [h for h in HEADERS if not (INCLUDE / h).exists()]
    if cc and not missing:
        return cc
    why = ("no C compiler" if not cc else "") + (("; " if not cc else "") + "missing headers: "
                                                  + ", ".join(missing) if missing else "")
    msg = (f"the Xen ABI check needs libxen-dev's headers and a C compiler ({why}); "
           f"install them with: {INSTALL}")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg)
    pytest.skip(msg)


def _c_program() -> str:
    lines = ["#define _GNU_SOURCE", "#include <stddef.h>", "#include <stdint.h>", "#include <errno.h>"]
    lines += [f"#include <{h}>" for h in libs.C_HEADERS]
    lines += [f"#include <{h}>" for h in HEADERS if h.startswith("xen/")]
    # libxenctrl exports it, but only its private xc_private.h declares it
    lines.append("int xc_get_pfn_type_batch(xc_interface *xch, uint32_t dom, unsigned int num, xen_pfn_t *arr);")
    for p in libs.PROTOTYPES:
        if p.c_type is None:
            continue
        lines.append(f'_Static_assert(__builtin_types_compatible_p(__typeof__(&{p.name}), {p.c_type}), '
                     f'"prototype of {p.name} differs from the header: want {p.c_type}");')
    lines.append("int main(void) {")
    for cls in structs.ABI_STRUCTS:
        c = cls._c_name_
        lines.append(f'  printf("S {cls.__name__} %zu %zu\\n", sizeof({c}), _Alignof({c}));')
        for desig, _, _ in structs.layout(cls):
            lines.append(f'  printf("M {cls.__name__} {desig} %zu %zu\\n", offsetof({c}, {desig}), '
                         f'sizeof((({c} *)0)->{desig}));')
    for k in sorted(_abi_constants()):
        c = _c_name(k)
        lines += [f"#ifdef {c}", f'  printf("C {k} %lld\\n", (long long)({c}));', "#else",
                  f'  printf("C {k} undefined\\n");', "#endif"]
    for k in ENUMS:
        lines.append(f'  printf("C {k} %lld\\n", (long long)({k}));')
    for k in INTERFACE_VERSIONS:
        lines.append(f'  printf("C {k} %lld\\n", (long long)({k}));')
    lines.append('  printf("Z vcpu_guest_context_any_t %zu\\n", sizeof(vcpu_guest_context_any_t));')
    lines.append('  printf("Z xen_commandline_t %zu\\n", sizeof(xen_commandline_t));')
    for k in vars(errno_mod):
        if k.isupper() and isinstance(getattr(errno_mod, k), int):
            lines += [f"#ifdef {k}", f'  printf("E {k} %d\\n", {k});', "#else",
                      f'  printf("E {k} undefined\\n");', "#endif"]
    for p in libs.PROTOTYPES:
        for i, t in enumerate(p.c_args):
            lines.append(f'  printf("A {p.name} {i} %zu\\n", sizeof({t}));')
        if p.c_ret != "void":
            lines.append(f'  printf("R {p.name} %zu\\n", sizeof({p.c_ret}));')
    lines += ["  return 0;", "}"]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def c_side(tmp_path_factory):
    cc = _toolchain_or_skip()
    d = tmp_path_factory.mktemp("xen-abi")
    src, exe = d / "abi.c", d / "abi"
    src.write_text(_c_program())
    p = subprocess.run([cc, "-std=gnu11", "-Wall", "-Werror", "-o", str(exe), str(src)],
                       capture_output=True, text=True)
    assert p.returncode == 0, f"the ABI program does not compile against libxen-dev's headers:\n{p.stderr[-4000:]}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout
    res: dict = {"S": {}, "M": {}, "C": {}, "E": {}, "A": {}, "R": {}, "Z": {}}
    for line in out.splitlines():
        kind, rest = line.split(" ", 1)
        if kind == "S":
            name, size, align = rest.split()
            res["S"][name] = (int(size), int(align))
        elif kind == "M":
            name, desig, off, size = rest.split()
            res["M"][(name, desig)] = (int(off), int(size))
        elif kind in ("C", "E"):
            name, val = rest.split()
            res[kind][name] = None if val == "undefined" else int(val)
        elif kind == "A":
            fn, i, size = rest.split()
            res["A"][(fn, int(i))] = int(size)
        elif kind == "R":
            fn, size = rest.split()
            res["R"][fn] = int(size)
        elif kind == "Z":
            name, size = rest.split()
            res["Z"][name] = int(size)
    return res


@pytest.mark.parametrize("cls", structs.ABI_STRUCTS, ids=lambda c: c.__name__)
def test_struct_layout_matches_headers(c_side, cls):
    size, align = c_side["S"][cls.__name__]
    assert ctypes.sizeof(cls) == size, f"sizeof({cls._c_name_}): C {size}, structs.py {ctypes.sizeof(cls)}"
    assert ctypes.alignment(cls) == align, f"alignment of {cls._c_name_}"
    for desig, off, sz in structs.layout(cls):
        c_off, c_sz = c_side["M"][(cls.__name__, desig)]
        assert (off, sz) == (c_off, c_sz), \
            f"{cls._c_name_}.{desig}: C offset {c_off} size {c_sz}, structs.py offset {off} size {sz}"


def test_vcpu_context_buffer_holds_the_union(c_side):
    """The buffer handed to ``xc_vcpu_getcontext`` is as large as ``vcpu_guest_context_any_t``,
    whose x86_64 member is the one read."""
    assert structs.VCPU_CONTEXT_ANY_SIZE == c_side["Z"]["vcpu_guest_context_any_t"]
    assert ctypes.sizeof(structs.VcpuGuestContextX8664) <= structs.VCPU_CONTEXT_ANY_SIZE


def test_commandline_buffer_is_xen_commandline_t(c_side):
    """``XENVER_commandline`` writes a ``xen_commandline_t`` (version.h)."""
    assert xen.XEN_COMMANDLINE_LEN == c_side["Z"]["xen_commandline_t"]


def test_every_abi_constant_matches_headers(c_side):
    bad, undefined = [], []
    for k, v in sorted(_abi_constants().items()):
        c = c_side["C"][k]
        if c is None:
            if k not in PROJECT_ONLY:
                undefined.append(k)
            continue
        if k in PROJECT_ONLY:
            bad.append(f"{k} is in PROJECT_ONLY but the headers define it ({c:#x})")
        elif (v & 0xFFFFFFFFFFFFFFFF) != (c & 0xFFFFFFFFFFFFFFFF):
            bad.append(f"{k}: headers {c:#x}, xenpage.abi {v:#x}")
    assert not bad, "\n".join(bad)
    assert not undefined, (f"constants in xenpage.abi with no C macro of that name: {undefined} "
                           "(a typo, or add them to PROJECT_ONLY if they are xenpage's own)")


def test_enums_and_interface_versions(c_side):
    for k, v in ENUMS.items():
        assert c_side["C"][k] == v, k
    for k, v in INTERFACE_VERSIONS.items():
        assert c_side["C"][k] == v, f"{k} is {c_side['C'][k]:#x}: structs.py was written for {v:#x}"


def test_errno_values_match_linux_and_xen(c_side):
    xen_errno = {m.group(1): int(m.group(2)) for m in
                 re.finditer(r"XEN_ERRNO\((E\w+),\s*(\d+)\)", (INCLUDE / "xen/errno.h").read_text())}
    for k, v in vars(errno_mod).items():
        if not (k.isupper() and isinstance(v, int)):
            continue
        assert c_side["E"][k] == v, f"{k}: Linux {c_side['E'][k]}, xenpage.abi.errno {v}"
        if k in xen_errno:
            assert xen_errno[k] == v, f"{k}: xen/errno.h {xen_errno[k]}, xenpage.abi.errno {v}"


@pytest.mark.parametrize("proto", libs.PROTOTYPES, ids=lambda p: p.name)
def test_ctypes_widths_match_prototypes(c_side, proto):
    """The prototypes compiled (the _Static_asserts held); each ctypes type has the width of
    the C type it stands for."""
    assert len(proto.argtypes) == len(proto.c_args)
    for i, t in enumerate(proto.argtypes):
        assert ctypes.sizeof(t) == c_side["A"][(proto.name, i)], \
            f"{proto.name} argument {i}: C {proto.c_args[i]} is {c_side['A'][(proto.name, i)]} bytes"
    if proto.c_ret != "void":
        assert proto.restype is not None and ctypes.sizeof(proto.restype) == c_side["R"][proto.name], proto.name
    else:
        assert proto.restype is None


def test_runtime_libraries_export_every_symbol():
    """Where the runtime libraries are installed, each declared function is exported (the one
    without a public prototype included)."""
    try:
        lib = libs.Libs()
    except libs.XenLibraryError as e:
        if "cannot load" in str(e):
            pytest.skip(str(e))
        raise
    for p in libs.PROTOTYPES:
        assert callable(getattr(lib, p.name))
