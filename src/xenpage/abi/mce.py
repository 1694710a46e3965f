"""Linux's ``struct mce`` and the ``/dev/mcelog`` character device (``asm/mce.h`` of the
kernel's uapi, ``arch/x86/include/uapi/asm/mce.h``), as dom0's ``xen-mcelog`` driver
(``drivers/xen/mcelog.c``) hands Xen's machine-check telemetry to user space.

The driver keeps its own copy of the structure (``struct xen_mce``, Linux's
``include/xen/interface/xen-mca.h``): the uapi layout up to and including ``ppin``, with the
``severity``/``pad`` bytes as one 16-bit ``pad`` -- so its records are ``XEN_MCE_RECORD_LEN``
(112) bytes, not ``sizeof(struct mce)``, and user space must ask the record length
(``MCE_GET_RECORD_LEN``) and the number of records the device holds (``MCE_GET_LOG_LEN``,
32 for Xen), as mcelog does.  ``read()`` accepts only a buffer of the whole log
(``log_len * record_len`` bytes, offset 0: anything else is ``EINVAL``), returns every record
it holds and empties the log (``xen_mce_chrdev_read``); ``MCE_GETCLEAR_FLAGS`` returns and
clears the flags word, whose bit ``MCE_OVERFLOW`` says records were dropped because the log
was full (``xen_mce_log``).

What the driver fills (``convert_log``: one record per ``MC_TYPE_BANK`` entry of an
``XEN_MC_fetch`` result): ``status``, ``misc``, ``addr``, ``tsc`` and ``bank`` from the bank,
``mcgstatus`` and ``apicid`` from the global entry, ``cpu``/``extcpu``, ``socketid``,
``cpuvendor`` and ``mcgcap`` from the matching physical CPU, ``finished = 1``.  ``time`` is
never set (0), and neither are ``ip``, ``cs``, ``cpuid``.

The layout is checked against the installed uapi header by ``tests/test_mce_abi.py``.
"""

from __future__ import annotations

# -- ioctls: _IOR('M', n, int) ------------------------------------------------------------
_IOC_READ = 2


def _ior(kind: str, nr: int, size: int) -> int:
    """Linux's ``_IOR`` (asm-generic/ioctl.h: dir << 30 | size << 16 | type << 8 | nr)."""
    return (_IOC_READ << 30) | (size << 16) | (ord(kind) << 8) | nr


MCE_GET_RECORD_LEN = _ior("M", 1, 4)
MCE_GET_LOG_LEN = _ior("M", 2, 4)
MCE_GETCLEAR_FLAGS = _ior("M", 3, 4)

#: bit of the flags word: the log was full and records were dropped (``MCE_OVERFLOW``)
MCE_OVERFLOW = 0

#: the character device (``MISC_MCELOG_MINOR`` 227 of the misc major)
DEV_MCELOG = "/dev/mcelog"
#: what xen-mcelog answers (measured in the lab: Debian 12's 6.1 kernel on Xen 4.17)
XEN_MCE_RECORD_LEN = 112
XEN_MCE_LOG_LEN = 32

#: ``struct mce`` of the uapi header: (member, size in bytes, offset); natural alignment
STRUCT_MCE: tuple[tuple[str, int, int], ...] = (
    ("status", 8, 0),
    ("misc", 8, 8),
    ("addr", 8, 16),
    ("mcgstatus", 8, 24),
    ("ip", 8, 32),
    ("tsc", 8, 40),
    ("time", 8, 48),
    ("cpuvendor", 1, 56),
    ("inject_flags", 1, 57),
    ("severity", 1, 58),
    ("pad", 1, 59),
    ("cpuid", 4, 60),
    ("cs", 1, 64),
    ("bank", 1, 65),
    ("cpu", 1, 66),
    ("finished", 1, 67),
    ("extcpu", 4, 68),
    ("socketid", 4, 72),
    ("apicid", 4, 76),
    ("mcgcap", 8, 80),
    ("synd", 8, 88),
    ("ipid", 8, 96),
    ("ppin", 8, 104),
    ("microcode", 4, 112),
    ("kflags", 8, 120),
)
SIZEOF_STRUCT_MCE = 128

#: the kernel's ``X86_VENDOR_*`` (``cpuvendor`` as mcelog reads it)
X86_VENDOR_NAMES = {0: "Intel", 1: "Cyrix", 2: "AMD", 3: "UMC", 5: "Centaur", 7: "Transmeta",
                    8: "NSC", 9: "Hygon", 10: "Zhaoxin"}


_DTYPES: dict = {}


def numpy_dtype(record_len: int):
    """A numpy structured dtype for records of ``record_len`` bytes: the members of
    ``struct mce`` that lie wholly inside a record (mcelog copies ``min(record_len,
    sizeof(struct mce))`` bytes: a shorter record lacks the later members).  Built once per
    length."""
    dt = _DTYPES.get(record_len)
    if dt is None:
        dt = _DTYPES[record_len] = _numpy_dtype(record_len)
    return dt


def _numpy_dtype(record_len: int):
    import numpy as np
    fmt = {1: "u1", 4: "<u4", 8: "<u8"}
    names, formats, offsets = [], [], []
    for name, size, off in STRUCT_MCE:
        if off + size <= record_len:
            names.append(name)
            formats.append(fmt[size])
            offsets.append(off)
    return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                     "itemsize": record_len})


def pack(record_len: int = XEN_MCE_RECORD_LEN, **fields: int) -> bytes:
    """One record of ``record_len`` bytes (what the driver's ``read()`` returns), members
    not given zero: how tests and benchmarks make /dev/mcelog-shaped data."""
    import numpy as np
    a = np.zeros(1, dtype=numpy_dtype(record_len))
    for k, v in fields.items():
        a[k] = v
    return a.tobytes()
