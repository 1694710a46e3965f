#!/usr/bin/env python3
# Every frame class of the lab's layout: stock xen-hptool and the raw sysctl, verbatim; how dom0 can see Xen's fixed range.
# lab-options: timeout=1800
"""Scenario "layout" (runs in the lab's dom0 with Debian's python3; issue 16 items 1 and 3).

1. What a dom0 toolstack can learn about where Xen's fixed image lies (``is_xen_fixed_mfn``:
   ``_stext`` .. ``__2M_rwdata_end - 1``, which includes the freed init region and the unused
   BSS given back at boot): ``KEXEC_CMD_kexec_get_range`` for every range (libxenctrl's
   ``xc_kexec_get_range``), ``xl dmesg``, ``xl info``, ``/proc/iomem``, the E820 Xen gives dom0
   (``xc_get_machine_memory_map``), the M2P's frames (``xc_machphys_mfn_list``), and which of
   the image's frames dom0 owns (``xc_get_pfn_type_batch`` on dom0: XTAB when not dom0's).
2. Stock ``xen-hptool`` (mem-status, mem-offline, mem-status, mem-online, mem-status: stdout,
   stderr, their order, exit code) and then the raw sysctl (query, offline, query, online,
   query: rc, errno, status words) on each E820 boundary and one frame either side, each end of
   Xen's image and of its freed init region and one frame either side, the M2P's chunks, the
   frames between Xen's relocation base and its image, above the image to the top of RAM, and
   the top frames of RAM; in one list, in the order they ran (``steps``), so that the simulator
   can replay it.
3. Last (it leaves the heap as Xen 4.17 leaves it after such offlines): the raw offline's
   class (then online) of every frame above the image, every 8th frame of the M2P and every
   0x40th frame below the image that dom0 does not own (``class_scan``); which of Xen's frames
   found there dom0 can map as DOMID_XEN's (``map_xen``).

dom0's vCPUs stay pinned to physical CPU 1 for the whole run (the 4.17 PoD-lock hang).
Output: $LAB_OUT/layout.json (+ layout.jsonl streamed, xl-dmesg.txt, iomem.txt).
Run layout-20261205-135348 (201 s) is committed as tests_xen/results/lab-layout.json.
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import selectors
import subprocess
import sys
import time

sys.path.insert(0, "/xenpage/lab/dom0")
import labproto as lab  # noqa: E402

BIN = "/usr/lib/xen-4.17/bin"
HPTOOL = f"{BIN}/xen-hptool"
OUT = os.environ.get("LAB_OUT", "/tmp/lab-out")
stream = lab.Stream("layout.jsonl")
RESULT: dict = {"schema": 1, "facts": {}, "probes": {}, "steps": [], "scan": []}
T0 = time.time()

ctl = ctypes.CDLL("libxenctrl.so.4.17", use_errno=True)
guest = ctypes.CDLL("libxenguest.so.4.17", use_errno=True)
ctl.xc_interface_open.restype = ctypes.c_void_p
ctl.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
ctl.xc_maximum_ram_page.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong)]
ctl.xc_kexec_get_range.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                   ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint64)]
ctl.xc_machphys_mfn_list.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong)]
ctl.xc_get_pfn_type_batch.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint,
                                      ctypes.POINTER(ctypes.c_ulong)]


class E820Entry(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("type", ctypes.c_uint32)]


ctl.xc_get_machine_memory_map.argtypes = [ctypes.c_void_p, ctypes.POINTER(E820Entry), ctypes.c_uint32]
FUNCS = {"query": guest.xc_query_page_offline_status, "offline": guest.xc_mark_page_offline,
         "online": guest.xc_mark_page_online}
for _f in FUNCS.values():
    _f.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_ulong, ctypes.POINTER(ctypes.c_uint32)]
    _f.restype = ctypes.c_int
XCH = ctl.xc_interface_open(None, None, 0)


def run(argv: list[str], timeout: float = 120) -> dict:
    """stdout and stderr separately, the order in which they arrived, the exit code."""
    t = time.time()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    sel = selectors.DefaultSelector()
    sel.register(p.stdout, selectors.EVENT_READ, "stdout")
    sel.register(p.stderr, selectors.EVENT_READ, "stderr")
    data = {"stdout": b"", "stderr": b""}
    order: list[str] = []
    while sel.get_map():
        if time.time() - t > timeout:
            p.kill()
            break
        for key, _ in sel.select(1.0):
            chunk = os.read(key.fileobj.fileno(), 65536)
            if not chunk:
                sel.unregister(key.fileobj)
                continue
            data[key.data] += chunk
            if not order or order[-1] != key.data:
                order.append(key.data)
    rc = p.wait()
    rec = {"argv": argv, "stdout": data["stdout"].decode(errors="replace"),
           "stderr": data["stderr"].decode(errors="replace"), "exit": rc,
           "elapsed_s": round(time.time() - t, 3)}
    if len(order) > 1:
        rec["order"] = order
    return rec


def sysctl(op: str, start: int, end: int | None = None) -> dict:
    end = start if end is None else end
    n = max(end - start + 1, 1)
    st = (ctypes.c_uint32 * n)(*([0xDEADBEEF] * n))
    ctypes.set_errno(0)
    rc = FUNCS[op](XCH, start, end, st)
    err = ctypes.get_errno()
    return {"op": op, "start": hex(start), "end": hex(end), "rc": rc,
            "errno": err if rc < 0 else 0, "status": [f"0x{v:08x}" for v in st]}


def step(rec: dict) -> dict:
    rec["seq"] = len(RESULT["steps"])
    rec["t"] = round(time.time() - T0, 2)
    RESULT["steps"].append(rec)
    stream.add({"kind": "step", **rec})
    return rec


def probe(mfn: int, why: str) -> None:
    """Stock xen-hptool's five commands, then the raw sysctl's five calls, on one frame."""
    h = f"{mfn:x}"
    for cmd in ("mem-status", "mem-offline", "mem-status", "mem-online", "mem-status"):
        r = run(["stdbuf", "-oL", HPTOOL, cmd, h])
        step({"tool": "hptool", "mfn": h, "why": why, "cmd": cmd, **r})
    for op in ("query", "offline", "query", "online", "query"):
        step({"tool": "sysctl", "mfn": h, "why": why, **sysctl(op, mfn)})
    last = RESULT["steps"][-9]
    print(f"probe {h} ({why}): offline -> {last['stdout'].strip()[-60:]!r} {last['stderr'].strip()[-60:]!r}",
          flush=True)


# ------------------------------------------------------------------------------------------------
# the M2P's frames, three ways (the first run's libxc call answered -1 for every max_extents)

guest.xc_map_m2p.restype = ctypes.c_void_p
guest.xc_map_m2p.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_int, ctypes.POINTER(ctypes.c_ulong)]
ctl.xc_map_foreign_range.restype = ctypes.c_void_p
ctl.xc_map_foreign_range.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_int,
                                     ctypes.c_ulong]
LIBC = ctypes.CDLL(None, use_errno=True)
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
LIBC.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
LIBC.mlock.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
DOMID_XEN = 0x7FF2
IOCTL_PRIVCMD_HYPERCALL = 0x00305000      # _IOC(_IOC_NONE, 'P', 0, sizeof(struct privcmd_hypercall))
HYPERVISOR_memory_op = 12
XENMEM_machphys_mfn_list, XENMEM_machphys_mapping, XENMEM_machphys_compat_mfn_list = 5, 12, 25


class PrivcmdHypercall(ctypes.Structure):
    _fields_ = [("op", ctypes.c_uint64), ("arg", ctypes.c_uint64 * 5)]


class MachphysMfnList(ctypes.Structure):     # public/memory.h: struct xen_machphys_mfn_list
    _fields_ = [("max_extents", ctypes.c_uint32), ("extent_start", ctypes.c_uint64),
                ("nr_extents", ctypes.c_uint32)]


class MachphysMapping(ctypes.Structure):     # public/memory.h: struct xen_machphys_mapping
    _fields_ = [("v_start", ctypes.c_uint64), ("v_end", ctypes.c_uint64), ("max_mfn", ctypes.c_uint64)]


def memory_op(cmd: int, arg) -> tuple[int, int]:
    """``HYPERVISOR_memory_op(cmd, &arg)`` straight through privcmd (no libxc bounce)."""
    LIBC.mlock(ctypes.addressof(arg), ctypes.sizeof(arg))
    hc = PrivcmdHypercall(HYPERVISOR_memory_op, (ctypes.c_uint64 * 5)(cmd, ctypes.addressof(arg), 0, 0, 0))
    fd = os.open("/dev/xen/privcmd", os.O_RDWR)
    try:
        ctypes.set_errno(0)
        rc = LIBC.ioctl(fd, IOCTL_PRIVCMD_HYPERCALL, ctypes.byref(hc))
        return rc, ctypes.get_errno() if rc < 0 else 0
    finally:
        os.close(fd)


def raw_mfn_list(cmd: int, n: int) -> dict:
    buf = (ctypes.c_uint64 * n)()
    LIBC.mlock(ctypes.addressof(buf), ctypes.sizeof(buf))
    a = MachphysMfnList(n, ctypes.addressof(buf), 0xDEAD)
    rc, err = memory_op(cmd, a)
    return {"rc": rc, "errno": err, "nr_extents": a.nr_extents,
            "mfns": [hex(buf[i]) for i in range(min(a.nr_extents, n))] if rc == 0 else []}


def m2p_chunks(max_mfn: int) -> dict:
    """Where the M2P lives: libxenctrl's ``xc_machphys_mfn_list`` (errno kept), libxenguest's
    ``xc_map_m2p`` (its first chunk), and ``XENMEM_machphys_mfn_list`` /
    ``XENMEM_machphys_compat_mfn_list`` / ``XENMEM_machphys_mapping`` issued raw."""
    out: dict = {"libxc": []}
    for want in (1, 2, 3, 4):
        buf = (ctypes.c_ulong * want)()
        ctypes.set_errno(0)
        rc = ctl.xc_machphys_mfn_list(XCH, want, buf)
        out["libxc"].append({"max_extents": want, "rc": rc, "errno": ctypes.get_errno() if rc else 0,
                             "mfns": [hex(buf[i]) for i in range(want)]})
    mfn0 = ctypes.c_ulong(0)
    ctypes.set_errno(0)
    addr = guest.xc_map_m2p(XCH, max_mfn, 1, ctypes.byref(mfn0))   # PROT_READ
    out["xc_map_m2p"] = {"ok": bool(addr), "errno": 0 if addr else ctypes.get_errno(), "mfn0": hex(mfn0.value)}
    if addr:
        LIBC.munmap(addr, ((max_mfn * 8 + (1 << 21) - 1) >> 21) << 21)
    out["raw"] = raw_mfn_list(XENMEM_machphys_mfn_list, 64)
    out["raw_compat"] = raw_mfn_list(XENMEM_machphys_compat_mfn_list, 64)
    mm = MachphysMapping(0, 0, 0)
    rc, err = memory_op(XENMEM_machphys_mapping, mm)
    out["machphys_mapping"] = {"rc": rc, "errno": err, "v_start": hex(mm.v_start), "v_end": hex(mm.v_end),
                               "max_mfn": hex(mm.max_mfn)}
    ok = next((r for r in out["libxc"] if r["rc"] == 0), None)
    out["rc"] = 0 if out["raw"]["rc"] == 0 or ok else -1
    out["mfns"] = out["raw"]["mfns"] or (ok["mfns"] if ok else [])
    return out


def try_map_xen(mfn: int) -> dict:
    """Can dom0 read this frame as DOMID_XEN's (``xc_map_foreign_range``)?  Only frames Xen
    shared with privileged guests map; the console ring is text with "(XEN)" lines."""
    ctypes.set_errno(0)
    addr = ctl.xc_map_foreign_range(XCH, DOMID_XEN, 4096, 1, mfn)
    if not addr:
        return {"mfn": hex(mfn), "ok": False, "errno": ctypes.get_errno()}
    data = ctypes.string_at(addr, 4096)
    LIBC.munmap(addr, 4096)
    return {"mfn": hex(mfn), "ok": True, "xen_text": data.count(b"(XEN)"), "zero": data.count(0),
            "head": data[:16].hex()}


# ------------------------------------------------------------------------------------------------
# facts

def facts() -> dict:
    f: dict = {}
    mx = ctypes.c_ulong()
    ctl.xc_maximum_ram_page(XCH, ctypes.byref(mx))
    f["max_mfn"] = hex(mx.value)
    kx = {}
    for rng, name in enumerate(("MA_CRASH", "MA_XEN", "MA_CPU", "MA_XENHEAP", "MA_BOOT_PARAM",
                                "MA_EFI_MEMMAP", "MA_VMCOREINFO")):
        size, start = ctypes.c_uint64(), ctypes.c_uint64()
        ctypes.set_errno(0)
        rc = ctl.xc_kexec_get_range(XCH, rng, 0, ctypes.byref(size), ctypes.byref(start))
        kx[name] = {"rc": rc, "errno": ctypes.get_errno() if rc < 0 else 0,
                    "start": hex(start.value), "size": hex(size.value)}
    f["kexec_get_range"] = kx
    f["machphys_mfn_list"] = m2p_chunks(mx.value)
    ents = (E820Entry * 128)()
    n = ctl.xc_get_machine_memory_map(XCH, ents, 128)
    f["machine_memory_map"] = [{"addr": hex(e.addr), "size": hex(e.size), "type": e.type}
                               for e in ents[:max(n, 0)]]
    dm = run(["xl", "dmesg"])
    with open(os.path.join(OUT, "xl-dmesg.txt"), "w") as fh:
        fh.write(dm["stdout"])
    f["xl_dmesg_lines"] = dm["stdout"].splitlines()
    f["xl_info"] = run(["xl", "info"])["stdout"].splitlines()
    try:
        iomem = open("/proc/iomem").read()
    except OSError as e:
        iomem = f"error: {e}"
    with open(os.path.join(OUT, "iomem.txt"), "w") as fh:
        fh.write(iomem)
    f["proc_iomem"] = iomem.splitlines()
    f["xen_elf_pt_load"] = {"paddr": os.environ.get("LAB_XEN_PT_LOAD_PADDR"),
                            "memsz": os.environ.get("LAB_XEN_PT_LOAD_MEMSZ")}
    for line in f["xl_dmesg_lines"]:
        m = re.search(r"New Xen image base address: (0x[0-9a-f]+)", line)
        if m:
            f["xen_relocated_base"] = m.group(1)
    return f


def dom0_types(start: int, end: int) -> list[str]:
    """``XEN_DOMCTL_getpageframeinfo3`` on dom0 for frames [start, end): its page type, or
    XTAB when dom0 does not own the frame."""
    out = []
    for a in range(start, end, 512):
        k = min(512, end - a)
        arr = (ctypes.c_ulong * k)(*range(a, a + k))
        rc = ctl.xc_get_pfn_type_batch(XCH, 0, k, arr)
        if rc:
            out += ["err"] * k
            continue
        out += [f"{(v >> 28) & 0xF:x}" for v in arr]
    return out


def runs(types: list[str], base: int) -> list[list]:
    """[[first, last, type], ...] of equal consecutive entries."""
    out: list[list] = []
    for i, t in enumerate(types):
        if out and out[-1][2] == t and int(out[-1][1], 16) == base + i - 1:
            out[-1][1] = hex(base + i)
        else:
            out.append([hex(base + i), hex(base + i), t])
    return out


def main() -> int:
    with lab.Step("facts") as s:
        f = facts()
        RESULT["facts"] = f
        stream.add({"kind": "facts", **{k: v for k, v in f.items() if k not in ("xl_dmesg_lines", "proc_iomem")}})
        s.detail = f"kexec MA_XEN {f['kexec_get_range']['MA_XEN']} m2p {f['machphys_mfn_list']['mfns']}"
    mx = int(f["max_mfn"], 16)
    kxen = f["kexec_get_range"]["MA_XEN"]
    if kxen["rc"] == 0 and int(kxen["size"], 16):
        img_first = int(kxen["start"], 16) >> 12
        img_last = (int(kxen["start"], 16) + int(kxen["size"], 16) - 1) >> 12
    else:
        base = int(f.get("xen_relocated_base", "0"), 16)
        paddr, memsz = (int(f["xen_elf_pt_load"][k] or "0", 16) for k in ("paddr", "memsz"))
        img_first, img_last = (base + paddr) >> 12, (base + paddr + memsz - 1) >> 12
    reloc = int(f.get("xen_relocated_base", "0"), 16) >> 12
    init_kb = next((int(m.group(1)) for ln in f["xl_dmesg_lines"]
                    for m in [re.search(r"Freed (\d+)kB init memory", ln)] if m), 0)
    # the freed init region as measured in earlier runs (xen-lab.md): 0x7fbb7-0x7fc5a
    init_first = img_first + 0x1B7
    init_last = init_first + (init_kb >> 2) - 1
    with lab.Step("dom0-owned-frames") as s:
        t = dom0_types(0, mx)
        RESULT["dom0_types"] = runs(["xtab" if x == "f" else ("dom0" if x != "err" else x) for x in t], 0)
        s.detail = f"{len(RESULT['dom0_types'])} runs of dom0 / not dom0's over RAM"
    # the probed frames
    probes: dict[int, str] = {}

    def add(m: int, why: str) -> None:
        if 0 <= m < (1 << 32):
            probes.setdefault(m, why)

    e820 = f["machine_memory_map"]
    for e in e820:
        a, sz = int(e["addr"], 16), int(e["size"], 16)
        first, last = a >> 12, (a + sz - 1) >> 12
        for m, w in ((first, "start"), (last, "end")):
            for d, ww in ((-1, "before"), (0, ""), (1, "after")):
                add(m + d, f"e820 type {e['type']} {w}" + (f" ({ww})" if ww else ""))
    for m, w in ((img_first, "xen image first"), (img_last, "xen image last"),
                 (init_first, "xen freed init first"), (init_last, "xen freed init last"),
                 (reloc, "xen relocation base")):
        for d, ww in ((-1, "before"), (0, ""), (1, "after")):
            add(m + d, w + (f" ({ww})" if ww else ""))
    for c in f["machphys_mfn_list"]["mfns"]:
        c = int(c, 16)
        for m, w in ((c - 1, "before m2p chunk"), (c, "m2p chunk first"), (c + 511, "m2p chunk last"),
                     (c + 512, "after m2p chunk")):
            add(m, w)
    for k in range(1, 17):
        add(mx - k, "top of ram")
    for m in range(img_last + 2, mx, 0x20):
        add(m, "above xen image")
    for m in range(reloc + 0x20, img_first - 1, 0x40):
        add(m, "between relocation base and image")
    RESULT["probes"] = {hex(m): w for m, w in sorted(probes.items())}
    RESULT["image"] = [hex(img_first), hex(img_last)]
    RESULT["init"] = [hex(init_first), hex(init_last)]
    pin = run(["xl", "vcpu-pin", "0", "all", "1"])
    vl = run(["xl", "vcpu-list", "0"])
    RESULT["pinned"] = {"pin": pin["exit"], "vcpu_list": vl["stdout"]}
    if pin["exit"] != 0:
        lab.step_fail("pin", pin["stderr"][:200])
        return 1
    with lab.Step("probes") as s:
        for m, w in sorted(probes.items()):
            probe(m, w)
        s.detail = f"{len(probes)} frames, {len(RESULT['steps'])} steps"
    with lab.Step("class-scan") as s:
        # the raw offline's class (then online) of: every frame above Xen's image, every 8th
        # frame of the M2P's chunks (and the compat M2P's), and every 0x40th frame of RAM below
        # the image that dom0 does not own (the frame table, Xen's other boot allocations)
        t0 = time.time()
        chunks = [int(x, 16) for x in f["machphys_mfn_list"]["mfns"]]
        chunks += [int(x, 16) for x in f["machphys_mfn_list"].get("raw_compat", {}).get("mfns", [])]
        d0 = set()
        for a, b, t in RESULT["dom0_types"]:
            if t == "dom0":
                d0.update(range(int(a, 16), int(b, 16) + 1))
        frames = list(range(img_last + 1, mx))
        frames += [c + i for c in chunks for i in range(0, 512, 8)]
        frames += [m for m in range(0, img_first, 0x40) if m not in d0]
        cls = []
        for m in sorted(set(frames)):
            off = sysctl("offline", m)
            sysctl("online", m)
            cls.append([hex(m), off["rc"], off["status"][0]])
        RESULT["class_scan"] = cls
        stream.add({"kind": "class-scan", "frames": cls})
        s.detail = f"{len(cls)} frames ({time.time() - t0:.1f} s)"
    with lab.Step("map-xen-frames") as s:
        # which of Xen's own frames dom0 can read (the console ring: "(XEN)" text)
        want = [int(m, 16) for m, rc, st in RESULT["class_scan"]
                if st.startswith("0x7ff2") or st.startswith("0x7ff4")]
        want += [c + i for c in chunks for i in (0, 1, 511)]
        maps = [try_map_xen(m) for m in sorted(set(want))]
        RESULT["map_xen"] = maps
        stream.add({"kind": "map-xen", "maps": maps})
        s.detail = (f"{sum(x['ok'] for x in maps)} of {len(maps)} mappable; "
                    f"with (XEN) text: {[x['mfn'] for x in maps if x.get('xen_text')]}")
    run(["xl", "vcpu-pin", "0", "all", "all"])
    with open(os.path.join(OUT, "layout.json"), "w") as fh:
        json.dump(RESULT, fh, indent=1)
        fh.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
