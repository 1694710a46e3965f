"""The Dask cluster a fleet job runs on (``xenpage fleet study|inventory``): an existing one
given its scheduler's address, or a ``LocalCluster`` on this machine -- one single-threaded
worker process per core by default (the work is Python holding the GIL), or threads of this
process.  Needs the ``[fleet]`` extra (dask[distributed], pyarrow)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

FLEET_EXTRA = "fleet"


class FleetExtraMissing(RuntimeError):
    pass


def need_fleet_extra() -> None:
    """Raise :class:`FleetExtraMissing` naming the extra when dask or pyarrow is missing."""
    missing = []
    for mod in ("distributed", "pyarrow"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise FleetExtraMissing(
            f"{' and '.join(missing)} not installed: install xenpage with its [{FLEET_EXTRA}] extra "
            f"(pip install 'xenpage[{FLEET_EXTRA}]')")


@contextmanager
def client(scheduler: str | None = None, workers: int | None = None,
           threads: bool = False, memory_limit: str | None = None) -> Iterator[object]:
    """A ``distributed.Client``: on ``scheduler`` (``tcp://host:8786``, or a scheduler file
    path) when given; else on a new LocalCluster of ``workers`` (default: one per core)
    single-threaded worker processes, or one process with ``workers`` threads."""
    need_fleet_extra()
    import dask
    from distributed import Client, LocalCluster
    if scheduler:
        kw = {"scheduler_file": scheduler} if os.path.isfile(scheduler) else {"address": scheduler}
        with Client(**kw) as c:
            yield c
        return
    n = workers or os.cpu_count() or 1
    with dask.config.set({"distributed.worker.daemon": False,
                          "distributed.admin.system-monitor.gil.enabled": False}):
        if threads:
            cl = LocalCluster(n_workers=1, threads_per_worker=n, processes=False,
                              dashboard_address=None)
        else:
            cl = LocalCluster(n_workers=n, threads_per_worker=1, processes=True,
                              dashboard_address=None, memory_limit=memory_limit or "auto")
        with cl, Client(cl) as c:
            yield c


def describe(c) -> dict:
    """Workers and threads of a client's cluster."""
    info = c.scheduler_info()
    ws = info.get("workers", {})
    return {"scheduler": info.get("address", ""), "workers": len(ws),
            "threads": sum(w.get("nthreads", 1) for w in ws.values())}
