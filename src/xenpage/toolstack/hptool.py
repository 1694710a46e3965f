"""``xen-hptool mem-offline|mem-online|mem-status`` (``tools/misc/xen-hptool.c``, Xen 4.17):
the same lines, on the same streams, with the same exit codes -- typos and misleading
messages included -- so that scripts written for xen-hptool work unchanged.

Where xen-hptool would act on garbage (an unparsable MFN it never initialised, an MFN the
32-bit sysctl fields would silently truncate) xenpage refuses with a clear error instead and
changes nothing.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

from ..abi import errno as E
from ..abi import sysctl as S
from .hypervisor import Hypervisor
from .pcpu import off_pcpu0
from .report import Report

HELP = (
    "xen-hptool: Xen CPU/memory hotplug tool\n"
    "Usage: xen-hptool <command> [args]\n"
    "Commands:\n"
    "  help                     display this help\n"
    "  cpu-online    <cpuid>    online CPU <cpuid>\n"
    "  cpu-offline   <cpuid>    offline CPU <cpuid>\n"
    "  mem-online    <mfn>      online MEMORY <mfn>\n"
    "  mem-offline   <mfn>      offline MEMORY <mfn>\n"
    "  mem-status    <mfn>      query Memory status<mfn>\n"
    "  smt-enable               onlines all SMT threads\n"
    "  smt-disable              offlines all SMT threads\n"
)

#: xen-hptool's command table, in its order: a typed word selects the first name it prefixes.
COMMANDS = ("help", "cpu-online", "cpu-offline", "mem-status", "mem-online", "mem-offline",
            "smt-enable", "smt-disable")

_HEX = re.compile(r"\s*([+-]?)(0[xX])?([0-9a-fA-F]+)")


class BadMfn(ValueError):
    """An MFN argument xenpage will not pass to Xen (with the reason)."""


def match_command(word: str) -> str | None:
    """xen-hptool's ``strncmp(name, word, strlen(word))`` over its table in order."""
    for name in COMMANDS:
        if name.startswith(word):
            return name
    return None


def parse_mfn(arg: str) -> int:
    """An MFN is hex digits with an optional ``0x``, nothing else.  xen-hptool reads it with
    ``sscanf("%lx")`` -- blanks, a sign, then hex digits up to the first other character -- so
    a typo (``3f1o0``) acts on another frame (0x3f1); xenpage refuses every such argument, a
    negative number, and a value that does not fit the sysctl's 32-bit MFN fields (hptool
    would truncate it and offline a different frame)."""
    m = _HEX.match(arg)
    if not m or m.end() != len(arg) or m.group(1) == "+" or arg[:1].isspace():
        read = f" (xen-hptool would read it as {int(m.group(3), 16):x})" if m and m.group(1) != "-" else ""
        raise BadMfn(f"'{arg}' is not a hexadecimal MFN{read}")
    sign, _, digits = m.groups()
    v = int(digits, 16)
    if sign == "-":
        raise BadMfn(f"'{arg}' is negative (xen-hptool would read it as {(-v) & (2**64 - 1):x})")
    if v > S.MFN_FIELD_MAX:
        raise BadMfn(f"mfn {v:x} does not fit the 32-bit MFN fields of XEN_SYSCTL_page_offline_op "
                     f"(xen-hptool would truncate it to {v & S.MFN_FIELD_MAX:x})")
    return v


def _sysctl(hv: Hypervisor, cmd: int, mfn: int) -> tuple[int, int]:
    """libxenguest's ``xc_mark_page_offline``/``online``/``query``: returns (ret, status)
    where ret is 0 or -1 with ``errno`` carried as the second element on failure."""
    if cmd == S.sysctl_page_offline:
        with off_pcpu0(hv):
            rc, st = hv.page_offline_op(cmd, mfn, mfn)
    else:
        rc, st = hv.page_offline_op(cmd, mfn, mfn)
    status = int(st[0]) if st is not None else S.STATUS_UNTOUCHED
    return rc, status


@functools.lru_cache(maxsize=4096)
def _decoded(status: int, sysctl_cmd: int) -> tuple:
    return tuple(S.decode(status, sysctl_cmd).items())


def _base(cmd: str, mfn: int, rc: int, status: int, sysctl_cmd: int) -> dict:
    # a batch answers with few distinct words: decode each once (a fresh dict every time)
    return {"command": cmd, "mfn": mfn, "mfn_hex": f"{mfn:x}", "rc": rc,
            "errno": -rc if rc < 0 else 0, "errno_name": E.name(rc) if rc < 0 else None,
            "status": {k: list(v) if isinstance(v, list) else v
                       for k, v in _decoded(status, sysctl_cmd)}}


