"""Host-side tests of the lab harness (no QEMU needed):  python3 -m pytest lab/tests"""
from __future__ import annotations

import importlib
import io
import json
import os
import struct
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(LAB), str(LAB / "dom0")]
xenlab = importlib.import_module("xenlab")
labproto = importlib.import_module("labproto")


def read_cpio(data: bytes) -> dict:
    """Minimal newc reader: {name: (mode, rdevmajor, rdevminor, bytes)}."""
    out, off = {}, 0
    while True:
        assert data[off:off + 6] == b"070701", off
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, rmaj, rmin, nlen = f[1], f[6], f[9], f[10], f[11]
        name = data[off + 110: off + 110 + nlen - 1].decode()
        off = (off + 110 + nlen + 3) & ~3
        body = data[off: off + size]
        off = (off + size + 3) & ~3
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, rmaj, rmin, body)


def test_cpio_writer_roundtrip(tmp_path):
    (tmp_path / "t" / "sub").mkdir(parents=True)
    (tmp_path / "t" / "sub" / "a.py").write_text("print(1)\n")
    (tmp_path / "t" / "x.pyc").write_bytes(b"junk")
    buf = io.BytesIO()
    c = xenlab.Cpio(buf)
    c.add_tree("xenpage/src", tmp_path / "t")
    c.add_chardev("dev/console", 5, 1)
    c.add_bytes("xenpage/run.env", b"A='1'\n")
    c.close()
    data = buf.getvalue()
    assert len(data) % 512 == 0          # the next concatenated archive starts aligned
    ents = read_cpio(data)
    assert ents["xenpage/src/sub/a.py"][3] == b"print(1)\n"
    assert "xenpage/src/x.pyc" not in ents
    for d in ("xenpage", "xenpage/src", "xenpage/src/sub", "dev"):
        assert ents[d][0] & 0o170000 == 0o040000
    mode, maj, mnr, _ = ents["dev/console"]
    assert (mode & 0o170000, maj, mnr) == (0o020000, 5, 1)


def serial_lines(tmp_path, monkeypatch, fn) -> list[str]:
    con = tmp_path / "console"
    con.write_text("")
    monkeypatch.setenv("LAB_CONSOLE", str(con))
    monkeypatch.setenv("LAB_OUT", str(tmp_path / "out"))
    monkeypatch.setattr(labproto, "_fd", None)
    monkeypatch.setattr(labproto, "PACE_SLEEP", 0)
    fn()
    os.close(labproto._fd)
    return con.read_text().splitlines()


def test_protocol_roundtrip_with_noise(tmp_path, monkeypatch):
    payload = os.urandom(5000)

    def scenario():
        labproto.step_begin("alpha")
        labproto.step_ok("alpha", "fine")
        labproto.step_begin("beta")
        labproto.step_fail("beta", "expected 0 got 1")
        labproto.export_bytes("blob.bin", payload)
        s = labproto.Stream("rec.jsonl")
        s.add({"a": 1})
        s.add({"b": 2})
    lines = serial_lines(tmp_path, monkeypatch, scenario)
    # Xen / kernel output around and between the marker lines, CRs from the UART
    noisy = []
    for ln in lines:
        noisy += ["(XEN) something unrelated", "[   12.3] kernel says hi", ln + "\r"]
    p = xenlab.SerialParser()
    for i, ln in enumerate(noisy):
        p.feed(ln.rstrip("\r"), i * 0.1)
    assert [p.steps[n]["status"] for n in p.order] == ["OK", "FAIL"]
    assert p.steps["beta"]["reason"] == "expected 0 got 1"
    files = p.decode_files(tmp_path)
    assert files["blob.bin"]["ok"] and (tmp_path / "blob.bin").read_bytes() == payload
    assert files["rec.jsonl"]["ok"] and files["rec.jsonl"]["parts"] == 2
    recs = [json.loads(x) for x in (tmp_path / "rec.jsonl").read_text().splitlines()]
    assert recs == [{"a": 1}, {"b": 2}]


