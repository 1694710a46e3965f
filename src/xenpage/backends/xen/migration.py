"""Live migration on real Xen 4.17 through libxl: ``xl migrate``, never a re-implementation of
the stream.

A same-host migration runs both ends here, as Xen's own test system does: ``xl migrate -s ""
<domid> "xl migrate-receive"`` -- with an empty ssh command ``xl`` runs the "host" string as
the receiving command through ``sh -c`` (xl's ``create_migration_child``), connected to the
sender by pipes.  Both ends run with ``-vvv``, so libxenguest's save loop
(``xg_sr_save.c``: ``send_memory_live`` names each iteration ``Frames iteration N of M`` and
reports its progress as ``done/total``) and libxl's suspend messages reach the log; every line
is time-stamped as it arrives, which gives the downtime of :class:`MigrationReport`.  Debian's
libxl-save-helper passes no iteration progress on, so the receiver runs behind a relay that
reads the stream on its way for the rounds and pages sent (:mod:`.streamcount`).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from ...abi import errno as E
from ...toolstack.hypervisor import MigrationReport
from . import streamcount

XL = "xl"
TIMEOUT_S = 900.0
#: where Debian and Xen's own install put ``xl``, for a caller whose PATH lacks them
SBIN = "/usr/sbin:/sbin:/usr/local/sbin"


def xl_path() -> str:
    """``xl`` by absolute path: the receiving end runs through ``sh -c`` in the sender's
    environment, and a PATH without /usr/sbin (a service's, a user's) makes it exit 127
    ("command not found") -- seen once as "migration transport process exited with error
    status 127"."""
    return shutil.which(XL) or shutil.which(XL, path=SBIN) or XL

RX_ITER = re.compile(r"Frames iteration (\d+)(?: of (\d+))?")
RX_PROGRESS = re.compile(r"Frames iteration (\d+)(?: of \d+)?:\s*(\d+)/(\d+)")
#: libxl_dom_suspend.c asking the guest to suspend (the guest stops running soon after)
RX_SUSPEND = re.compile(r"issuing .*suspend request|guest has suspended|Domain \d+:suspend")
#: xl's receiver: the new domain unpaused (xl's own spelling, "successsfully")
RX_STARTED = re.compile(r"migration target: Domain started|Migration successful")
RX_FAILED = re.compile(r"(?:ERROR|error|failed|Failed)")


def _reader(stream, out: list, t0: float) -> None:
    buf = b""
    while True:
        chunk = stream.read1(4096) if hasattr(stream, "read1") else stream.read(4096)
        if not chunk:
            break
        buf += chunk
        parts = re.split(rb"[\r\n]", buf)
        buf = parts.pop()
        now = time.monotonic() - t0
        for p in parts:
            if p.strip():
                out.append((now, p.decode(errors="replace").rstrip()))
    if buf.strip():
        out.append((time.monotonic() - t0, buf.decode(errors="replace").rstrip()))


def parse_xl_log(lines: list[tuple[float, str]]) -> dict:
    """Figures from a time-stamped ``xl -vvv migrate`` log: iterations, pages sent (the last
    ``done`` count of each iteration's progress), and the downtime from libxl's suspend
    request to the receiver's "Domain started".  A figure the log does not show is None: on
    Debian's Xen 4.17 libxl-save-helper passes none of libxenguest's iteration progress to
    xl, so rounds and pages are None there (lab, 2026-12-05)."""
    last_done: dict[int, int] = {}
    iters: set[int] = set()
    t_suspend = t_started = None
    for t, line in lines:
        m = RX_ITER.search(line)
        if m:
            iters.add(int(m.group(1)))
        p = RX_PROGRESS.search(line)
        if p:
            last_done[int(p.group(1))] = int(p.group(2))
        if t_suspend is None and RX_SUSPEND.search(line):
            t_suspend = t
        if RX_STARTED.search(line) and t_started is None:
            t_started = t
    rounds = max(iters) if iters else None
    down = round(t_started - t_suspend, 3) if t_suspend is not None and t_started is not None \
        and t_started >= t_suspend else None
    return {"rounds": rounds, "pages_sent": sum(last_done.values()) if last_done else None,
            "per_round": [last_done.get(i) for i in sorted(iters)] if iters else None,
            "downtime_s": down, "t_suspend": t_suspend, "t_started": t_started}


#: where a host keeps xl's own logs; each migration's whole ``xl -vvv`` log is appended to
#: ``xenpage-migrate-d<domid>.log`` there (a failed migration's report holds only its last line)
LOG_DIR = "/var/log/xen"


