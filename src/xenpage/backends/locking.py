"""The lock files of both backends: an exclusive ``flock`` taken without following a planted
symbolic link (``O_NOFOLLOW``), created owner-only (0600), with the holder's pid written in it,
a line on stderr while another xenpage holds it, and an optional timeout -- so that two
processes that each wait for the other's lock (``mem-offline --migrate-to B`` on host A while
the same runs from B to A) give up with a message instead of waiting for ever."""

from __future__ import annotations

import fcntl
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

POLL = 0.05


class LockTimeout(Exception):
    """The lock stayed held by another process for the whole timeout: nothing was done."""


@contextmanager
def locked(path: str | os.PathLike, timeout: float | None = None, quiet: bool = False,
           record: bool = True) -> Iterator[Path]:
    """Hold ``path``'s lock for the body; ``timeout`` None waits for ever (saying so once).
    ``record``: write this process's pid in the lock file (and clear it on release); a
    command that only reads (``open_host(save=False)``) leaves the file as it was."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    except OSError as e:
        raise LockTimeout(f"cannot open the lock {path}: {e.strerror or e}"
                          + (" (a symbolic link: refused)" if path.is_symlink() else "")) from None
    spinner = None
    try:
        start = time.monotonic()
        said = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                if timeout is not None and time.monotonic() - start >= timeout:
                    raise LockTimeout(f"{path} is held by another xenpage process (pid {holder}); "
                                      f"gave up after {timeout:g} s") from None
                if not said and not quiet:
                    sys.stderr.write(f"xenpage: waiting for another xenpage holding {path} "
                                     f"(pid {holder})\n")
                    said = True
                    spinner = _spinner(f"waiting for another xenpage holding {path} (pid {holder}) ...")
                time.sleep(POLL)
        if spinner is not None:
            spinner.stop()
            spinner = None
            sys.stderr.write(f"xenpage: got {path} after {time.monotonic() - start:.1f} s\n")
        if record:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            if record:
                os.ftruncate(fd, 0)  # no stale pid for the next waiter to name
    finally:
        if spinner is not None:
            spinner.stop()
        os.close(fd)  # releases the lock


def _spinner(text: str):
    """A rich spinner with the elapsed time on stderr while the wait lasts, on a terminal
    only (rich is loaded only then); its ``stop()`` removes it.  None elsewhere."""
    try:
        if not sys.stderr.isatty() or os.environ.get("TERM", "") == "dumb":
            return None
    except (AttributeError, ValueError):
        return None
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    bar = Progress(SpinnerColumn(), TextColumn(text), TimeElapsedColumn(),
                   console=Console(stderr=True), transient=True)
    bar.add_task(text, total=None)
    bar.start()
    return bar
