"""The write-ahead journal of an exchange, and ``xenpage recover``.

A process that dies in the middle of an exchange (killed, OOM, power cut of dom0's
toolstack) leaves a guest suspended with page-table entries cleared, tables unpinned, or
frames exchanged but not yet copied or re-pointed.  Before each irreversible step
:func:`~xenpage.toolstack.exchange.exchange_pages` takes, the journal appends one JSON line to
``<state dir>/exchange.journal`` and fsyncs it:

==============  ==============================================================================
``begin``       the guest, the frames, and whether the guest was already suspended
``clearing``    the group (mfn, gpfn, level) and every entry about to be cleared
                (table, index, original value, level)
``unpinning``   the tables about to be unpinned (and their levels)
``snapshot``    the content of every frame and the P2M frames, just before XENMEM_exchange
``exchanged``   the result (old, gpfn, level, new), before the copy / P2M / M2P / re-point
``done``        the group is complete (or was rolled back)
==============  ==============================================================================

:func:`recover` reads it back: a group whose frames were exchanged is *completed* (content,
P2M frame list, P2M, M2P, entries re-pointed with their flags, tables re-pinned -- every step
idempotent, see :mod:`.rollforward`); a group whose frames were not is *rolled back* (entries
and pins restored bit for bit).  If the process died between XENMEM_exchange and the
``exchanged`` record, the frames' ownership and the M2P say which were exchanged and where
to.  Then the guest is resumed if xenpage suspended it, and the journal is removed.

The journal's directory is given explicitly (``mem_offline(..., journal_dir=...)``: the
state directory of :mod:`xenpage.paths` on either backend).  A backend claiming
``CAP_CHECKPOINT`` (the simulator) is asked to ``checkpoint()`` -- save its host -- before each
record: what a real machine keeps by itself across the death of a dom0 process.  Each record
is also a named :mod:`.crashpoint` (``<record>`` just before it is durable, ``<record>+``
just after), where only a test-installed hook can stop the process.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np

from ..statefiles import fsync_dir as _fsync_dir
from .. import statefiles
from ..abi import domctl as D
from ..abi import pte as P
from ..abi import xen as X
from . import crashpoint, rollforward
from .membership import member
from .hypervisor import CAP_CHECKPOINT, CheckpointHypervisor, Hypervisor

JOURNAL_NAME = "exchange.journal"


def crash_point(name: str, hv=None) -> None:
    """A named point a crash test may stop at (:mod:`.crashpoint`; nothing in the product)."""
    crashpoint.reached(name, hv)


def checkpoint(hv: Hypervisor) -> None:
    """Before a journal record: a backend with ``CAP_CHECKPOINT`` (the simulator) saves its
    host -- what a real machine keeps by itself across the death of a dom0 process."""
    if CAP_CHECKPOINT in hv.capabilities:
        cast(CheckpointHypervisor, hv).checkpoint()


LOCK_NAME = "mem-offline.lock"


def acquire(state_dir):
    """An exclusive ``flock`` on ``<state dir>/mem-offline.lock`` (xen-hptool's idea of a
    lock file per operation): two toolstacks never exchange at once, never share a journal.
    Held until the returned file is closed."""
    import fcntl
    statefiles.state_dir(state_dir)
    key = str(Path(state_dir).resolve())
    old = _HELD.pop(key, None)
    if old is not None and not old.closed:
        old.close()  # left by a call of this process that died (an exception): not running
    f = statefiles.open_private(Path(state_dir) / LOCK_NAME, "a")
    fcntl.flock(f, fcntl.LOCK_EX)
    _HELD[key] = f
    return f


_HELD: dict = {}


def journal_path(state_dir) -> Path:
    return Path(state_dir) / JOURNAL_NAME


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.asarray(a, dtype="<u8").tobytes()).decode()


def _unb64(s: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), dtype="<u8").astype(np.uint64)




def _p2m_frames_needed(p2m_frames, grp) -> dict:
    """The entries of the P2M's frame list that completing ``grp`` reads: the P2M frame of
    each gpfn and the positions of frames of the group that are P2M frames themselves
    (:func:`.rollforward.complete`) -- not the whole list, which a 256 GiB guest makes 131,072
    entries long, written and fsync'd under the suspend."""
    pf = np.asarray(p2m_frames, dtype=np.int64)
    olds = np.array([int(m) for m, _, _ in grp], dtype=np.int64)
    at = np.union1d(np.array([int(g) // 512 for _, g, _ in grp], dtype=np.int64),
                    np.flatnonzero(member(pf, olds)))
    at = at[(at >= 0) & (at < pf.size)]
    return {"n": int(pf.size), "at": at.tolist(), "mfn": pf[at].tolist()}


def _p2m_frames_array(rec) -> np.ndarray:
    """The frame list as :func:`.rollforward.complete` takes it, from a snapshot record
    (entries not recorded read -1: no frame; a list: a journal of an older xenpage)."""
    if isinstance(rec, dict):
        out = np.full(int(rec["n"]), -1, dtype=np.int64)
        out[np.asarray(rec["at"], dtype=np.int64)] = np.asarray(rec["mfn"], dtype=np.int64)
        return out
    return np.array(rec, dtype=np.int64)


class Journal:
    """The journal of one mem-offline run in ``state_dir`` (one guest at a time)."""

    def __init__(self, hv: Hypervisor, state_dir):
        self.hv = hv
        self.dir = Path(state_dir)
        self.path = journal_path(state_dir)
        self.records = 0
        #: this run's records of the open exchange, each kept here *before* it is written:
        #: what :meth:`salvage` recovers from when a write (or memory) fails half-way
        self.mem: list[dict] = []
        #: (old, gpfn, level, new) of each frame of this run's complete groups: ``finished``
        #: once their ``done`` record is durable, ``closing`` while it is not
        self.finished: list[tuple] = []
        self.closing: list[tuple] = []

    def _checkpoint(self) -> None:
        checkpoint(self.hv)

    def write(self, op: str, truncate: bool = False, **data) -> None:
        rec = {"op": op, **data}
        closing: list[tuple] = []
        # what is kept in memory is what _groups() would find open on disk: a group closed
        # (done, or rolled back and followed by another) needs nothing from its records
        if op == "done":
            head, groups = _split(self.mem)
            for r in groups[-1] if groups else []:
                if r["op"] == "exchanged":
                    closing = [tuple(x) for x in r["exchanged"]]
                    self.closing += closing
            self.mem = _open_only(head, groups[:-1])
        elif op == "clearing":
            self.mem = _open_only(*_split(self.mem)) + [rec]
        else:
            self.mem.append(rec)
        self._checkpoint()
        crash_point(op, self.hv)
        new = truncate or not self.path.exists()
        with statefiles.open_private(self.path, "w" if truncate else "a") as f:
            f.write(json.dumps(rec, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if new:
            _fsync_dir(self.dir)
        self.records += 1
        if closing:  # its 'done' is durable
            self.finished += closing
            self.closing = [c for c in self.closing if c not in closing]
        crash_point(op + "+", self.hv)

    def begin(self, domid: int, mfns: list[int], was_suspended: bool) -> None:
        if self.path.exists():  # never start over a journal that still holds a guest's pages
            raise JournalError(f"{self.path}: an exchange not yet recovered is recorded there; "
                               "run 'xenpage recover' first")
        self.mem = []
        self.write("begin", truncate=True, domid=domid, mfns=[int(m) for m in mfns],
                   was_suspended=bool(was_suspended))

    def step(self, name: str) -> None:
        """A point between two steps that needs no record (the host is checkpointed)."""
        self._checkpoint()
        crash_point(name, self.hv)

    def hook(self, step: str, **info) -> None:
        """``exchange_pages``'s hook."""
        if step == "clearing":
            grp = [[int(m), int(g), int(l)] for m, g, l in info["grp"]]
            refs = [[r.table, r.index, r.value, r.level] for r in info["refs"]]
            self.write("clearing", grp=grp, refs=refs)
        elif step == "unpinning":
            lv = {int(m): int(l) for m, g, l in info["grp"]}
            self.write("unpinning", pins=[[int(m), lv[int(m)]] for m in info["mfns"]])
        elif step == "snapshot":
            self.write("snapshot", content={str(m): _b64(a) for m, a in info["content"].items()},
                       p2m_frames=_p2m_frames_needed(info["p2m_frames"], info["grp"]),
                       fl_frames=[int(x) for x in info["fl_frames"]])
        elif step == "exchanged":
            self.write("exchanged", exchanged=[[int(x) for x in e] for e in info["exchanged"]])
        elif step == "repointed":
            if info.get("complete", True):
                self.write("done")
            else:
                self.write("incomplete")
        elif step in ("cleared", "unpinned", "copied", "p2m"):
            self.step(step)

    def end(self) -> None:
        """The guest is resumed: nothing left to recover."""
        self._checkpoint()
        crash_point("end", self.hv)
        statefiles.remove_durably(self.path)
        self.mem = []

    def salvage(self) -> "Recovery":
        """In this process, after writing the journal or the host failed (``ENOSPC``,
        ``EDQUOT``, ``EIO`` ...) or memory ran out in the middle of an exchange: complete the
        groups whose frames were exchanged and roll back the others from this run's records
        (kept in memory -- the last one may never have reached the disk), resume the guest
        if xenpage suspended it, then remove the journal (the host checkpointed first).

        What cannot be done here is left in ``errors``, with the journal on disk untouched
        -- it and the host as last saved describe a consistent point for ``xenpage recover``.
        Raises nothing for a disk or memory failure."""
        res = Recovery(journal=bool(self.mem), records=len(self.mem))
        if not self.mem:
            return res  # nothing begun, nothing written
        try:
            if self.mem and self.mem[0]["op"] == "begin":
                res.domid = int(self.mem[0]["domid"])
                if self.hv.domain_info(res.domid) is not None:
                    _apply(self.hv, self.mem, res)
            if not res.ok:
                return res
            self.end()
        except (MemoryError, SystemError):  # SystemError: out of memory inside C code
            res.errors.append("out of memory while recovering")
        except OSError as e:
            res.errors.append(describe_os_error(e))
        return res


def _split(recs: list[dict]) -> tuple[list[dict], list[list[dict]]]:
    """The records before the first group (``begin``), and each group from its ``clearing``."""
    head: list[dict] = []
    groups: list[list[dict]] = []
    for r in recs:
        if r["op"] == "clearing":
            groups.append([r])
        elif groups:
            groups[-1].append(r)
        else:
            head.append(r)
    return head, groups


def _open_only(head: list[dict], groups: list[list[dict]]) -> list[dict]:
    """``head`` and the groups that ended ``incomplete`` (before the current one, only those
    are still open: see :func:`_groups`)."""
    return head + [r for g in groups if any(x["op"] == "incomplete" for x in g) for r in g]


class JournalError(Exception):
    """A journal that is damaged other than by a torn last line: nothing is done."""


_NEEDS = {"begin": ("domid",), "clearing": ("grp", "refs"), "unpinning": ("pins",),
          "snapshot": ("content", "p2m_frames", "fl_frames"), "exchanged": ("exchanged",),
          "done": (), "incomplete": ()}


def read(state_dir) -> list[dict]:
    """The journal's records.  A torn last line (the process died while writing it) is
    ignored -- it was never durable, so the step it announced never started; any other
    damage raises :class:`JournalError` (recovering from a guess could lose data)."""
    p = journal_path(state_dir)
    if not p.exists():
        return []
    raw = p.read_bytes()
    lines = raw.split(b"\n")
    torn_ok = not raw.endswith(b"\n")  # only an unterminated last line can be torn
    out = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and rec.get("op") in _NEEDS \
                and all(k in rec for k in _NEEDS[rec["op"]])
        except ValueError:
            ok = False
        if not ok:
            if last and torn_ok:
                break
            raise JournalError(f"{p}: record {i + 1} is damaged; nothing done "
                               "(inspect the journal, then remove it to proceed)")
        out.append(rec)
    if out and out[0]["op"] != "begin":
        raise JournalError(f"{p}: does not start with a 'begin' record; nothing done")
    return out


@dataclass
class Recovery:
    journal: bool = False
    domid: int | None = None
    completed: list[dict] = field(default_factory=list)     # {mfn, gpfn, new_mfn}
    rolled_back: list[int] = field(default_factory=list)    # mfns left in place
    resumed: bool = False
    errors: list[str] = field(default_factory=list)
    records: int = 0

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"journal": self.journal, "domid": self.domid, "records": self.records,
                "completed": self.completed, "rolled_back": self.rolled_back,
                "resumed": self.resumed, "errors": self.errors, "ok": self.ok}

    def lines(self) -> list[str]:
        if not self.journal:
            return ["xenpage: no interrupted exchange to recover"]
        out = [f"xenpage: recovering an interrupted exchange of d{self.domid} "
               f"({self.records} journal records)"]
        for c in self.completed:
            out.append(f"xenpage: completed: d{self.domid} gpfn {c['gpfn']:#x} moved from mfn "
                       f"{c['mfn']:#x} to mfn {c['new_mfn']:#x}")
        for m in self.rolled_back:
            out.append(f"xenpage: rolled back: mfn {m:#x} stays in place (offline-pending)")
        if self.resumed:
            out.append(f"xenpage: d{self.domid} resumed")
        for e in self.errors:
            out.append(f"xenpage: error: {e}")
        return out


def _groups(recs: list[dict]) -> list[list[dict]]:
    """Groups of the last ``begin`` still open: the last one unless it is ``done``, and any
    earlier one that ended ``incomplete``."""
    groups = _split(recs)[1]
    open_ = [g for g in groups[:-1] if any(r["op"] == "incomplete" for r in g)]
    if groups and groups[-1][-1]["op"] != "done":
        open_.append(groups[-1])
    return open_


def _recover_group(hv: Hypervisor, domid: int, g: list[dict], res: Recovery) -> None:
    by_op = {r["op"]: r for r in g}
    grp = [tuple(x) for x in by_op["clearing"]["grp"]]
    refs = [tuple(x) for x in by_op["clearing"]["refs"]]
    pins = [tuple(x) for x in by_op.get("unpinning", {}).get("pins", [])]
    exchanged: list[tuple[int, int, int, int]] = []
    if "exchanged" in by_op:
        exchanged = [tuple(x) for x in by_op["exchanged"]["exchanged"]]
    elif "snapshot" in by_op:
        # died between XENMEM_exchange and its record: ownership and the M2P tell
        olds = np.array([m for m, _, _ in grp], dtype=np.int64)
        rc, t = hv.page_types(domid, olds)
        if rc:
            raise rollforward.Incomplete("page types", rc)
        for (m, gp, lvl), ty in zip(grp, t.tolist()):
            if ty == D.XEN_DOMCTL_PFINFO_XTAB:
                new = rollforward.find_new_frame(hv, domid, m, gp)
                if new is None:
                    res.errors.append(f"mfn {m:#x} left d{domid} but no frame holds gpfn {gp:#x}")
                    continue
                exchanged.append((m, gp, lvl, new))
    done = {e[0] for e in exchanged}
    if exchanged:
        snap = by_op["snapshot"]
        content = {int(k): _unb64(v) for k, v in snap["content"].items()}
        by_target: dict[int, list] = {}
        for r in refs:
            by_target.setdefault(P.pte_frame(r[2]), []).append(r)
        rollforward.complete(hv, domid, exchanged, content, by_target,
                             [m for m, _ in pins if m in done],
                             _p2m_frames_array(snap["p2m_frames"]),
                             np.array(snap["fl_frames"], dtype=np.int64))
        res.completed += [{"mfn": o, "gpfn": gp, "new_mfn": n} for o, gp, _, n in exchanged]
    back = [r for r in refs if P.pte_frame(r[2]) not in done]
    rollforward.roll_back(hv, domid, back, [(m, l) for m, l in pins if m not in done])
    res.rolled_back += [m for m, _, _ in grp if m not in done]


def recover(hv: Hypervisor, state_dir) -> Recovery:
    """Complete or roll back the exchange the journal in ``state_dir`` describes, resume the
    guest if xenpage suspended it, and remove the journal (kept if something failed)."""
    recs = read(state_dir)
    res = Recovery(journal=bool(recs), records=len(recs))
    p = journal_path(state_dir)
    begins = [i for i, r in enumerate(recs) if r["op"] == "begin"]
    if not begins:
        if p.exists():
            p.unlink()
        return res
    recs = recs[begins[-1]:]
    res.domid = int(recs[0]["domid"])
    if hv.domain_info(res.domid) is None:
        # the guest is gone (destroyed): its memory went with it, nothing to complete
        p.unlink()
        _fsync_dir(Path(state_dir))
        return res
    if not _apply(hv, recs, res):
        return res  # keep the journal and the guest suspended: try again later
    checkpoint(hv)  # the recovered host is saved before the journal that describes it goes
    p.unlink()
    _fsync_dir(Path(state_dir))
    return res


def describe_os_error(e: OSError) -> str:
    """``<file>: <why>`` of a failed state-file write, on one line."""
    why = e.strerror or str(e) or type(e).__name__
    return f"{e.filename}: {why}" if e.filename else why


def _apply(hv: Hypervisor, recs: list[dict], res: Recovery) -> bool:
    """Complete or roll back each open group of ``recs`` (one ``begin`` and what followed
    it), then resume the guest if xenpage suspended it.  False when something is left."""
    b = recs[0]
    domid = int(b["domid"])
    for g in _groups(recs):
        try:
            _recover_group(hv, domid, g, res)
        except rollforward.Incomplete as e:
            res.errors.append(str(e))
    if res.errors:
        return False
    path = f"/local/domain/{domid}/control/shutdown"
    if not b.get("was_suspended") and hv.xs_read(path) == "suspend":
        hv.xs_write(path, "")  # died while asking: withdraw the request
    info = hv.domain_info(domid)
    if info is not None and info.shutdown and info.shutdown_reason == X.SHUTDOWN_suspend \
            and not b.get("was_suspended"):
        for _ in range(rollforward.RETRIES):
            if hv.resume(domid, fast=True) == 0:
                res.resumed = True
                break
        hv.wait(0)
        if not res.resumed:
            res.errors.append(f"cannot resume d{domid}")
            return False
    # the guest runs (one the killed process resumed but never waited for maps its grant
    # frames and shared_info again)
    hv.wait(0)
    return True
