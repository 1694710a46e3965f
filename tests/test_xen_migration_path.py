"""The real-Xen backend's migration runs ``xl`` by absolute path, also where the caller's PATH
lacks the sbin directories (the receiving end, started by ``sh -c`` in the same environment,
otherwise exits 127: "command not found")."""

from __future__ import annotations

import os

from xenpage.backends.xen import migration as M


def _fake_xl(d):
    p = d / "xl"
    p.write_text("#!/bin/sh\nexit 0\n")
    p.chmod(0o755)
    return str(p)


def test_xl_found_on_path(tmp_path, monkeypatch):
    want = _fake_xl(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert M.xl_path() == want


def test_xl_found_in_sbin_without_path(tmp_path, monkeypatch):
    want = _fake_xl(tmp_path)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(M, "SBIN", str(tmp_path))
    assert M.xl_path() == want and os.path.isabs(M.xl_path())
