#!/usr/bin/env python3
"""The lab's dom0 -> host protocol: marker lines on the serial console (runs inside dom0).

Everything the host learns comes through the serial log as lines starting with "XENPAGE-LAB":

    XENPAGE-LAB STEP <name> BEGIN
    XENPAGE-LAB STEP <name> OK [detail]
    XENPAGE-LAB STEP <name> FAIL <reason>
    XENPAGE-LAB NOTE <text>
    XENPAGE-LAB FILE <name> BEGIN size=<n> sha256=<hex> chunks=<k>
    XENPAGE-LAB B64 <name> <seq> <crc32 of data, hex> <base64 data>     (k of them)
    XENPAGE-LAB FILE <name> END

Lines are short (Xen and the kernel may interleave their own output between console writes);
each base64 line carries its own CRC so a damaged line is detected, not decoded. A file named
"<base>@<n>" is part n of <base>: the host concatenates the parts in order (used to stream
results line by line, so a hung hypervisor loses nothing already measured).

Python API (import labproto):   step_begin/step_ok/step_fail, Step (context manager),
                                note, export_file, export_bytes, Stream
Shell API:  python3 labproto.py begin NAME | ok NAME [DETAIL] | fail NAME REASON |
            note TEXT | export PATH [NAME] | export-dir DIR
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys
import time
import zlib

MARK = "XENPAGE-LAB"
CHUNK = 96            # base64 characters per line
PACE_BYTES = 4096     # after this many bytes of console output ...
PACE_SLEEP = 0.02     # ... pause, so Xen's serial transmit buffer never overflows

_fd = None
_sent = 0


def _console() -> int:
    global _fd
    if _fd is None:
        _fd = os.open(os.environ.get("LAB_CONSOLE", "/dev/console"), os.O_WRONLY | os.O_NOCTTY)
    return _fd


def emit(line: str) -> None:
    """Write one marker line to the console in a single write."""
    global _sent
    data = (line.replace("\n", " ").replace("\r", " ") + "\n").encode("utf-8", "replace")
    fd = _console()
    while data:
        n = os.write(fd, data)
        data = data[n:]
        _sent += n
    if _sent >= PACE_BYTES:
        _sent = 0
        time.sleep(PACE_SLEEP)


def _clean(name: str) -> str:
    return "".join(c if c.isalnum() or c in "._-:/@" else "_" for c in name)


def step_begin(name: str) -> None:
    emit(f"{MARK} STEP {_clean(name)} BEGIN")


def step_ok(name: str, detail: str = "") -> None:
    emit(f"{MARK} STEP {_clean(name)} OK {detail}".rstrip())


def step_fail(name: str, reason: str) -> None:
    emit(f"{MARK} STEP {_clean(name)} FAIL {reason or 'failed'}"[:400])


def note(text: str) -> None:
    emit(f"{MARK} NOTE {text}"[:400])


class Step:
    """with Step("name") as s: ...   -> OK, or FAIL with the exception / s.fail(reason)."""

    failed: list[str] = []

    def __init__(self, name: str):
        self.name = name
        self.reason = None
        self.detail = ""

    def fail(self, reason: str) -> None:
        self.reason = self.reason or reason

    def __enter__(self):
        step_begin(self.name)
        self.t0 = time.time()
        return self

    def __exit__(self, et, ev, tb):
        if ev is not None and self.reason is None:
            self.reason = f"{et.__name__}: {ev}"
        if self.reason:
            Step.failed.append(self.name)
            step_fail(self.name, self.reason)
        else:
            step_ok(self.name, (self.detail + f" ({time.time() - self.t0:.1f} s)").strip())
        return ev is not None and not isinstance(ev, (KeyboardInterrupt, SystemExit))


def export_bytes(name: str, data: bytes) -> None:
    name = _clean(name).replace("/", "_").replace(":", "_")
    b64 = base64.b64encode(data).decode()
    chunks = [b64[i:i + CHUNK] for i in range(0, len(b64), CHUNK)]      # none for an empty file
    emit(f"{MARK} FILE {name} BEGIN size={len(data)} sha256={hashlib.sha256(data).hexdigest()} "
         f"chunks={len(chunks)}")
    for i, c in enumerate(chunks):
        emit(f"{MARK} B64 {name} {i} {zlib.crc32(c.encode()) & 0xffffffff:08x} {c}")
    emit(f"{MARK} FILE {name} END")


def export_file(path: str, name: str | None = None) -> None:
    with open(path, "rb") as f:
        export_bytes(name or os.path.basename(path), f.read())


class Stream:
    """An append-only JSON-lines result file, sent to the host record by record
    (as parts <name>@<n>) and also kept in $LAB_OUT/<name>."""

    def __init__(self, name: str):
        self.name = name
        self.n = 0
        out = os.environ.get("LAB_OUT", "/tmp/lab-out")
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, name)
        open(self.path, "w").close()

    def add(self, record: dict) -> None:
        line = (json.dumps(record, sort_keys=False) + "\n").encode()
        with open(self.path, "ab") as f:
            f.write(line)
        export_bytes(f"{self.name}@{self.n}", line)
        self.n += 1


def _main(argv) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "begin":
        step_begin(rest[0])
    elif cmd == "ok":
        step_ok(rest[0], " ".join(rest[1:]))
    elif cmd == "fail":
        step_fail(rest[0], " ".join(rest[1:]))
    elif cmd == "note":
        note(" ".join(rest))
    elif cmd == "export":
        export_file(rest[0], rest[1] if len(rest) > 1 else None)
    elif cmd == "export-dir":
        for fn in sorted(os.listdir(rest[0])):
            p = os.path.join(rest[0], fn)
            if os.path.isfile(p):
                export_file(p)
    else:
        print(f"labproto: unknown command {cmd!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
