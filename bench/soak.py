"""``make soak``: at least a million operations on small simulated hosts -- guest workload,
grant and foreign mappings, offline/online/status of frames and ranges, machine checks, guests
created and destroyed, mem-offline runs (a third of them with a hypercall failing at a random
point), HVM live migrations, in-place HVM exchanges and PV ``--fallback=migrate`` migrations --
with the invariant checker and every guest's content check after every
``--check-every`` rules.  Then ``--kills`` rounds of the real ``xenpage mem-offline`` SIGKILLed
after a random delay, ``xenpage recover``, and the checks (``tests/randomkill.py``): how many
kills, how many landed mid-run and with a journal open.  Prints what it covered; exits 1 on
the first problem.

    .venv/bin/python bench/soak.py [--ops 1000000] [--seed 1] [--check-every 25] [--kills 60]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # test support

from simworld import World  # noqa: E402
from xenpage.toolstack.faults import FaultPlan, FaultyHypervisor  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ops", type=int, default=1_000_000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--check-every", type=int, default=25)
    ap.add_argument("--rules-per-host", type=int, default=4000)
    ap.add_argument("--kills", type=int, default=60,
                    help="random-delay SIGKILLs of the real mem-offline (0: none)")
    a = ap.parse_args()
    kills = random_kills(a.kills, a.seed) if a.kills else None
    t0 = time.time()
    ops = rules = checks = hosts = 0
    counts: Counter = Counter()
    outcomes: Counter = Counter()
    faults: Counter = Counter()
    seed = a.seed
    while ops < a.ops:
        w = World(seed)
        hosts += 1
        rng = np.random.default_rng(seed + 10_000)
        for i in range(a.rules_per_host):
            r = w.random_rule()
            kw = {}
            if r == "workload":
                kw["n"] = int(rng.integers(100, 400))
            if r == "mem_offline":
                kw["k"] = int(rng.integers(1, 5))
                if rng.random() < 1 / 3:
                    plan = FaultPlan.fail_at(int(rng.integers(1, 60)),
                                             partial=int(rng.integers(0, 2)))
                    inner, w.hv = w.hv, FaultyHypervisor(w.hv, plan)
                    try:
                        w.do(r, **kw)
                    finally:
                        fh, w.hv = w.hv, inner
                    for _, m, _, e in fh.injected:
                        faults[m] += 1
                    w.counts["mem_offline.with_fault"] += 1
                    rules += 1
                    continue
            w.do(r, **kw)
            rules += 1
            if i % a.check_every == 0:
                p = w.check()
                checks += 1
                if p:
                    print(f"FAILED after {ops + w.ops} operations (host seed {seed}, rule {i} {r}):")
                    for x in p[:20]:
                        print("  ", x)
                    return 1
        p = w.check()
        checks += 1
        if p:
            print(f"FAILED at the end of host seed {seed}: {p[:10]}")
            return 1
        ops += w.ops
        counts.update(w.counts)
        outcomes.update(w.outcomes)
        seed += 1
        print(f"  host {hosts}: {ops:,} operations so far ({time.time() - t0:.0f} s)", flush=True)
    dt = time.time() - t0
    print(f"\nsoak: {ops:,} operations, {rules:,} rules on {hosts} hosts, {checks:,} full "
          f"invariant + content checks, {sum(faults.values())} hypercall faults injected, "
          f"in {dt:.0f} s -- nothing lost")
    print("\nrules:")
    for k, v in sorted(counts.items()):
        print(f"  {k:<28} {v:>9,}")
    print("\nfaults injected into mem-offline, by hypercall:")
    for k, v in sorted(faults.items()):
        print(f"  {k:<28} {v:>9,}")
    print("\noutcomes:")
    for k, v in sorted(outcomes.items()):
        print(f"  {k:<52} {v:>9,}")
    if kills is not None:
        print(kills)
    return 0


def random_kills(n: int, seed: int) -> str:
    """``n`` rounds of tests/randomkill.py; the summary line (AssertionError on a loss)."""
    import shutil
    import tempfile

    import randomkill
    from simworld import small_host
    from xenpage.backends.sim import host_path
    t0 = time.time()
    shm = Path("/dev/shm")
    work = Path(tempfile.mkdtemp(prefix="xenpage-soak-",
                                 dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else None))
    try:
        host, _ = small_host()
        host.save(host_path(work / "base"))
        print(f"random kills: {n} rounds of the real 'xenpage mem-offline' (5 frames, 4 exchange "
              "groups) SIGKILLed after a random delay, then 'xenpage recover'", flush=True)
        c = randomkill.run(work / "base", work, n, seed=seed,
                           log=lambda s: print(s, flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return (f"\nrandom kills: {c['kills']} SIGKILLs of the real mem-offline at random delays "
            f"(half over the whole run, {c['whole_run_ms']} ms, half over its exchanges from "
            f"the journal's appearance, {c['exchange_ms']} ms), "
            f"{c['mid_run']} landed mid-run, {c['journal_open']} with a journal open "
            f"('recover' completed {c['completed_by_recover']} frames and rolled back "
            f"{c['rolled_back_by_recover']}), in {time.time() - t0:.0f} s -- nothing lost: "
            "invariants and content checks clean, guest running with its memory, every frame "
            "retired after a re-run")


if __name__ == "__main__":
    sys.exit(main())
