"""Named points of ``mem-offline`` where a crash test may stop the toolstack dead.

The product only *names* the points: :func:`reached` calls :data:`hook`, which is ``None`` in
the product -- nothing reads the environment, nothing can make an installed xenpage kill
itself.  The crash tests install a hook (``tests/crashrun.py``: ``python tests/crashrun.py
--crash-at POINT[:K] -- <xenpage argv>`` runs the CLI with a hook that sends itself SIGKILL
at the K-th time POINT is reached).  The hook gets the backend where one is at hand, so that
a simulated host can be saved first (a real one keeps its state by itself).
"""

from __future__ import annotations

from typing import Callable, Optional

#: every point, in the order they happen in one exchange group (``<record>`` just before the
#: journal record is durable, ``<record>+`` just after), then ``guarded`` (split-guard frames
#: held, before marking), ``pinned`` (dom0's vCPUs just pinned off physical CPU 0),
#: ``migrating`` and ``migrated`` (a migration's frames unmarked and recorded, before and after
#: the migration: retire.py)
POINTS = ("begin", "begin+", "suspended", "clearing", "clearing+", "cleared", "unpinning",
          "unpinning+", "unpinned", "snapshot", "snapshot+", "exchanged", "exchanged+",
          "copied", "p2m", "done", "done+", "resumed", "end")
#: the in-place retirement of a translated guest's frames (hvm_exchange.py), in order
HVM_POINTS = ("hvm-begin", "hvm-begin+", "hvm-snapshot", "hvm-snapshot+", "hvm-decreased",
              "hvm-unpausing", "hvm-unpausing+", "hvm-end")
OTHER_POINTS = ("guarded", "pinned", "migrating", "migrated") + HVM_POINTS

#: ``hook(point, hv_or_None)``; None in the product (only the tests install one)
hook: Optional[Callable[[str, object], None]] = None


def reached(point: str, hv=None) -> None:
    """``point`` is reached: call the installed hook, if any."""
    h = hook
    if h is not None:
        h(point, hv)
