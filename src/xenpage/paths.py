"""Where xenpage keeps its state: the one place that decides, per backend (as psutil makes its
one choice of platform module).

=================  =======================================  ====================================
                   real Xen (``xen``)                       simulator (``sim``)
=================  =======================================  ====================================
state directory    ``/var/lib/xenpage``                     ``$XDG_STATE_HOME/xenpage``
                                                            (default ``~/.local/state/xenpage``)
policy file        ``/etc/xenpage/retired.conf``            ``<state directory>/retired.conf``
host-wide lock     ``/run/xenpage.lock``                    ``<state directory>/lock``
=================  =======================================  ====================================

The state directory holds the write-ahead journal of an exchange (``exchange.journal``), the
split-guard record, the record of dom0's vCPU affinity while it is pinned off pCPU 0, the
retired-page list (``retired.db``) and the service's log positions; on the simulator also the
saved host (``host/``) and the simulated machine-check log (``mcelog``).

``--state-dir DIR`` (or ``$XENPAGE_STATE_DIR``) overrides the state directory on both
backends, and the policy file is then ``DIR/retired.conf`` on both (one self-contained
directory) -- except that ``--state-dir /var/lib/xenpage`` on real Xen is the default itself,
policy in ``/etc/xenpage``.  The host-wide lock on real Xen stays ``/run/xenpage.lock`` whatever the state
directory (``$XENPAGE_LOCK`` moves it, for tests): every xenpage process on the host must
meet on the same lock.

This module imports nothing of xenpage: every layer may ask it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

XEN_STATE_DIR = Path("/var/lib/xenpage")
XEN_CONFIG = Path("/etc/xenpage/retired.conf")
XEN_LOCK = Path("/run/xenpage.lock")
#: dom0's machine-check telemetry on real Xen: the xen-mcelog driver's device (the service's
#: default source; Debian 12 has no mcelog daemon to turn it into a text log)
XEN_MCE_DEVICE = Path("/dev/mcelog")
CONFIG_NAME = "retired.conf"
SIM_LOCK_NAME = "lock"
BACKENDS = ("sim", "xen")


@dataclass(frozen=True)
class StatePaths:
    """Where one backend's xenpage keeps things."""

    backend: str
    #: journal, split-guard and affinity records, retired.db, service state (sim: the host)
    state_dir: Path
    #: the service's policy file (read when it exists)
    config: Path
    #: the lock every xenpage process acting on this host takes
    lock: Path

    @property
    def journal_dir(self) -> Path:
        """Where ``mem-offline`` writes its write-ahead journal (the state directory)."""
        return self.state_dir

    def to_json(self) -> dict:
        return {"backend": self.backend, "state_dir": str(self.state_dir),
                "config": str(self.config), "lock": str(self.lock)}


def sim_state_dir(env: Mapping[str, str] | None = None) -> Path:
    """The simulator's default: ``$XENPAGE_STATE_DIR``, else ``$XDG_STATE_HOME/xenpage``,
    else ``~/.local/state/xenpage``."""
    env = os.environ if env is None else env
    if env.get("XENPAGE_STATE_DIR"):
        return Path(env["XENPAGE_STATE_DIR"])
    base = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "xenpage"


def xen_lock(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("XENPAGE_LOCK") or XEN_LOCK)


def state_paths(backend: str, state_dir: str | Path | None = None,
                env: Mapping[str, str] | None = None) -> StatePaths:
    """The paths of ``backend`` (``sim`` or ``xen``; ``auto`` must be resolved first), with
    ``state_dir`` (``--state-dir``) overriding the state directory and the policy file."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} (sim or xen)")
    env = os.environ if env is None else env
    override = Path(state_dir) if state_dir else None
    if backend == "xen":
        sd = override or (Path(env["XENPAGE_STATE_DIR"]) if env.get("XENPAGE_STATE_DIR")
                          else XEN_STATE_DIR)
        cfg = sd / CONFIG_NAME if sd != XEN_STATE_DIR else XEN_CONFIG
        return StatePaths("xen", sd, cfg, xen_lock(env))
    sd = override or sim_state_dir(env)
    return StatePaths("sim", sd, sd / CONFIG_NAME, sd / SIM_LOCK_NAME)