def mem_status(hv: Hypervisor, mfn: int) -> Report:
    r = Report()
    r.out(f"Querying MEMORY mfn {mfn:x} status")
    rc, status = _sysctl(hv, S.sysctl_query_page_offline, mfn)
    r.data = _base("mem-status", mfn, rc, status, S.sysctl_query_page_offline)
    if rc < 0:
        # Xen 4.17 prints this one without a newline (fixed upstream in 2025).
        r.err(f"Querying page mfn {mfn:x} failed, error {-rc:x}", newline=False)
        r.exit_code = 1
        return r
    s = f"Memory Status {status:x}: ["
    if status & S.PG_OFFLINE_STATUS_OFFLINE_PENDING:
        s += " PAGE_OFFLINE_PENDING "
    if status & S.PG_OFFLINE_STATUS_BROKEN:
        s += " PAGE_BROKEND  "
    s += " PAGE_OFFLINED " if status & S.PG_OFFLINE_STATUS_OFFLINED else " PAGE_ONLINED "
    r.out(s + "]")
    return r


def mem_status_noted(hv: Hypervisor, mfn: int) -> Report:
    """xenpage's ``mem-status``: xen-hptool's lines, then one ``xenpage:`` line when the
    frame lies in Xen's fixed range (:mod:`.fixed`), which no status word shows."""
    r = mem_status(hv, mfn)
    if r.exit_code == 0:
        from .fixed import note
        line = note(hv, mfn)
        if line:
            r.err(f"xenpage: {line}")
            r.data["xen_fixed"] = True
    return r


def mem_online(hv: Hypervisor, mfn: int) -> Report:
    r = Report()
    r.out(f"Prepare to online MEMORY mfn {mfn:x}")
    rc, status = _sysctl(hv, S.sysctl_page_online, mfn)
    r.data = _base("mem-online", mfn, rc, status, S.sysctl_page_online)
    if rc < 0:
        # Also without a newline in Xen 4.17.
        r.err(f"Onlining page mfn {mfn:x} failed, error {-rc:x}", newline=False)
        r.exit_code = 1
    elif status & (S.PG_ONLINE_FAILED | S.PG_ONLINE_BROKEN):
        r.err(f"Onlining page mfn {mfn:x} is broken, Memory online failed")
        r.exit_code = 1
    elif status & S.PG_ONLINE_ONLINED:
        r.out(f"Memory mfn {mfn:x} onlined successfully")
    else:
        r.out("Memory is already onlined!")
    return r


def suspend_port_failure(r: Report, domid: int, mfn: int) -> None:
    """What xen-hptool prints when the owner publishes no suspend event channel (every Linux
    PV guest, and dom0)."""
    r.err(f"DOM{domid}: No suspend port, try live migration")
    r.err(f"Failed to suspend guest {domid} for mfn {mfn:x}")
    r.exit_code = 1


def mem_offline_mark(hv: Hypervisor, mfn: int) -> tuple[Report, int, int]:
    """The part of ``mem-offline`` before any owner handling: mark the frame and print what
    xen-hptool prints for every status except PENDING|OWNED.  Returns (report, rc, status);
    the caller handles the owned case."""
    rc, status = _sysctl(hv, S.sysctl_page_offline, mfn)
    return offline_report(mfn, rc, status), rc, status


def offline_report(mfn: int, rc: int, status: int) -> Report:
    """xen-hptool's lines for ``xc_mark_page_offline(mfn, mfn)`` answering (rc, status),
    up to the owner handling."""
    r = Report()
    r.out(f"Prepare to offline MEMORY mfn {mfn:x}")
    r.data = _base("mem-offline", mfn, rc, status, S.sysctl_page_offline)
    if rc < 0:
        r.err(f"Offlining page mfn {mfn:x} failed, error {-rc:x}")
        # FAILED is in both masks, so the second message is unreachable (xen-semantics 7.B2).
        if status & (S.PG_OFFLINE_XENPAGE | S.PG_OFFLINE_FAILED):
            r.err("XEN_PAGE is not permitted be offlined")
        elif status & (S.PG_OFFLINE_FAILED | S.PG_OFFLINE_NOT_CONV_RAM):
            r.err("RESERVED RAM is not permitted to be offlined")
        r.exit_code = 1
        return r
    low = status & S.PG_OFFLINE_STATUS_MASK
    if low == S.PG_OFFLINE_OFFLINED:
        r.out(f"Memory mfn {mfn:x} offlined successfully, current state is [PG_OFFLINE_OFFLINED]")
        if status & S.PG_OFFLINE_BROKEN:
            r.out("And this offlined PAGE is already marked broken before!")
    elif low == S.PG_OFFLINE_FAILED:
        r.err(f"Memory mfn {mfn:x} offline failed")
        if status & S.PG_OFFLINE_ANONYMOUS:
            r.err("the memory is an anonymous page!")
        r.exit_code = 1
    elif low == S.PG_OFFLINE_PENDING and status & S.PG_OFFLINE_XENPAGE:
        r.err(f"Memory mfn {mfn:x} offlined succssefully,this page is xen page, current state is"
              " [PG_OFFLINE_PENDING, PG_OFFLINE_XENPAGE]")
        r.exit_code = 1
    return r


