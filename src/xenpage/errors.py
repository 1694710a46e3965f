"""Errors every layer may raise and the CLI reports, defined without importing anything (the
CLI catches them without loading the layer that raises them)."""

from __future__ import annotations


class HostFileError(Exception):
    """A saved simulated host that cannot be read (missing, truncated, corrupted)."""
