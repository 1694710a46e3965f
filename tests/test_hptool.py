"""xen-hptool's ``mem-offline``/``mem-online``/``mem-status`` as Xen 4.17 ships it
(xen-semantics.md 6.1-6.5), on the simulated host, in-process: the exact lines, on the exact
streams (stdout and stderr kept apart, trailing newlines included), and the exit codes --
typos, misleading messages and missing newlines included.

``toolstack.hptool.mem_offline`` is the *stock* tool (it stops where xen-hptool stops: an
owner with no suspend event channel); xenpage's own ``mem-offline`` command builds on it and
is tested through the CLI in test_cli.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from simworld import occupy_freed_fixed_frames

from xenpage.abi import sysctl as S
from xenpage.abi.xen import SHUTDOWN_crash
from xenpage.backends.sim import SimHypervisor
from xenpage.hypervisor import sysctl
from xenpage.toolstack import hptool
from xenpage.toolstack.pcpu import SinglePcpuHost

HELP = (
    "xen-hptool: Xen CPU/memory hotplug tool\n"
    "Usage: xen-hptool <command> [args]\n"
    "Commands:\n"
    "  help                     display this help\n"
    "  cpu-online    <cpuid>    online CPU <cpuid>\n"
    "  cpu-offline   <cpuid>    offline CPU <cpuid>\n"
    "  mem-online    <mfn>      online MEMORY <mfn>\n"
    "  mem-offline   <mfn>      offline MEMORY <mfn>\n"
    "  mem-status    <mfn>      query Memory status<mfn>\n"
    "  smt-enable               onlines all SMT threads\n"
    "  smt-disable              offlines all SMT threads\n"
)


def streams(r):
    return r.stdout, r.stderr, r.exit_code


def free_frame(host, k=0):
    head, order = max(host.heap.chunks(), key=lambda c: (c[1], c[0]))
    return head + (1 << order) // 2 + k


def dom_frame(host, domid, k=0):
    f = host.owned_frames(domid)
    return int(f[len(f) // 2 + k])


# -- 6.1 the command line -----------------------------------------------------------------------

def test_help_text_is_xen_hptools():
    assert hptool.HELP == HELP


@pytest.mark.parametrize("word,name", [
    ("help", "help"), ("h", "help"), ("", "help"),
    ("mem-", "mem-status"), ("mem", "mem-status"), ("m", "mem-status"),
    ("mem-s", "mem-status"), ("mem-status", "mem-status"),
    ("mem-o", "mem-online"), ("mem-on", "mem-online"), ("mem-online", "mem-online"),
    ("mem-of", "mem-offline"), ("mem-offline", "mem-offline"),
    ("c", "cpu-online"), ("cpu-", "cpu-online"), ("cpu-of", "cpu-offline"),
    ("s", "smt-enable"), ("smt-d", "smt-disable"),
    ("mem-q", None), ("mem-query", None), ("mem-offline2", None), ("bogus-command", None),
    ("HELP", None), ("-x", None),
])
def test_commands_match_by_prefix_in_table_order(word, name):
    assert hptool.match_command(word) == name


@pytest.mark.parametrize("arg,value", [
    ("3fff0", 0x3FFF0), ("0x3fff0", 0x3FFF0), ("0X3FFF0", 0x3FFF0),
    ("A0", 0xA0), ("0", 0), ("ffffffff", 0xFFFFFFFF), ("000000a0", 0xA0),
])
def test_parse_mfn_takes_hex_digits_with_an_optional_0x(arg, value):
    assert hptool.parse_mfn(arg) == value


@pytest.mark.parametrize("arg,why", [
    ("zz", "not a hexadecimal"), ("", "not a hexadecimal"), ("g1", "not a hexadecimal"),
    # what xen-hptool's sscanf("%lx") would read as another frame (issue 15): refused
    ("3f1o0", "read it as 3f1"), ("3fff0zz", "read it as 3fff0"), ("3f1zz", "read it as 3f1"),
    ("  a0", "not a hexadecimal"), ("a0 ", "not a hexadecimal"), ("+10", "not a hexadecimal"),
    ("0x", "not a hexadecimal"), ("0x-5", "not a hexadecimal"), ("-0", "negative"),
    ("-1", "negative"), ("-a0", "negative"),
    ("100000000", "32-bit"), ("0x1ffffffff", "32-bit"), ("ffffffffffffffffffff", "32-bit"),
])
def test_parse_mfn_refuses_what_hptool_would_garble(arg, why):
    with pytest.raises(hptool.BadMfn, match=why):
        hptool.parse_mfn(arg)


# -- 6.2 mem-offline (stock) ----------------------------------------------------------------------

def test_offline_invalid_mfn(hv):
    # the 0x01010101 pattern makes hptool print the XEN_PAGE message (7.B2)
    r = hptool.mem_offline(hv, 0x7FFF0)
    assert streams(r) == ("Prepare to offline MEMORY mfn 7fff0\n",
                          "Offlining page mfn 7fff0 failed, error 16\n"
                          "XEN_PAGE is not permitted be offlined\n", 1)


@pytest.mark.parametrize("mfn", [0x7FA00, 0x7FDA6])
def test_offline_xen_image(hv, mfn):
    r = hptool.mem_offline(hv, mfn)
    assert streams(r) == (f"Prepare to offline MEMORY mfn {mfn:x}\n",
                          f"Offlining page mfn {mfn:x} failed, error 1\n"
                          "XEN_PAGE is not permitted be offlined\n", 1)


@pytest.mark.parametrize("mfn", [0xA0, 0xF0])
def test_offline_non_ram_gets_the_wrong_message(hv, mfn):
    # FAILED is in both masks: "RESERVED RAM is not permitted to be offlined" is unreachable
    r = hptool.mem_offline(hv, mfn)
    assert streams(r) == (f"Prepare to offline MEMORY mfn {mfn:x}\n",
                          f"Offlining page mfn {mfn:x} failed, error 16\n"
                          "XEN_PAGE is not permitted be offlined\n", 1)
    assert "RESERVED RAM" not in r.stderr


def test_offline_free_page(hv, host):
    m = free_frame(host)
    r = hptool.mem_offline(hv, m)
    assert streams(r) == (f"Prepare to offline MEMORY mfn {m:x}\n"
                          f"Memory mfn {m:x} offlined successfully, current state is [PG_OFFLINE_OFFLINED]\n",
                          "", 0)
    # and again: already offlined is answered the same
    assert streams(hptool.mem_offline(hv, m)) == streams(r)


def test_offline_already_broken_offlined_page_never_says_broken_before(hv, host):
    m = free_frame(host)
    sysctl.machine_check_offline(host, m)
    r = hptool.mem_offline(hv, m)
    # the sysctl passes broken=0, so "already marked broken before" is unreachable (7.B3)
    assert streams(r) == (f"Prepare to offline MEMORY mfn {m:x}\n"
                          f"Memory mfn {m:x} offlined successfully, current state is [PG_OFFLINE_OFFLINED]\n",
                          "", 0)


def test_offline_xen_heap_page(hv, host):
    m = host.xenheap_internal[0]
    r = hptool.mem_offline(hv, m)
    assert streams(r) == (f"Prepare to offline MEMORY mfn {m:x}\n",
                          f"Memory mfn {m:x} offlined succssefully,this page is xen page, current state is"
                          " [PG_OFFLINE_PENDING, PG_OFFLINE_XENPAGE]\n", 1)


def test_offline_anonymous_page(hv, host):
    m = host.anonymous[0]
    r = hptool.mem_offline(hv, m)
    assert streams(r) == (f"Prepare to offline MEMORY mfn {m:x}\n",
                          f"Memory mfn {m:x} offline failed\nthe memory is an anonymous page!\n", 1)
    # but it is now pending (7.C1)
    assert streams(hptool.mem_status(hv, m))[0].endswith(
        "Memory Status 8: [ PAGE_OFFLINE_PENDING  PAGE_ONLINED ]\n")


@pytest.mark.parametrize("domid", [0, 1, 2], ids=["dom0", "pv", "hvm"])
def test_offline_owned_page_without_suspend_port(hv, host, domid):
    m = dom_frame(host, domid)
    r = hptool.mem_offline(hv, m)
    assert streams(r) == (f"Prepare to offline MEMORY mfn {m:x}\n",
                          f"DOM{domid}: No suspend port, try live migration\n"
                          f"Failed to suspend guest {domid} for mfn {m:x}\n", 1)
    assert hptool.mem_status(hv, m).stdout.endswith(
        "Memory Status 8: [ PAGE_OFFLINE_PENDING  PAGE_ONLINED ]\n")
    # retrying an already pending page answers the same
    assert streams(hptool.mem_offline(hv, m)) == streams(r)


def test_offline_domid_io_frame(hv):
    # lab: "mem-offline zz" hit mfn 0: DOM32753 is DOMID_IO
    r = hptool.mem_offline(hv, 0)
    assert streams(r) == ("Prepare to offline MEMORY mfn 0\n",
                          "DOM32753: No suspend port, try live migration\n"
                          "Failed to suspend guest 32753 for mfn 0\n", 1)


def test_offline_pod_cache_page(hv, host):
    occupy_freed_fixed_frames(host)
    d = host.domains[2]
    d.max_pages += 2
    cache = [host.alloc_domheap_pages(d, 0) for _ in range(2)]
    d.pod_cache.extend(cache)
    r = hptool.mem_offline(hv, cache[0])
    assert streams(r) == (f"Prepare to offline MEMORY mfn {cache[0]:x}\n"
                          f"Memory mfn {cache[0]:x} offlined successfully, current state is [PG_OFFLINE_OFFLINED]\n",
                          "", 0)


def test_offline_broken_owned_page_is_silent_and_crashes_the_owner(hv, host):
    m = dom_frame(host, 1)
    sysctl.machine_check_offline(host, m)
    r = hptool.mem_offline(hv, m)
    # PG_OFFLINE_AGAIN: nothing printed, exit 0, although Xen crashed the guest (7.B4)
    assert streams(r) == (f"Prepare to offline MEMORY mfn {m:x}\n", "", 0)
    assert r.data["status"]["status"] == 0x10
    info = hv.domain_info(1)
    assert info.shutdown and info.shutdown_reason == SHUTDOWN_crash


def test_offline_with_published_suspend_port_is_not_exchanged_by_the_stock_path(hv, host):
    m = dom_frame(host, 1)
    host.xenstore.write(1, "/local/domain/1/device/suspend/event-channel", "7")
    r = hptool.mem_offline(hv, m)
    assert r.exit_code == 1
    assert r.stdout == f"Prepare to offline MEMORY mfn {m:x}\n"


def test_offline_restores_dom0_affinity(hv, host):
    before = [list(a) for a in host.domains[0].affinity]
    hptool.mem_offline(hv, dom_frame(host, 1))
    assert host.domains[0].affinity == before


def test_offline_on_a_single_pcpu_host_refuses(small_host):
    h = small_host(nr_pcpus=1)
    with pytest.raises(SinglePcpuHost):
        hptool.mem_offline(SimHypervisor(h), free_frame(h))


# -- 6.4 mem-online -------------------------------------------------------------------------------

def test_online_invalid_mfn_has_no_newline(hv):
    r = hptool.mem_online(hv, 0x100000)
    assert streams(r) == ("Prepare to online MEMORY mfn 100000\n",
                          "Onlining page mfn 100000 failed, error 16", 1)


@pytest.mark.parametrize("how", ["free-then-mce", "owned-then-mce"])
def test_online_broken_page_has_the_generic_failure(hv, host, how):
    m = free_frame(host) if how == "free-then-mce" else dom_frame(host, 1)
    sysctl.machine_check_offline(host, m)
    r = hptool.mem_online(hv, m)
    # -EINVAL with status 0x2008: "is broken, Memory online failed" is unreachable (7.B3)
    assert streams(r) == (f"Prepare to online MEMORY mfn {m:x}\n",
                          f"Onlining page mfn {m:x} failed, error 16", 1)
    assert r.data["status"]["status"] == 0x2008


def test_online_offlined_and_pending_pages(hv, host):
    f, d = free_frame(host), dom_frame(host, 0)
    hptool.mem_offline(hv, f)
    hptool.mem_offline(hv, d)
    for m in (f, d):
        assert streams(hptool.mem_online(hv, m)) == (
            f"Prepare to online MEMORY mfn {m:x}\nMemory mfn {m:x} onlined successfully\n", "", 0)
        assert streams(hptool.mem_status(hv, m)) == (
            f"Querying MEMORY mfn {m:x} status\nMemory Status 0: [ PAGE_ONLINED ]\n", "", 0)


@pytest.mark.parametrize("kind", ["free", "inuse", "vga-hole", "xen-image"])
def test_online_already_online(hv, host, kind):
    m = {"free": lambda: free_frame(host), "inuse": lambda: dom_frame(host, 0),
         "vga-hole": lambda: 0xA0, "xen-image": lambda: 0x7FA00}[kind]()
    assert streams(hptool.mem_online(hv, m)) == (
        f"Prepare to online MEMORY mfn {m:x}\nMemory is already onlined!\n", "", 0)


# -- 6.5 mem-status -------------------------------------------------------------------------------

def test_status_error_has_no_newline(hv):
    for m in (0xA0, 0xF0, 0x7FFF0, 0x100000):
        assert streams(hptool.mem_status(hv, m)) == (
            f"Querying MEMORY mfn {m:x} status\n", f"Querying page mfn {m:x} failed, error 16", 1)


def test_status_lines(hv, host):
    f, d, f2, d2 = free_frame(host), dom_frame(host, 1), free_frame(host, 3), dom_frame(host, 1, 3)

    def line(m):
        r = hptool.mem_status(hv, m)
        assert r.exit_code == 0 and r.stderr == ""
        head, body = r.stdout.split("\n", 1)
        assert head == f"Querying MEMORY mfn {m:x} status"
        return body

    assert line(f) == "Memory Status 0: [ PAGE_ONLINED ]\n"
    assert line(d) == "Memory Status 0: [ PAGE_ONLINED ]\n"
    hptool.mem_offline(hv, f)
    hptool.mem_offline(hv, d)
    assert line(f) == "Memory Status 2: [ PAGE_OFFLINED ]\n"
    assert line(d) == "Memory Status 8: [ PAGE_OFFLINE_PENDING  PAGE_ONLINED ]\n"
    sysctl.machine_check_offline(host, f2)
    sysctl.machine_check_offline(host, d2)
    assert line(f2) == "Memory Status 12: [ PAGE_BROKEND   PAGE_OFFLINED ]\n"
    assert line(d2) == "Memory Status 18: [ PAGE_OFFLINE_PENDING  PAGE_BROKEND   PAGE_ONLINED ]\n"
    # the Xen image is RAM in use: online (lab: mem-status 7fa00 -> Memory Status 0)
    assert line(0x7FA00) == "Memory Status 0: [ PAGE_ONLINED ]\n"


def test_status_and_online_never_pin_dom0(hv, host):
    """Only the offline goes through the pCPU-0 workaround."""
    calls = []
    real = hv.set_vcpu_affinity
    hv.set_vcpu_affinity = lambda *a: calls.append(a) or real(*a)
    hptool.mem_status(hv, 0x100)
    hptool.mem_online(hv, 0x100)
    assert calls == []
    hptool.mem_offline(hv, 0x100)
    assert [c[2] for c in calls] == [[1], [0, 1]]


def test_report_json_carries_raw_status(hv):
    r = hptool.mem_offline(hv, 0x7FA00)
    d = r.to_json()
    assert d["rc"] == -1 and d["errno"] == 1 and d["errno_name"] == "EPERM"
    assert d["status"]["status"] == 0x7FF20108 and d["status"]["owner"] == 0x7FF2
    assert set(d["status"]["flags"]) == {"XENPAGE", "FAILED"}
    assert d["exit"] == 1
    r = hptool.mem_status(hv, 0xA0)
    assert r.to_json()["status"]["untouched"] is True
    assert S.decode(0x12, S.sysctl_query_page_offline)["flags"] == ["OFFLINED", "BROKEN"]


# -- many frames at once: range calls answer exactly what single calls answer ----------------------

def test_mark_offline_many_equals_one_frame_at_a_time(host):
    import copy
    img = host.xen_image[0]
    f = free_frame(host)
    d1 = dom_frame(host, 1)
    mfns = (list(range(0x9A, 0xA4))                       # DOMID_IO, then non-RAM
            + list(range(img - 3, img + 2))               # anonymous, then Xen's image
            + list(range(f, f + 40)) + [f + 5, f + 5]     # free, then again (offlined)
            + [d1, d1 + 1, dom_frame(host, 0), 0x7FFDE]
            + list(range(host.max_page - 2, host.max_page + 3))  # top of RAM, then invalid
            + [0xFFFFFFFF, 0x100])
    seq_host = copy.deepcopy(host)
    seq_hv = SimHypervisor(seq_host)
    want = [hptool.mem_offline_mark(seq_hv, m) for m in mfns]
    got = hptool.mem_offline_marks(SimHypervisor(host), mfns)
    assert [(rc, st) for _, rc, st in got] == [(rc, st) for _, rc, st in want]
    assert [streams(r) for r, _, _ in got] == [streams(r) for r, _, _ in want]
    assert np.array_equal(host.ft.count_info.copy(), seq_host.ft.count_info.copy())
    assert host.domains[0].affinity == [[0, 1]]


def test_mark_offline_many_uses_few_calls(host):
    hv = SimHypervisor(host)
    calls = []
    real = hv.page_offline_op
    hv.page_offline_op = lambda *a: calls.append(a) or real(*a)
    f = free_frame(host)
    out = hptool.mark_offline_many(hv, list(range(f, f + 1000)) + list(range(0x9E, 0xA2)))
    assert out[:1000] == [(0, 0x2)] * 1000
    assert out[1000:] == [(0, 0x7FF11004), (-22, 0x808), (-22, 0x808), (-22, 0x808)]
    assert [(c[1], c[2]) for c in calls] == [(f, f + 999), (0x9E, 0xA1), (0xA0, 0xA1), (0xA1, 0xA1)]