#: Status words with which ``offline_page`` refuses a frame (and stops a range walk):
#: not conventional RAM, and a frame of Xen's image.  (An invalid MFN leaves its slot
#: untouched.)  No successful offline answers either.
_REFUSAL_WORDS = (S.PG_OFFLINE_FAILED | S.PG_OFFLINE_NOT_CONV_RAM,
                  S.PG_OFFLINE_XENPAGE | S.PG_OFFLINE_FAILED | (0x7FF2 << S.PG_OFFLINE_OWNER_SHIFT))

#: Frames per range call (status array of 4 MiB).
MAX_RANGE_CALL = 1 << 20


def _runs(mfns: np.ndarray) -> list[tuple[int, int]]:
    """Maximal runs of consecutive increasing MFNs, as (first, last), each at most
    :data:`MAX_RANGE_CALL` frames."""
    import numpy as np
    if mfns.size == 0:
        return []
    cut = np.flatnonzero(np.diff(mfns) != 1) + 1
    out: list[tuple[int, int]] = []
    for s_, e_ in zip(np.r_[0, cut].tolist(), np.r_[cut, mfns.size].tolist()):
        first, last = int(mfns[s_]), int(mfns[e_ - 1])
        for a in range(first, last + 1, MAX_RANGE_CALL):
            out.append((a, min(last, a + MAX_RANGE_CALL - 1)))
    return out


#: Frames per ``page_offline_each`` call when the caller watches progress.
EACH_BATCH = 1 << 16


def mark_offline_array(hv: Hypervisor, mfns, highest_first: bool = False, record_dir=None,
                       progress=None) -> tuple[np.ndarray, np.ndarray]:
    """``(rc, status)`` arrays, element i exactly what ``xc_mark_page_offline(m, m)`` for
    ``mfns[i]`` one frame at a time would answer, with dom0 kept off pCPU 0 once for the whole
    batch and no Python object per frame.

    ``highest_first``: one-frame calls (``page_offline_each``) from the highest MFN down, so
    that each free frame is the last of its buddy when offlined (:mod:`.split_guard`).
    Otherwise range calls over runs of consecutive MFNs (the sysctl walks a range frame by
    frame and stops at the first refusal; the walk resumes after it).
    ``record_dir``: where dom0's affinity is recorded while pinned (:func:`.pcpu.off_pcpu0`).
    ``progress(n)``: called with the number of frames each step has answered."""
    import numpy as np
    mfns = np.asarray(mfns, dtype=np.int64).ravel()
    rcs = np.zeros(mfns.size, dtype=np.int32)
    sts = np.full(mfns.size, S.STATUS_UNTOUCHED, dtype=np.uint32)
    if mfns.size == 0:
        return rcs, sts
    uniq, inv = _unique_inverse(mfns)
    if highest_first:
        desc = uniq[::-1]
        r_u = np.empty(desc.size, dtype=np.int32)
        s_u = np.empty(desc.size, dtype=np.uint32)
        step = EACH_BATCH if progress else desc.size
        with off_pcpu0(hv, record_dir=record_dir):
            for a in range(0, desc.size, step):
                r_u[a:a + step], s_u[a:a + step] = hv.page_offline_each(
                    S.sysctl_page_offline, desc[a:a + step])
                if progress:
                    progress(min(step, desc.size - a))
        r_u, s_u = r_u[::-1], s_u[::-1]
        return r_u[inv], s_u[inv]
    # range calls over runs, in the order of the MFNs given (repeats answered as the first)
    order = first_occurrences(mfns)
    r_o = np.zeros(order.size, dtype=np.int32)
    s_o = np.full(order.size, S.STATUS_UNTOUCHED, dtype=np.uint32)
    pos = 0
    with off_pcpu0(hv, record_dir=record_dir):
        for first, last in _runs(order):
            cur = first
            while cur <= last:
                rc, st = hv.page_offline_op(S.sysctl_page_offline, cur, last)
                if st is None:  # refused as a whole (e.g. -ENOMEM): one frame at a time
                    for m in range(cur, last + 1):
                        r1, s1 = hv.page_offline_op(S.sysctl_page_offline, m, m)
                        r_o[pos], s_o[pos] = r1, int(s1[0]) if s1 is not None else S.STATUS_UNTOUCHED
                        pos += 1
                    break
                if rc == 0:
                    s_o[pos:pos + st.size] = st
                    pos += st.size
                    break
                # The walk stopped at a refused frame: either the first untouched slot (an
                # invalid MFN) or the last written one (its refusal word).
                unt = np.flatnonzero(st == S.STATUS_UNTOUCHED)
                u = int(unt[0]) if unt.size else st.size
                k = u - 1 if u > 0 and (u == st.size or int(st[u - 1]) in _REFUSAL_WORDS) else u
                s_o[pos:pos + k] = st[:k]
                r_o[pos + k], s_o[pos + k] = rc, st[k]
                pos += k + 1
                cur += k + 1
            if progress:
                progress(last - first + 1)
    where = np.searchsorted(uniq, order)
    r_u = np.empty(uniq.size, dtype=np.int32)
    s_u = np.empty(uniq.size, dtype=np.uint32)
    r_u[where], s_u[where] = r_o, s_o
    return r_u[inv], s_u[inv]