def _keep_log(domid: int, log: list[str]) -> None:
    if not os.path.isdir(LOG_DIR):
        return
    try:
        with open(os.path.join(LOG_DIR, f"xenpage-migrate-d{domid}.log"), "a") as f:
            f.write(time.strftime("# %Y-%m-%d %H:%M:%S\n") + "\n".join(log) + "\n")
    except OSError:
        pass


def _stream_stats(path: str) -> dict | None:
    """The relay's figures (streamcount.py), and the file removed; None when it wrote none."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


class MigrationMixin:
    """``live_migrate`` of :class:`~xenpage.backends.xen.hypervisor.XenHypervisor`."""

    def live_migrate(self, domid: int, destination: str | None = None) -> MigrationReport:
        """Live-migrate ``domid`` with ``xl migrate`` (libxl + libxenguest).  ``destination``
        None (or ``localhost``): this host, both ends here -- refused with -ENOMEM, nothing
        done, unless Xen's free memory holds a second copy of the guest.  Otherwise a host
        name given to ``xl migrate``'s ssh transport.  Run with dom0 off physical CPU 0
        (:mod:`xenpage.toolstack.pcpu`): the old domain, which may hold offline-pending frames,
        is destroyed at the end."""
        from ...toolstack.pcpu import off_pcpu0
        t0 = time.monotonic()
        same = destination in (None, "", "localhost")

        def fail(rc: int, msg: str, log: list[str] | None = None) -> MigrationReport:
            return MigrationReport(ok=False, rc=rc, error=msg, new_domid=None, same_host=same,
                                   rounds=None, live_rounds=None, pages_sent=None, downtime_s=None,
                                   total_s=round(time.monotonic() - t0, 3), stop_reason=None,
                                   engine="libxl", log=log or [])

        info = self.domain_info(domid)
        if info is None:
            return fail(-E.ESRCH, f"no domain {domid}")
        if domid == 0:
            return fail(-E.EINVAL, "dom0 cannot be migrated")
        if same:
            free = self.physinfo().free_pages
            if free < info.tot_pages:
                return fail(-E.ENOMEM, f"no room for a second copy of d{domid} on this host: "
                                       f"{free} free pages < {info.tot_pages} of the guest")
            xl = xl_path()
            receive = [xl, "-vvv", "migrate-receive"]
            stats = None
            if os.environ.get("XENPAGE_MIGRATE_RELAY", "1") != "0":
                # the receiver behind a relay that reads the stream for rounds and pages
                # (streamcount.py: Debian's libxl-save-helper logs neither)
                fd, stats = tempfile.mkstemp(prefix="xenpage-migrate-", suffix=".json")
                os.close(fd)        # empty until the relay replaces it with its figures
                receive = [sys.executable, streamcount.__file__, stats] + receive
            argv = [xl, "-vvv", "migrate", "-s", "", str(domid), " ".join(shlex.quote(a) for a in receive)]
        else:
            argv = [xl_path(), "-vvv", "migrate", str(domid), destination]
        lines: list[tuple[float, str]] = []
        with off_pcpu0(self):
            t_start = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT)
            th = threading.Thread(target=_reader, args=(proc.stdout, lines, t_start), daemon=True)
            th.start()
            try:
                rc = proc.wait(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
                lines.append((time.monotonic() - t_start, f"[xenpage: xl migrate killed after {TIMEOUT_S:.0f} s]"))
            th.join(timeout=10)
        log = [f"{t:9.3f} {s}" for t, s in lines]
        log.insert(0, "$ " + " ".join(shlex.quote(a) for a in argv))
        sent = _stream_stats(stats) if same and stats else None
        if sent:
            log.append(f"[xenpage: the stream as the relay read it: {json.dumps(sent)}]")
        _keep_log(domid, log)
        if rc != 0:     # xl's exit status is no errno: -EIO, with xl's last error line
            errs = [s for _, s in lines if RX_FAILED.search(s)]
            return fail(-E.EIO, f"xl migrate exited {rc}: " + (errs[-1] if errs else (lines[-1][1] if lines else "")),
                        log)
        fig = parse_xl_log(lines)
        if sent and sent.get("rounds"):
            fig.update(rounds=sent["rounds"], pages_sent=sent["pages_sent"], per_round=sent["per_round"])
        new = None
        if same:
            for d in self.domain_list():
                if d.name == info.name and d.domid != domid:
                    new = d.domid
        # libxenguest's last iteration is the one sent suspended
        live = fig["rounds"] - 1 if sent and sent.get("rounds") else None
        return MigrationReport(ok=True, rc=0, error="", new_domid=new, same_host=same, rounds=fig["rounds"],
                               live_rounds=live, pages_sent=fig["pages_sent"],
                               downtime_s=fig["downtime_s"], total_s=round(time.monotonic() - t0, 3),
                               stop_reason=None, engine="libxl", log=log)