def test_damaged_line_is_detected_not_decoded(tmp_path, monkeypatch):
    lines = serial_lines(tmp_path, monkeypatch, lambda: labproto.export_bytes("f.bin", b"x" * 400))
    b64 = [i for i, ln in enumerate(lines) if " B64 " in ln]
    ln = lines[b64[1]]
    lines[b64[1]] = ln[:60] + "(XEN) interleaved" + ln[60:]      # split by hypervisor output
    p = xenlab.SerialParser()
    for ln in lines:
        p.feed(ln, 0)
    res = p.decode_files(tmp_path)
    assert not res["f.bin"]["ok"] and "missing/corrupt" in res["f.bin"]["error"]
    assert not (tmp_path / "f.bin").exists()


def test_fatal_console_line_and_milestones():
    p = xenlab.SerialParser()
    p.feed("(XEN) Xen version 4.17.7 (Debian)", 1.0)
    p.feed("[    4.2] Failed to execute /xenpage/lab/dom0/init (error -13)", 5.0)
    assert p.milestones["xen_banner"] == 1.0
    assert "Failed to execute" in p.fatal


def test_scenario_options_and_pt_load(tmp_path):
    s = tmp_path / "x.sh"
    s.write_text("#!/bin/sh\n# about\n# lab-options: vcpus=2 timeout=1800\n")
    assert xenlab.scenario_options(s) == {"vcpus": 2, "timeout": 1800.0}
    hdr = bytearray(4096)
    hdr[:5] = b"\x7fELF\x01"
    struct.pack_into("<I", hdr, 28, 52)
    struct.pack_into("<HH", hdr, 42, 32, 2)
    struct.pack_into("<8I", hdr, 52, 4, 0, 0, 0, 0, 0, 0, 0)              # PT_NOTE
    struct.pack_into("<8I", hdr, 84, 1, 0x80, 0x200000, 0x200000, 0x10, 0x3a7000, 7, 64)
    elf = tmp_path / "xen.elf"
    elf.write_bytes(bytes(hdr))
    assert xenlab.xen_pt_load(elf) == (0x200000, 0x3a7000)


def test_every_scenario_is_found_and_listed():
    names = {p.stem for p in (LAB / "scenarios").glob("*.*")}
    assert {"hptool", "pytest", "smoke"} <= names
    for n in names:
        assert xenlab.find_scenario(n).exists()
    with pytest.raises(xenlab.LabError, match="no scenario"):
        xenlab.find_scenario("nope")


def test_verbatim_file_is_complete():
    d = json.loads((LAB / "results" / "lab-verbatim.json").read_text())
    lay = d["layout"]
    assert lay["max_mfn"] == "0x7ffe0" and lay["xen_image_frames"] == ["0x7fa00", "0x7fda6"]
    ids = {c["id"] for c in d["commands"]}
    for case in ("free_page", "dom0_page", "vga_hole", "xen_image_first", "domu_page"):
        assert d["cases"][case]["offline"] in ids
    for c in d["commands"]:
        assert {"argv", "stdout", "stderr", "exit"} <= c.keys()
    assert all(ch["ok"] for ch in d["checks"])


def test_empty_file_roundtrip(tmp_path, monkeypatch):
    lines = serial_lines(tmp_path, monkeypatch, lambda: labproto.export_bytes("empty.xml", b""))
    p = xenlab.SerialParser()
    for ln in lines:
        p.feed(ln, 0)
    res = p.decode_files(tmp_path)
    assert res["empty.xml"]["ok"] and (tmp_path / "empty.xml").read_bytes() == b""


def test_payload_makes_the_project_look_installed():
    buf = io.BytesIO()
    c = xenlab.Cpio(buf)
    xenlab.add_entry_points(c)
    c.close()
    ents = read_cpio(buf.getvalue())
    script = ents["usr/local/bin/xenpage"]
    assert script[0] & 0o111 and b"from xenpage.cli.main import main" in script[3]
    assert any(n.endswith(".dist-info/entry_points.txt") for n in ents)
