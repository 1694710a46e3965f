"""``mem-offline``'s options for frames the PV exchange cannot retire:

* ``--hvm=migrate|exchange|none`` -- an HVM/PVH guest's frames: live-migrate the guest
  (default), retire them in place (decrease_reservation + populate_physmap under a pause), or
  leave them pending as xen-hptool;
* ``--fallback=migrate`` -- PV frames left pending because they are granted or mapped
  elsewhere: live-migrate their guest (and, with ``--hvm=exchange``, an HVM/PVH frame that is
  granted or stays referenced);
* ``--migrate-to=DIR`` -- migrate to the simulated host saved in DIR (default: the same
  host, when it has room);
* ``--link=MBITS[:LATENCY_MS]`` -- the simulated link (default: 1 Gbit/s to another host,
  loopback to the same host).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..toolstack.retire import FALLBACKS, HVM_METHODS, RetireOptions


#: seconds to wait for the ``--migrate-to`` host's lock while holding this host's
DEST_LOCK_TIMEOUT = 10.0


@dataclass
class RetireArgs:
    hvm: str = "migrate"
    fallback: str | None = None
    migrate_to: Path | None = None
    link: tuple[float, float] | None = None

    @contextmanager
    def open(self, hv, state_dir: Path | None = None):
        """The :class:`RetireOptions`, with the destination host opened (and saved back).
        ``state_dir``: this host's (a ``--migrate-to`` naming it means the same host).
        ``--link`` and ``--migrate-to`` are the simulator's (its migration model's link, a
        second saved simulated host, which must exist: it is never created here)."""
        if (self.link or self.migrate_to is not None) and hv.kind != "sim":
            raise ValueError("--migrate-to and --link are the simulator's; on real Xen use xl migrate")
        if self.link:
            from ..backends.sim.migrate import Link
            hv.migration_link = Link(self.link[0] * 1e6, self.link[1] / 1e3, f"{self.link[0]:g} Mbit/s")
        if self.migrate_to is None or (state_dir is not None and
                                       Path(self.migrate_to).resolve() == Path(state_dir).resolve()):
            yield RetireOptions(self.hvm, self.fallback, None)
            return
        from ..backends.sim import open_host
        # this host's lock is held: the destination's is waited for a bounded time, so two
        # processes migrating towards each other give up instead of waiting for ever
        with open_host(Path(self.migrate_to), create=False, timeout=DEST_LOCK_TIMEOUT) as dst:
            yield RetireOptions(self.hvm, self.fallback, dst)


def retire_options(args: list[str]) -> tuple[list[str], RetireArgs]:
    """Take the options out of ``args`` (``--opt=value`` or ``--opt value``)."""
    out = RetireArgs()
    rest: list[str] = []
    it = iter(args)
    for a in it:
        name, eq, val = a.partition("=")
        if name not in ("--hvm", "--fallback", "--migrate-to", "--link"):
            rest.append(a)
            continue
        if not eq:
            val = next(it, None)
            if val is None:
                raise ValueError(f"{name} needs a value")
        if name == "--hvm":
            if val not in HVM_METHODS:
                raise ValueError(f"--hvm takes one of {', '.join(HVM_METHODS)}")
            out.hvm = val
        elif name == "--fallback":
            if val not in [f for f in FALLBACKS if f]:
                raise ValueError("--fallback takes 'migrate'")
            out.fallback = val
        elif name == "--migrate-to":
            out.migrate_to = Path(val)
        else:
            try:
                bw, _, lat = val.partition(":")
                out.link = (float(bw), float(lat) if lat else 0.1)
                # finite: float() reads 'inf' and 'nan', and NaN passes every comparison
                if not (math.isfinite(out.link[0]) and math.isfinite(out.link[1])) \
                        or out.link[0] <= 0 or out.link[1] < 0:
                    raise ValueError
            except ValueError:
                raise ValueError("--link takes MBITS[:LATENCY_MS], e.g. 1000:0.1") from None
    return rest, out
