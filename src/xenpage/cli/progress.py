"""Watchable long work: progress on a terminal only (rich, loaded when shown).

Nothing here prints when stderr is not a terminal -- scripts and tests see exactly the lines
they saw before -- and rich is imported only when a bar or spinner is actually shown
(``xenpage mem-status`` never loads it)."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Callable, Iterator


def on_terminal() -> bool:
    """Whether progress may be drawn: stderr is a terminal (and not a dumb one)."""
    try:
        return sys.stderr.isatty() and os.environ.get("TERM", "") != "dumb"
    except (AttributeError, ValueError):
        return False


@contextmanager
def frames_progress(what: str, total: int, enabled: bool = True, unit: str = "frames"
                    ) -> Iterator[Callable[[int], None] | None]:
    """A bar over ``total`` frames (or other ``unit``) on stderr while the body runs (removed
    at the end); yields ``advance(n)`` or None when nothing is drawn."""
    if not (enabled and total > 1 and on_terminal()):
        yield None
        return
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn(unit), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n: bar.advance(task, n)


@contextmanager
def activity(what: str) -> Iterator[Callable[[str], None]]:
    """A spinner with ``what`` and the elapsed time on stderr while the body runs (terminal
    only); yields ``say(text)`` to change the text."""
    if not on_terminal():
        yield lambda _text: None
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(what, total=None)
        yield lambda text: bar.update(task, description=text)
