"""Stateful property test over the simulated host: guests created and destroyed, workload
steps, grant and foreign mappings by dom0, offline/online/status of single frames and
ranges, machine-check (broken) marking, the toolstack's mem-offline flow, HVM live migration
(same host), in-place retirement of HVM and PVH frames and the PV ``--fallback=migrate`` migration, in any order --
with the invariant checker and every guest's content check after every rule.  CI runs 200
examples x 50 steps."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from simworld import SMALL_PVH, World

CI = bool(os.environ.get("CI"))
SEEDS = st.integers(0, 2**32 - 1)


class HostMachine(RuleBasedStateMachine):
    @initialize(seed=SEEDS)
    def boot(self, seed):
        self.w = World(seed, SMALL_PVH)  # HVM and PVH guests: migration and in-place rules

    def _do(self, name, seed, **kw):
        self.w.rng = np.random.default_rng(seed)
        self.w.do(name, **kw)

    @rule(seed=SEEDS, n=st.integers(1, 40))
    def workload(self, seed, n):
        self._do("workload", seed, n=n)

    @rule(seed=SEEDS, mib=st.sampled_from([4, 6, 8]))
    def create_guest(self, seed, mib):
        self._do("create_guest", seed, mib=mib)

    @rule(seed=SEEDS)
    def destroy_guest(self, seed):
        self._do("destroy_guest", seed)

    @rule(seed=SEEDS)
    def grant_map(self, seed):
        self._do("grant_map", seed)

    @rule(seed=SEEDS)
    def grant_unmap(self, seed):
        self._do("grant_unmap", seed)

    @rule(seed=SEEDS)
    def foreign_map(self, seed):
        self._do("foreign_map", seed)

    @rule(seed=SEEDS)
    def foreign_unmap(self, seed):
        self._do("foreign_unmap", seed)

    @rule(seed=SEEDS)
    def offline(self, seed):
        self._do("offline", seed)

    @rule(seed=SEEDS)
    def online(self, seed):
        self._do("online", seed)

    @rule(seed=SEEDS)
    def status(self, seed):
        self._do("status", seed)

    @rule(seed=SEEDS)
    def offline_range(self, seed):
        self._do("offline_range", seed)

    @rule(seed=SEEDS)
    def online_range(self, seed):
        self._do("online_range", seed)

    @rule(seed=SEEDS)
    def mark_broken(self, seed):
        self._do("mark_broken", seed)

    @rule(seed=SEEDS, k=st.integers(1, 4))
    def mem_offline(self, seed, k):
        self._do("mem_offline", seed, k=k)

    @rule(seed=SEEDS)
    def hvm_migrate(self, seed):
        self._do("hvm_migrate", seed)

    @rule(seed=SEEDS, k=st.integers(1, 3))
    def hvm_exchange(self, seed, k):
        self._do("hvm_exchange", seed, k=k)

    @rule(seed=SEEDS)
    def pv_fallback_migrate(self, seed):
        self._do("pv_fallback_migrate", seed)

    @invariant()
    def consistent(self):
        if hasattr(self, "w"):
            assert self.w.check() == []


HostMachine.TestCase.settings = settings(
    max_examples=200 if CI else 30, stateful_step_count=50, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
test_host_state_machine = HostMachine.TestCase
