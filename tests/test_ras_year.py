"""A (short) year in seconds: field-like errors replayed through the service on simulated
time, accounted for error by error, beside the published figures, with a plot."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from xenpage.backends.sim import DefaultHostSpec
from xenpage.hypervisor import invariants
from xenpage.backends.sim.field import FieldParams
from xenpage.backends.sim import year
from xenpage.ras.thresholds import Policy

SPEC = DefaultHostSpec(mem_mib=512, dom0_mib=64, pv_guests=(("web", 224),), hvm_guests=(("win", 96),), pvh_guests=())
PARAMS = FieldParams(median_errors=150, sigma=1.0, faulty_dimms=2, ue_scale=20.0)


@pytest.fixture(scope="module")
def report():
    return year.compare(("off", "first-error", "rasdaemon"), seeds=(3, 4), days=60, spec=SPEC,
                        params=PARAMS)


def test_every_error_is_accounted_for(report):
    tr = report["trace"]
    assert tr["hosts"] == 2 and tr["errors"] > 50
    for r in report["results"]:
        assert r["seen"] + r["avoided"] == r["errors"] == tr["errors"]
        assert r["seen_uncorrected"] + r["avoided_uncorrected"] == r["uncorrected"] == tr["uncorrected"]
        assert sum(r["seen_by_owner"].values()) == r["seen"]
        assert r["memory_lost_kib"] == 4 * r["retired"]
        assert r["restart_failures"] == []
        tl = r["timeline"]
        assert len(tl["avoided"]) == 61
        assert tl["avoided"][-1] == r["avoided"] and tl["seen"][-1] == r["seen"]
        assert (np.diff(tl["avoided"]) >= 0).all() and (np.diff(tl["errors"]) >= 0).all()


def test_policies_rank_as_expected(report):
    by = {r["name"]: r for r in report["results"]}
    assert by["off"]["retired"] == 0 and by["off"]["suspends"] == 0
    assert by["first-error"]["avoided"] > by["rasdaemon"]["avoided"] >= by["off"]["avoided"]
    assert by["first-error"]["retired"] > by["rasdaemon"]["retired"]
    assert by["first-error"]["avoided_fraction"] <= report["oracle_first_error"] + 1e-9
    # the frames that stay pending are dom0's and the HVM guest's (or broken, in use)
    assert set(by["first-error"]["pending_by_reason"]) <= {"dom0", "migration-needed", "xen-mce",
                                                           "broken", "anonymous", "granted"}


def test_markdown_and_plot(report, tmp_path):
    md = year.markdown(report)
    assert "Hwang et al., ASPLOS 2012" in md and "Meza et al., DSN 2015" in md
    assert "| first-error |" in md and "2 host-years" in md
    p = year.plot(report, tmp_path / "y.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000


def test_run_year_leaves_a_sound_host():
    host = year.pristine_host(SPEC)
    trace = year.make_trace(SPEC, seed=3, days=60, params=PARAMS, host=host)
    h = copy.deepcopy(host)
    r = year.run_year(Policy.named("first-error"), "first-error", trace=trace, spec=SPEC, host=h)
    assert r.errors == len(trace) and r.retired > 0
    assert invariants.check(h) == []
    for g in h.guests.values():
        assert g.verify() == []
    assert r.boot_option.startswith("badpage=0x")


def test_oracle():
    class T:
        def __init__(self, m):
            self.mfn = np.array(m)

        def __len__(self):
            return len(self.mfn)
    assert year.oracle_first_error([T([1, 1, 1, 2]), T([5])]) == pytest.approx(2 / 5)
