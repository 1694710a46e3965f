"""How xenpage writes its state files: owner-only and never through a planted link.

xenpage runs as root in dom0 and its write-ahead journals hold copies of guest pages, so the
state directory is created 0700 (and refused when another user owns it), every file in it
0600, and each is opened with ``O_NOFOLLOW``: a symbolic link planted where a journal, a
record, a lock or a log goes is refused, never written through.  Records are replaced
durably (a temporary file fsync'd, renamed over, the directory fsync'd).

Like :mod:`xenpage.paths`, this module imports nothing of xenpage: every layer may use it.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import IO

DIR_MODE = 0o700
FILE_MODE = 0o600


def state_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (0700) if it is missing; refuse one that is a symbolic link or is not
    owned by this user (``PermissionError``)."""
    p = Path(path)
    if p.is_symlink():
        raise PermissionError(f"{p}: the state directory is a symbolic link: refused")
    if p.exists() and not p.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory (the state directory must be one)",
                                 str(p))
    p.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    st = os.lstat(p)
    if st.st_uid != os.geteuid():
        raise PermissionError(f"{p}: the state directory belongs to uid {st.st_uid}, not to "
                              f"this user (uid {os.geteuid()}): refused")
    return p


def open_private(path: str | os.PathLike, mode: str = "a", perm: int = FILE_MODE) -> IO[str]:
    """Open ``path`` for writing (``"w"`` truncates, ``"a"`` appends) as a 0600 file (or
    ``perm``), refusing a symbolic link (``OSError`` ELOOP)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if mode == "w" else os.O_APPEND
    fd = os.open(path, flags, perm)
    try:
        os.fchmod(fd, perm)  # an older file made under a laxer umask
        return os.fdopen(fd, mode)
    except BaseException:
        try:
            os.close(fd)
        except OSError:  # fdopen closed it as it failed (out of memory): keep its error
            pass
        raise


def fsync_dir(d: str | os.PathLike) -> None:
    """Make a rename or a new file in ``d`` durable (a directory that cannot be opened is
    left alone: there is nothing of ours in it to make durable)."""
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_durably(path: str | os.PathLike) -> None:
    """Remove ``path`` if it is there, and make that durable (the directory fsync'd)."""
    p = Path(path)
    p.unlink(missing_ok=True)
    fsync_dir(p.parent)


def replace_durably(path: str | os.PathLike, text: str, perm: int = FILE_MODE) -> None:
    """Write ``text`` to ``path`` so that a crash leaves the old content or the new one:
    ``<path>.tmp`` (0600, or ``perm``; no link followed) fsync'd and renamed over, the
    directory fsync'd."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.is_symlink():
        tmp.unlink()  # never write through it; the rename below replaces a link, not its target
    with open_private(tmp, "w", perm) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_frames(path: str | os.PathLike, frames) -> None:
    """A record of frames (``{"frames": [...]}``), replaced durably."""
    replace_durably(path, json.dumps({"frames": [int(x) for x in frames]}))


def read_frames(path: str | os.PathLike, what: str, nothing: str) -> list[int] | None:
    """The frames of a record written by :func:`write_frames`; None when there is none.  An
    unreadable one raises ValueError naming ``what`` it is and ``nothing`` done about it."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return [int(x) for x in json.loads(path.read_text())["frames"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable {what} ({e}); {nothing}") from e
