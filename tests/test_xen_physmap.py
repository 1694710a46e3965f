"""Pieces of the real-Xen backend's translated-guest support that run without Xen: the page
data read_pages returns (the toolstack's PageData protocol) and the reading of an ``xl -vvv
migrate`` log.  On Xen they run in the lab (tests_xen/test_pvh.py, test_hvm.py)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, strategies as st

from xenpage.backends.xen.migration import parse_xl_log
from xenpage.backends.xen.physmap import XenPageData
from xenpage.toolstack.hypervisor import MigrationReport


def test_page_data_protocol():
    a = np.arange(3 * 512, dtype=np.uint64).reshape(3, 512)
    d = XenPageData(a)
    assert len(d) == 3
    w = d.words(1)
    w[0] = 7                                     # a copy: the data is untouched
    assert d.array[1, 0] == 512
    d.set_words(2, np.full(512, 9, dtype=np.uint64))
    assert (d.array[2] == 9).all()
    s = d.select(np.array([2, 0]))
    assert len(s) == 2 and (s.array[0] == 9).all() and s.array[1, 1] == 1
    s.set_words(0, np.zeros(512, dtype=np.uint64))
    assert (d.array[2] == 9).all()               # select copies
    assert d == XenPageData(d.array.copy()) and not d == s
    with pytest.raises(ValueError):
        XenPageData(np.zeros((2, 511), dtype=np.uint64))


@given(st.lists(st.integers(0, 2**64 - 1), min_size=512, max_size=512))
def test_page_data_words_round_trip(words):
    d = XenPageData(np.zeros((1, 512), dtype=np.uint64))
    d.set_words(0, np.array(words, dtype=np.uint64))
    assert d.words(0).tolist() == words


def test_report_to_json_has_every_field():
    r = MigrationReport(ok=True, rc=0, error="", new_domid=2, same_host=True, rounds=3, live_rounds=2,
                        pages_sent=40000, downtime_s=0.5, total_s=9.0, stop_reason=None, engine="libxl",
                        log=["x"])
    j = r.to_json()
    assert list(j) == ["ok", "rc", "error", "new_domid", "same_host", "rounds", "live_rounds", "pages_sent",
                       "downtime_s", "total_s", "stop_reason", "engine", "log"]


def test_parse_says_none_where_the_log_is_silent():
    f = parse_xl_log([(0.0, "Parsing config"), (1.0, "migration sender: Target has acknowledged transfer.")])
    assert f["rounds"] is None and f["pages_sent"] is None and f["downtime_s"] is None


#: excerpt of a real ``xl -vvv migrate`` of the lab's PVH guest (Xen 4.17.7, 2026-12-05),
#: with the arrival times xenpage recorded
LAB_LOG = [
    (4.663, "libxl: debug: libxl_domain.c:512:libxl_domain_suspend: Domain 1:ao 0x559f517e9820: create: "
            "how=(nil) callback=(nil) poller=0x559f517ea950"),
    (4.847, "xc: info: Saving domain 1, type x86 HVM"),
    (43.232, "libxl: debug: libxl_dom_suspend.c:203:domain_suspend_callback_common: Domain 1:issuing PVH/HVM "
             "suspend request via XenBus control node"),
    (43.806, "libxl: debug: libxl_dom_suspend.c:358:suspend_common_wait_guest_check: Domain 1:guest has suspended"),
    (45.226, "migration target: Got permission, starting domain."),
    (45.412, "migration target: Domain started successsfully."),
    (48.885, "Migration successful."),
]


def test_parse_real_lab_log():
    f = parse_xl_log(LAB_LOG)
    assert f["downtime_s"] == 2.18          # suspend request -> receiver's start, not libxl_domain_suspend's ao
    assert f["rounds"] is None and f["pages_sent"] is None
