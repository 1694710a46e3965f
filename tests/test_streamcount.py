"""The migration relay's stream reading (backends/xen/streamcount.py): a libxc stream laid
out as docs/specs/libxc-migration-stream.pandoc says, inside bytes of xl's and libxl's own,
cut into any chunks; and the relay process forwarding it whole to a receiver."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings, strategies as st

from xenpage.backends.xen import streamcount as SC

XTAB = 0xF << 60
BROKEN = 0xD << 60


def record(rtype: int, body: bytes) -> bytes:
    pad = (-len(body)) % 8
    return struct.pack("<II", rtype, len(body)) + body + b"\0" * pad


def page_data(pfns: list[int]) -> bytes:
    body = struct.pack("<II", len(pfns), 0) + struct.pack(f"<{len(pfns)}Q", *pfns)
    body += b"\xab" * 4096 * sum(1 for p in pfns if p >> 60 not in (0xF, 0xD, 0xE))
    return record(SC.REC_TYPE_PAGE_DATA, body)


def stream(rounds: list[list[list[int]]]) -> bytes:
    ihdr = SC.MARKER + struct.pack(">IHHI", 3, 0, 0, 0)
    dhdr = struct.pack("<IHHII", 2, 12, 0, 4, 17)
    out = b"Xen saved domain, xl format\n \0 \r" + b"LibxlFmt" + b"\0" * 8 + ihdr + dhdr
    out += record(0xF0000001, b"x" * 13)            # some other record, padded
    for batches in rounds:
        for b in batches:
            out += page_data(b)
        out += record(0x0000000A, b"y" * 5)
    out += record(SC.REC_TYPE_END, b"") + b"libxl records after the libxc stream"
    return out


ROUNDS = [[list(range(0, 32)), list(range(32, 64)), list(range(64, 100))],
          [[5, 17 | XTAB, 50]],
          [[3, 60 | BROKEN], [70]]]


def want() -> dict:
    return {"rounds": 3, "pages_sent": 100 + 2 + 2, "per_round": [100, 2, 2], "complete": True}


def test_rounds_and_pages_of_a_stream():
    c = SC.StreamCounter()
    data = stream(ROUNDS)
    c.feed(data, 1.0)
    s = c.stats()
    assert {k: s[k] for k in want()} == want()
    assert s["error"] is None and s["bytes"] == len(data)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 9000), min_size=1, max_size=80))
def test_any_chunking_reads_the_same(cuts):
    data = stream(ROUNDS)
    c = SC.StreamCounter()
    i = 0
    for k in cuts:
        c.feed(data[i:i + k], 0.0)
        i += k
    if i < len(data):
        c.feed(data[i:], 0.0)
    s = c.stats()
    assert {k: s[k] for k in want()} == want()


def test_the_relay_forwards_every_byte_and_returns_the_receivers_status(tmp_path):
    data = stream(ROUNDS) * 1
    src = tmp_path / "in"
    src.write_bytes(data)
    out, stats = tmp_path / "out", tmp_path / "stats.json"
    script = Path(SC.__file__)
    with open(src, "rb") as f:
        r = subprocess.run([sys.executable, str(script), str(stats), "sh", "-c", f"cat > {out}; exit 3"],
                           stdin=f, capture_output=True)
    assert r.returncode == 3
    assert out.read_bytes() == data
    s = json.loads(stats.read_text())
    assert {k: s[k] for k in want()} == want() and s["receiver_exit"] == 3


def test_a_stream_it_cannot_read_is_still_forwarded(tmp_path):
    bad = SC.MARKER + struct.pack(">IHHI", 3, 1, 0, 0) + b"\0" * 16 + b"rest" * 1000  # big-endian
    src = tmp_path / "in"
    src.write_bytes(bad)
    out, stats = tmp_path / "out", tmp_path / "stats.json"
    with open(src, "rb") as f:
        r = subprocess.run([sys.executable, SC.__file__, str(stats), "sh", "-c", f"cat > {out}"], stdin=f)
    assert r.returncode == 0 and out.read_bytes() == bad
    s = json.loads(stats.read_text())
    assert s["error"] == "a big-endian stream" and s["rounds"] is None