def _unique_inverse(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(a, return_inverse=True)`` by one sort (numpy 2.4's hashing unique takes
    seconds on a million consecutive frames)."""
    import numpy as np
    if a.size and (a[1:] > a[:-1]).all():
        return a, np.arange(a.size)
    srt = np.argsort(a, kind="stable")
    s = a[srt]
    new = np.r_[True, s[1:] != s[:-1]]
    inv = np.empty(a.size, dtype=np.int64)
    inv[srt] = np.cumsum(new) - 1
    return s[new], inv


def first_occurrences(a: np.ndarray) -> np.ndarray:
    """The distinct values of ``a`` in the order they first occur (by one stable sort)."""
    import numpy as np
    a = np.asarray(a, dtype=np.int64).ravel()
    if a.size < 2 or (a[1:] > a[:-1]).all():
        return a
    srt = np.argsort(a, kind="stable")
    s = a[srt]
    first = srt[np.r_[True, s[1:] != s[:-1]]]
    return a[np.sort(first)]


def mark_offline_many(hv: Hypervisor, mfns: list[int], highest_first: bool = False,
                      record_dir=None) -> list[tuple[int, int]]:
    """:func:`mark_offline_array` as a list of ``(rc, status)`` pairs."""
    rcs, sts = mark_offline_array(hv, mfns, highest_first, record_dir)
    return list(zip(rcs.tolist(), sts.tolist()))


def mem_offline_marks(hv: Hypervisor, mfns: list[int], highest_first: bool = False,
                      record_dir=None) -> list[tuple[Report, int, int]]:
    """:func:`mem_offline_mark` for many frames at once (range calls; see
    :func:`mark_offline_many`): the same reports, in the same order."""
    return [(offline_report(m, rc, st), rc, st)
            for m, (rc, st) in zip(mfns, mark_offline_many(hv, mfns, highest_first, record_dir))]


def is_owned_pending(rc: int, status: int) -> bool:
    return rc == 0 and (status & S.PG_OFFLINE_STATUS_MASK) == S.PG_OFFLINE_PENDING \
        and not status & S.PG_OFFLINE_XENPAGE and bool(status & S.PG_OFFLINE_OWNED)


def owner_of(status: int) -> int:
    return status >> S.PG_OFFLINE_OWNER_SHIFT


def mem_offline(hv: Hypervisor, mfn: int) -> Report:
    """Stock xen-hptool's ``mem-offline``: an owned frame needs the owner suspended through
    its suspend event channel, which no Linux PV guest (and not dom0) publishes."""
    r, rc, status = mem_offline_mark(hv, mfn)
    if is_owned_pending(rc, status):
        domid = owner_of(status)
        port = hv.xs_read(f"/local/domain/{domid}/device/suspend/event-channel")
        if not port:
            suspend_port_failure(r, domid, mfn)
        else:
            r.err(f"DOM{domid}: suspend event channel {port} published; xenpage suspends "
                  "guests through xenstore instead (xenpage mem-offline)")
            r.exit_code = 1
    return r
