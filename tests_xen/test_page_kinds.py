"""Each kind of frame through ``xenpage`` and stock ``xen-hptool``, side by side, on real
Xen 4.17: a free frame, a dom0 frame (stays offline-pending), the VGA hole, a frame of Xen's
image.  Every frame is put back online afterwards.  (A granted frame, and a pending frame
becoming offlined when its domain is destroyed: test_hang_guard.py, run last.)

xenpage runs in this process through its CLI (click's runner: same lines, streams, exit
codes) -- one Python start-up per command costs tens of seconds under TCG."""

from __future__ import annotations

import pytest

from helpers import hptool, status, xenpage_inproc
from xenpage.abi import sysctl as S
from xenpage.backends.xen.quirks import free_frames_followed_by_owned
from xenpage.toolstack.pcpu import off_pcpu0

VGA_HOLE = 0xA0
XEN_IMAGE_FIRST = 0x7FA00
DOM0_FRAME = 0x63FFF       # inside "Dom0 alloc. 0x60000000->0x68000000" on the lab machine


def _lines(r):
    return r.stdout.splitlines(), r.stderr.splitlines()


def _side_by_side(xen, rec, case: str, mfn: int, online: bool = True):
    """stock: mem-status, mem-offline, mem-status, mem-online, mem-status; then xenpage."""
    h = f"{mfn:x}"
    out = {}
    for who, tool in (("stock", hptool), ("xenpage", xenpage_inproc)):
        res = {"status_before": tool("mem-status", h)}
        with off_pcpu0(xen):      # stock xen-hptool would otherwise offline from pCPU 0
            res["offline"] = tool("mem-offline", h)
        res["status_after_offline"] = tool("mem-status", h)
        if online:
            res["online"] = tool("mem-online", h)
            res["status_after_online"] = tool("mem-status", h)
        out[who] = res
    rec.add("side-by-side", case=case, mfn=h, **{w: {k: v.to_json() for k, v in r.items()}
                                                 for w, r in out.items()})
    return out["stock"], out["xenpage"]


def _own_set_aside(text: str) -> str:
    """xenpage's own explanation lines (``xenpage: ...``) set aside, as tests/test_cli.py does."""
    return "".join(ln for ln in text.splitlines(keepends=True) if not ln.startswith("xenpage: "))


def _same(stock, ours):
    for k in stock:
        assert (ours[k].rc, ours[k].stdout, _own_set_aside(ours[k].stderr)) == \
            (stock[k].rc, stock[k].stdout, stock[k].stderr), k


def test_free_frame(xen, rec):
    """A free frame that is the last of its free buddy (its successor is in use): offlining a
    free frame elsewhere in a buddy leaves misaligned chunks in Xen 4.17's heap."""
    for mfn in free_frames_followed_by_owned(xen, limit=30):
        with off_pcpu0(xen):
            rc, st = xen.page_offline_op(S.sysctl_page_offline, mfn, mfn)
        xen.page_offline_op(S.sysctl_page_online, mfn, mfn)
        if rc == 0 and int(st[0]) & S.PG_OFFLINE_STATUS_MASK == S.PG_OFFLINE_OFFLINED:
            break
    else:
        pytest.skip("no free frame just below an owned one")
    stock, ours = _side_by_side(xen, rec, "free", mfn)
    _same(stock, ours)
    assert f"Memory mfn {mfn:x} offlined successfully, current state is [PG_OFFLINE_OFFLINED]" in ours["offline"].stdout
    assert "Memory Status 2: [ PAGE_OFFLINED ]" in ours["status_after_offline"].stdout
    assert f"Memory mfn {mfn:x} onlined successfully" in ours["online"].stdout
    assert status(xen, mfn) == 0


@pytest.mark.parametrize("case,mfn,err", [("vga-hole", VGA_HOLE, "error 16"),
                                          ("xen-image", XEN_IMAGE_FIRST, "error 1")])
def test_refused_frames(xen, rec, case, mfn, err):
    stock, ours = _side_by_side(xen, rec, case, mfn)
    _same(stock, ours)
    assert ours["offline"].rc == 1
    assert f"Offlining page mfn {mfn:x} failed, {err}" in ours["offline"].stderr
    # issue 16: xenpage's mem-status says what no status word shows (kexec's MA_XEN range)
    fixed = "lies in Xen's fixed range" in ours["status_before"].stderr
    assert fixed == (case == "xen-image"), ours["status_before"].stderr


def test_dom0_frame_stays_pending(xen, rec):
    rc, t = xen.page_types(0, [DOM0_FRAME])
    assert rc == 0 and int(t[0]) != 0xF0000000, f"{DOM0_FRAME:#x} is not dom0's here"
    stock, ours = _side_by_side(xen, rec, "dom0", DOM0_FRAME)
    so, se = _lines(stock["offline"])
    oo, oe = _lines(ours["offline"])
    assert stock["offline"].rc == ours["offline"].rc == 1
    assert so == oo and set(se) <= set(oe)
    assert "DOM0: No suspend port, try live migration" in oe
    assert any(l.startswith(f"xenpage: mfn {DOM0_FRAME:x}: dom0 is never suspended") for l in oe), oe
    for r in (stock, ours):
        assert "Memory Status 8: [ PAGE_OFFLINE_PENDING  PAGE_ONLINED ]" in r["status_after_offline"].stdout
        assert f"Memory mfn {DOM0_FRAME:x} onlined successfully" in r["online"].stdout
    assert status(xen, DOM0_FRAME) == 0
