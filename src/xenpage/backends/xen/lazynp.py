"""numpy for the real-Xen backend, imported on first use.

A dom0 command that touches one frame (``xenpage mem-status MFN``) needs no array library:
the backend answers it with ctypes and ``array('I')``, and numpy is imported only by the
calls that work on many frames (P2M reads, page-table scans, foreign maps)."""
from __future__ import annotations

import importlib
from typing import Any


class _LazyNumpy:
    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        return getattr(importlib.import_module("numpy"), name)


np: Any = _LazyNumpy()
