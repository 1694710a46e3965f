"""``kexec_op``'s range query: where Xen itself lies in machine memory (``do_kexec_op`` ->
``kexec_get_range`` in ``xen/common/kexec.c``; x86's ``machine_kexec_get_xen``).

``KEXEC_RANGE_MA_XEN`` answers ``_start`` .. ``_end`` of the running image.  On x86
``_start`` is ``_stext`` and ``__2M_rwdata_end`` is ``_end`` rounded up to a page (to 2 MiB in
an EFI build, whose extra frames Xen reserves and never hands out), so the frames it names
are exactly those ``is_xen_fixed_mfn`` refuses to offline -- the freed init region and the
unused BSS included, although both went back to the heap.  Real Xen 4.17.7 in the lab
answered ``0x7fa00000`` + ``0x3a6140`` (frames 0x7fa00-0x7fda6; tests_xen/results/lab-layout.json).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..abi import errno as E
from ..abi import kexec as K

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host

#: ``KEXEC_RANGE_MA_VMCOREINFO``: the vmcoreinfo page lies in Xen's BSS, at this byte offset
#: from the image's start (measured in the lab: 0x7fd7c540 with the image at 0x7fa00000)
VMCOREINFO_OFFSET = 0x37C540
VMCOREINFO_SIZE = 0x1000


def get_range(host: "Host", caller: int, rng: int, nr: int = 0) -> tuple[int, int, int]:
    """``KEXEC_CMD_kexec_get_range``: ``(rc, start, size)`` in bytes.  Only the control
    domain may ask (``xsm_kexec``: XSM_PRIV).  No crash kernel area is reserved on the
    simulated host (``crashkernel=`` unset): MA_CRASH answers 0 + 0; the per-CPU crash notes
    are then not allocated (MA_CPU: -EINVAL), and MA_XENHEAP, MA_BOOT_PARAM and
    MA_EFI_MEMMAP are refused on x86 (-EINVAL), as the lab's Xen 4.17.7 answered."""
    d = host.domains.get(caller)
    if d is None or not d.privileged:
        return -E.EPERM, 0, 0
    xs, _ = host.xen_image
    if rng == K.KEXEC_RANGE_MA_XEN:
        return 0, xs << 12, host.xen_image_bytes
    if rng == K.KEXEC_RANGE_MA_CRASH:
        return 0, 0, 0
    if rng == K.KEXEC_RANGE_MA_VMCOREINFO:
        return 0, (xs << 12) + VMCOREINFO_OFFSET, VMCOREINFO_SIZE
    return -E.EINVAL, 0, 0
