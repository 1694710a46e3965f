"""Saving and loading the simulated host: a loaded host is the host that was saved (frame
table, heap lists in order, domains, xenstore, guests), state carries across processes of the
real ``xenpage`` command, and a saved host that is truncated, modified or incomplete is
refused with a clear error while nothing is changed."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenpage.backends.sim import host_path
from xenpage.hypervisor import invariants, persist, sysctl
from xenpage.hypervisor.host import Host
from xenpage.hypervisor.persist import HostFileError


def comparable(host: Host) -> dict:
    ft = host.ft
    return {
        "arrays": {f: getattr(ft, f).copy() for f in ft.FIELDS},
        "pages": {k: v.copy() for k, v in ft.pages.items()},
        "lists": host.heap.list_order(),
        "free_pages": host.heap.free_pages,
        "offlined": list(host.heap.offlined_list),
        "broken": list(host.heap.broken_list),
        "domains": {k: d.to_state() for k, d in host.domains.items()},
        "xenstore": host.xenstore.to_state(),
        "p2m": {k: v.copy() for k, v in host.p2m.items()},
        "e820": host.e820.to_state(),
        "quirks": host.quirks.to_state(),
        "layout": (host.xen_phys_start, tuple(host.xen_image), tuple(host.xen_init),
                   list(host.xenheap_internal), list(host.anonymous), host.next_domid,
                   host.nr_pcpus, host.max_page),
        "log": list(host.log),
        "extra": json.loads(json.dumps(host.extra_state())),
    }


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        x, y = a[k], b[k]
        if k in ("arrays", "pages", "p2m"):
            assert x.keys() == y.keys(), k
            for kk in x:
                assert np.array_equal(x[kk], y[kk]), (k, kk)
        else:
            assert x == y, k


def busy_host(host: Host) -> Host:
    """The default host after a bit of everything: offlined, pending, broken frames, a PoD
    cache, a crashed and a paused domain, a published xenstore node."""
    head, order = max(host.heap.chunks(), key=lambda c: c[1])
    f = head + (1 << order) // 2
    sysctl.page_offline_op(host, 0, 1, f, f + 9, pcpu=1)
    sysctl.machine_check_offline(host, f + 20)
    d0 = int(host.owned_frames(0)[100])
    sysctl.page_offline_op(host, 0, 1, d0, d0, pcpu=1)
    hvm = host.domains[2]
    hvm.max_pages += 3
    hvm.pod_cache.extend(host.alloc_domheap_pages(hvm, 0) for _ in range(3))
    sysctl.page_offline_op(host, 0, 1, hvm.pod_cache[1], hvm.pod_cache[1], pcpu=1)
    u = int(host.owned_frames(1)[50])
    sysctl.machine_check_offline(host, u)
    sysctl.page_offline_op(host, 0, 1, u, u, pcpu=1)  # AGAIN: d1 crashed
    host.pause(2)
    host.xenstore.write(0, "/local/domain/2/data/x", "y")
    return host


# -- in-process round trip ------------------------------------------------------------------------

def test_round_trip_is_exact(host, tmp_path):
    busy_host(host)
    before = comparable(host)
    host.save(tmp_path / "h")
    loaded = Host.load(tmp_path / "h")
    assert_same(before, comparable(loaded))
    # as sound as it was (its raw offlines met Xen 4.17's misaligned split: the same chunks)
    assert invariants.check(loaded) == invariants.check(host)
    assert loaded.heap.misaligned == host.heap.misaligned
    # and it behaves the same: the next allocations and offlines answer identically
    a = [host.heap.alloc(k) for k in (0, 3, 1, 9)]
    b = [loaded.heap.alloc(k) for k in (0, 3, 1, 9)]
    assert a == b
    for h in (host, loaded):
        h.destroy_domain(1)
    assert_same(comparable(host), comparable(loaded))


def test_round_trip_of_a_small_bare_host(small_host, tmp_path):
    h = small_host()
    before = comparable(h)
    h.save(tmp_path / "h")
    assert_same(before, comparable(Host.load(tmp_path / "h")))


def test_save_replaces_atomically_and_leaves_no_debris(host, tmp_path):
    p = tmp_path / "h"
    host.save(p)
    sysctl.page_offline_op(host, 0, 1, 0x20000, 0x20000, pcpu=1)
    host.save(p)
    # one link, renamed over by each save, naming the one generation left
    assert sorted(x.name for x in tmp_path.iterdir()) == ["h", "h.g2"]
    assert p.is_symlink() and os.readlink(p) == "h.g2"
    assert sorted(x.name for x in p.iterdir()) == ["frames.npz", "host.digest", "host.json"]
    assert Host.load(p).ft.state(0x20000) == 2


@pytest.mark.parametrize("dies_at", ["symlink", "replace", "remove"])
def test_a_save_killed_at_any_step_leaves_one_whole_host(host, tmp_path, monkeypatch, dies_at):
    """A save that dies before, at or after its one rename leaves the link naming a complete
    host (the old or the new one); tidy() removes the rest (issue 19, item 2)."""
    import shutil
    p = tmp_path / "h"
    host.save(p)
    before = host.ft.state(0x20000)
    sysctl.page_offline_op(host, 0, 1, 0x20000, 0x20000, pcpu=1)
    after = host.ft.state(0x20000)
    assert before != after

    class Killed(BaseException):
        pass

    def die(*a, **k):
        raise Killed
    target = {"symlink": (os, "symlink"), "replace": (os, "replace"),
              "remove": (persist, "_remove_tree")}[dies_at]
    monkeypatch.setattr(*target, die)
    with pytest.raises(Killed):
        host.save(p)
    monkeypatch.undo()
    assert persist.leftovers(p)                      # debris beside the link
    state = Host.load(p).ft.state(0x20000)
    assert state == (after if dies_at == "remove" else before)  # old before the rename, new after
    assert persist.tidy(p) is None and persist.leftovers(p) == []
    assert Host.load(p).ft.state(0x20000) == state
    shutil.rmtree(tmp_path / os.readlink(p))


def test_an_older_format_leftover_is_recovered_never_replaced(host, tmp_path):
    """What an older xenpage's two-rename save left when killed between its renames (only
    ``host.tmp<pid>``) is made the saved host again, with a sentence saying so; damaged
    leftovers alone are refused, and nothing is created in their place."""
    p = tmp_path / "host"
    sysctl.page_offline_op(host, 0, 1, 0x20000, 0x20000, pcpu=1)
    host.save(p)
    (tmp_path / os.readlink(p)).rename(tmp_path / "host.tmp4242")
    p.unlink()
    said = persist.tidy(p)
    assert said and "host.tmp4242" in said
    assert Host.load(p).ft.state(0x20000) == host.ft.state(0x20000) and persist.leftovers(p) == []
    # only a damaged leftover: refused, left alone
    (tmp_path / os.readlink(p)).rename(tmp_path / "host.tmp77")
    p.unlink()
    (tmp_path / "host.tmp77" / "frames.npz").write_bytes(b"truncated")
    with pytest.raises(persist.HostFileError, match="not a complete host"):
        persist.tidy(p)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["host.tmp77"]


def test_encodings_round_trip():
    rng = np.random.default_rng(5)
    n = 4096
    cases = {
        "zeros": np.zeros(n, dtype=np.uint64),
        "sparse": np.where(rng.random(n) < 0.01, rng.integers(1, 2**63, n), 0).astype(np.uint64),
        "runs": np.repeat(rng.integers(0, 4, 16), n // 16).astype(np.uint64),
        "dense": rng.integers(0, 2**63, n).astype(np.uint64),
        "small": np.repeat(np.array([3, 0, 7], dtype=np.int8), [1, n - 2, 1]),
    }
    for name, a in cases.items():
        out: dict = {}
        persist._encode(name, a, out)

        class Z(dict):
            files = property(lambda self: list(self))
        got = persist._decode(name, n, a.dtype, Z(out))
        assert got.dtype == a.dtype and np.array_equal(got, a), name
    # many runs (the vectorised decode path)
    many = np.repeat(rng.integers(1, 5, 1 << 13), 8).astype(np.uint64)
    out = _encoded(many)
    assert "x.rle_start" in out and out["x.rle_start"].size > 4096

    class Z2(dict):
        files = property(lambda self: list(self))
    assert np.array_equal(persist._decode("x", many.size, many.dtype, Z2(out)), many)
    assert any(k.endswith(".rle_start") for k in _encoded(cases["runs"]))
    assert any(k.endswith(".sp_idx") for k in _encoded(cases["sparse"]))
    assert any(k.endswith(".dense") for k in _encoded(cases["dense"]))


def _encoded(a):
    out: dict = {}
    persist._encode("x", a, out)
    return out


# -- damaged saved hosts ----------------------------------------------------------------------------

def _flip(path, offset):
    b = bytearray(path.read_bytes())
    b[offset % len(b)] ^= 0x01
    path.write_bytes(bytes(b))


DAMAGE = {
    "host.json truncated": lambda p: (p / "host.json").write_bytes((p / "host.json").read_bytes()[:200]),
    "host.json emptied": lambda p: (p / "host.json").write_bytes(b""),
    "host.json one bit flipped": lambda p: _flip(p / "host.json", 1000),
    "host.json a digit changed": lambda p: (p / "host.json").write_text(
        (p / "host.json").read_text().replace('"next_domid": 4', '"next_domid": 5')),
    "host.json missing": lambda p: (p / "host.json").unlink(),
    "frames.npz truncated": lambda p: (p / "frames.npz").write_bytes((p / "frames.npz").read_bytes()[:100000]),
    "frames.npz one bit flipped": lambda p: _flip(p / "frames.npz", 300000),
    "frames.npz missing": lambda p: (p / "frames.npz").unlink(),
    "checksum missing": lambda p: (p / "host.digest").unlink(),
    "checksum wrong": lambda p: (p / "host.digest").write_text("0" * 64 + "\n"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_saved_host_is_refused_clearly(host, tmp_path, damage):
    p = tmp_path / "h"
    host.save(p)
    DAMAGE[damage](p)
    with pytest.raises(HostFileError) as ei:
        Host.load(p)
    msg = str(ei.value)
    assert str(p) in msg
    assert any(w in msg for w in ("corrupt", "incomplete", "cannot read")), msg


def test_frames_of_another_save_are_refused(host, tmp_path):
    host.save(tmp_path / "a")
    sysctl.page_offline_op(host, 0, 1, 0x20000, 0x20000, pcpu=1)
    host.save(tmp_path / "b")
    shutil.copy(tmp_path / "a" / "frames.npz", tmp_path / "b" / "frames.npz")
    with pytest.raises(HostFileError, match="frames.npz does not match"):
        Host.load(tmp_path / "b")


def test_unknown_format_is_refused(host, tmp_path):
    p = tmp_path / "h"
    host.save(p)
    hdr = json.loads((p / "host.json").read_text())
    hdr["format"] = 99
    blob = json.dumps(hdr).encode()
    (p / "host.json").write_bytes(blob)
    (p / "host.digest").write_text(persist._digest_bytes(blob) + "\n")
    with pytest.raises(HostFileError, match="format 99"):
        Host.load(p)


def test_legacy_format_without_checksum_still_loads(host, tmp_path):
    p = tmp_path / "h"
    host.save(p)
    hdr = json.loads((p / "host.json").read_text())
    hdr["format"] = 1
    del hdr["frames_digest"]
    (p / "host.json").write_text(json.dumps(hdr))
    (p / "host.digest").unlink()
    assert_same(comparable(host), comparable(Host.load(p)))


def _as_format_2(p, how: str, count_info: np.ndarray) -> None:
    """Rewrite the host saved in ``p`` as xenpage saved it before format 3: count_info as
    one uint64 array (encoded as ``how``) where format 3 has pgc_flags and pgc_count."""
    with np.load(p / "frames.npz") as z:
        arrs = {k: z[k] for k in z.files if not k.startswith(("pgc_flags.", "pgc_count."))}
    if how == "dense":
        arrs["count_info.dense"] = count_info
    elif how == "sparse":  # what a format-2 save never chose for count_info, but could read
        nz = np.flatnonzero(count_info)
        arrs["count_info.sp_idx"], arrs["count_info.sp_val"] = nz, count_info[nz]
    else:
        starts = np.r_[0, np.flatnonzero(count_info[1:] != count_info[:-1]) + 1]
        arrs["count_info.rle_start"], arrs["count_info.rle_val"] = starts, count_info[starts]
    np.savez(p / "frames.npz", **arrs)
    hdr = json.loads((p / "host.json").read_text())
    hdr["format"] = 2
    hdr["frames_digest"] = persist._digest_file(p / "frames.npz")
    blob = json.dumps(hdr).encode()
    (p / "host.json").write_bytes(blob)
    (p / "host.digest").write_text(persist._digest_bytes(blob) + "\n")


@pytest.mark.parametrize("how", ["runs", "dense", "sparse"])
def test_a_host_saved_before_format_3_loads_the_same(host, tmp_path, how):
    """A host saved by the previous xenpage (format 2: count_info one uint64 array) loads as
    the host it was, and is saved back in format 3."""
    host = busy_host(host)
    p = tmp_path / "h"
    host.save(p)
    _as_format_2(p, how, host.ft.count_info.copy())
    with np.load(p / "frames.npz") as z:
        assert any(k.startswith("count_info.") for k in z.files)
    loaded = Host.load(p)
    assert_same(comparable(host), comparable(loaded))
    assert invariants.check(loaded) == invariants.check(host)  # (busy_host leaves misaligned chunks)
    loaded.save(p)
    assert json.loads((host_path_of(p) / "host.json").read_text())["format"] == persist.FORMAT == 3
    with np.load(host_path_of(p) / "frames.npz") as z:
        assert not any(k.startswith("count_info.") for k in z.files)
    assert_same(comparable(host), comparable(Host.load(p)))


def host_path_of(p):
    return p.resolve() if p.is_symlink() else p


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 60),
                          st.sampled_from([0, 0, 1, 3, 2**63 + 5])), max_size=8),
       st.integers(1, 200), st.sampled_from([np.uint64, np.uint8, np.int8, np.uint16]),
       st.sampled_from([3, 1 << 22]))
def test_every_encoding_decodes_to_the_array(runs, n, dtype, step):
    """_encode picks the smallest of sparse, runs and dense; whichever it picks, _decode
    gives the array back (runs found a slice at a time, any slice size)."""
    a = np.zeros(n, dtype=dtype)
    for start, length, v in runs:
        a[start:start + length] = np.array(v).astype(dtype)
    old = persist._STEP
    persist._STEP = step
    try:
        out: dict = {}
        persist._encode("x", a, out)
    finally:
        persist._STEP = old
    want = np.r_[0, np.flatnonzero(a[1:] != a[:-1]) + 1]
    sizes = {"sp_idx": np.count_nonzero(a) * (8 + a.itemsize),
             "rle_start": want.size * (8 + a.itemsize), "dense": a.nbytes}
    kind = next(k.split(".", 1)[1] for k in out if k.split(".", 1)[1] in sizes)
    assert sizes[kind] == min(sizes.values())
    if kind == "rle_start":
        assert np.array_equal(out["x.rle_start"], want)

    class Z(dict):
        files = property(lambda self: list(self))
    got = persist._decode("x", n, a.dtype, Z(out))
    assert got.dtype == a.dtype and np.array_equal(got, a)


def test_structurally_wrong_arrays_are_refused(host, tmp_path):
    """Even with matching checksums (rewritten), arrays of the wrong size are refused."""
    p = tmp_path / "h"
    host.save(p)
    with np.load(p / "frames.npz") as z:
        arrs = {k: z[k] for k in z.files}
    key = next(k for k in arrs if k.startswith("pgc_flags."))
    if key.endswith(".rle_start"):
        arrs[key] = arrs[key][::-1].copy()
    else:
        arrs[key] = arrs[key][:-5].copy()
    np.savez(p / "frames.npz", **arrs)
    hdr = json.loads((p / "host.json").read_text())
    hdr["frames_digest"] = persist._digest_file(p / "frames.npz")
    blob = json.dumps(hdr).encode()
    (p / "host.json").write_bytes(blob)
    (p / "host.digest").write_text(persist._digest_bytes(blob) + "\n")
    with pytest.raises(HostFileError, match="corrupt"):
        Host.load(p)


# -- across processes, through the real command ------------------------------------------------------

def _files(state_dir):
    p = host_path(state_dir)
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns) for f in sorted(p.iterdir())}


def test_state_carries_across_processes(cli_state, xenpage_cli):
    host = Host.load(host_path(cli_state))
    head, order = max(host.heap.chunks(), key=lambda c: c[1])
    free = head + (1 << order) // 2
    d0 = int(host.owned_frames(0)[1234])
    for m, st_after in ((free, "Memory Status 2: [ PAGE_OFFLINED ]"),
                        (d0, "Memory Status 8: [ PAGE_OFFLINE_PENDING  PAGE_ONLINED ]")):
        r = xenpage_cli(cli_state, "mem-status", f"{m:x}")
        assert r.stdout.endswith("Memory Status 0: [ PAGE_ONLINED ]\n")
        xenpage_cli(cli_state, "mem-offline", f"{m:x}")
        r = xenpage_cli(cli_state, "mem-status", f"{m:x}")
        assert r.returncode == 0 and r.stdout == f"Querying MEMORY mfn {m:x} status\n{st_after}\n"
        r = xenpage_cli(cli_state, "mem-online", f"{m:x}")
        assert r.stdout == f"Prepare to online MEMORY mfn {m:x}\nMemory mfn {m:x} onlined successfully\n"
        r = xenpage_cli(cli_state, "mem-status", f"{m:x}")
        assert r.stdout.endswith("Memory Status 0: [ PAGE_ONLINED ]\n")
    loaded = Host.load(host_path(cli_state))
    assert invariants.check(loaded) == []
    assert loaded.ft.state(free) == 3 and loaded.ft.state(d0) == 0


def test_first_use_creates_the_default_host(tmp_path, xenpage_cli):
    sd = tmp_path / "fresh"
    r = xenpage_cli(sd, "mem-status", "100")
    assert r.returncode == 0 and r.stdout == "Querying MEMORY mfn 100 status\nMemory Status 0: [ PAGE_ONLINED ]\n"
    assert (host_path(sd) / "host.json").exists()
    h = Host.load(host_path(sd))
    assert [d.name for d in h.guest_domains()] == ["Domain-0", "domu1", "hvm1", "pvh1"]


@pytest.mark.parametrize("argv", [
    ("mem-offline", "zz"), ("mem-offline", "-1"), ("mem-offline", "100000000"),
    ("mem-offline", "0x1ffffffff"), ("mem-offline",), ("mem-online", "zz"), ("mem-status", "-a0"),
    ("mem-online", "a0", "zz"), ("mem-status",), ("mem-query", "20000"), ("bogus",), ("-x",),
    ("mem-offline", "20000-1ffff"), ("mem-offline", "20000", "zz"),
], ids=lambda a: " ".join(a) or "none")
def test_malformed_input_changes_nothing(cli_state, xenpage_cli, argv):
    before = _files(cli_state)
    r = xenpage_cli(cli_state, *argv)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert _files(cli_state) == before  # byte-identical, not even rewritten


@pytest.mark.parametrize("damage", ["host.json truncated", "frames.npz truncated",
                                    "frames.npz one bit flipped", "checksum missing"])
@pytest.mark.parametrize("argv", [("mem-offline", "20000"), ("mem-status", "20000"),
                                  ("mem-online", "20000"), ("list",), ("host", "show"),
                                  ("dump-p2m", "1")], ids=lambda a: " ".join(a))
def test_damaged_host_through_the_command(cli_state, xenpage_cli, damage, argv):
    DAMAGE[damage](host_path(cli_state))
    before = _files(cli_state)
    r = xenpage_cli(cli_state, *argv)
    assert r.returncode == 2
    assert r.stdout == ""
    assert r.stderr.startswith(f"xenpage: saved host {host_path(cli_state)} is ")
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert _files(cli_state) == before


def test_queries_do_not_change_the_frame_table(cli_state, xenpage_cli):
    before = comparable(Host.load(host_path(cli_state)))
    for argv in (("mem-status", "20000"), ("mem-status", "a0"), ("mem-online", "20000"),
                 ("mem-online", "7fff0"), ("list",), ("host", "show", "--json")):
        assert xenpage_cli(cli_state, *argv).returncode in (0, 1)
    after = comparable(Host.load(host_path(cli_state)))
    assert_same(before, after)


def test_state_dir_option_and_environment(tmp_path, xenpage_cli, saved_default_host):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(saved_default_host, a)
    shutil.copytree(saved_default_host, b)
    # --state-dir wins over $XENPAGE_STATE_DIR
    r = xenpage_cli(a, "--state-dir", str(b), "mem-offline", "20000")
    assert r.returncode == 0
    assert Host.load(host_path(b)).ft.state(0x20000) == 2
    assert Host.load(host_path(a)).ft.state(0x20000) == 3
    assert not os.path.exists(tmp_path / "state")


def test_concurrent_commands_do_not_lose_updates(cli_state, xenpage_cli):
    """Each command locks the state directory: parallel offlines all land."""
    import subprocess
    import sys
    from pathlib import Path
    h = Host.load(host_path(cli_state))
    head, order = max(h.heap.chunks(), key=lambda c: c[1])
    frames = [head + 64 * i + 1 for i in range(4)]
    exe = Path(sys.executable).with_name("xenpage")
    env = dict(os.environ, XENPAGE_STATE_DIR=str(cli_state), XENPAGE_BACKEND="sim")
    procs = [subprocess.Popen([str(exe), "mem-offline", f"{m:x}"], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for m in frames]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(frames)
    after = Host.load(host_path(cli_state))
    assert [after.ft.state(m) for m in frames] == [2] * len(frames)
    assert set(after.heap.offlined_list) == set(frames)
    assert invariants.check(after) == []


def test_cli_recovers_a_host_a_killed_save_left_aside(cli_state, xenpage_cli):
    """Killed between an older save's two renames, only ``host.tmp<pid>`` is left: the next
    command makes it the saved host again (and says so) instead of building a new default
    host -- a frame offlined before stays offlined (issue 19, item 2)."""
    assert xenpage_cli(cli_state, "mem-offline", "20000").returncode == 0
    hp = host_path(cli_state)
    if hp.is_symlink():
        real = cli_state / os.readlink(hp)
        hp.unlink()
    else:
        real = hp
    real.rename(cli_state / "host.tmp31337")
    r = xenpage_cli(cli_state, "mem-status", "20000")
    assert r.returncode == 0 and "PAGE_OFFLINED" in r.stdout, r.stdout + r.stderr
    assert "recovered the saved host from host.tmp31337" in r.stderr
    assert not (cli_state / "host.tmp31337").exists()
