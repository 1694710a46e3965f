"""``XEN_SYSCTL_page_offline_op`` (``xen/common/sysctl.c``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..abi import errno as E
from ..abi import sysctl as S
from .offline import offline_each, offline_range, online_each, online_range, query_each, query_range

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host


def page_offline_op(host: "Host", caller: int, cmd: int, start: int, end: int,
                    pcpu: int = 0) -> tuple[int, np.ndarray | None]:
    """Run the sysctl as the hypervisor does.

    * only the control domain may call it (``xsm_sysctl`` XSM_PRIV) -> -EPERM;
    * ``start``/``end`` are the 32-bit fields of the payload;
    * ``end < start`` -> -EINVAL with no status array;
    * the status array is filled byte-wise with PG_OFFLINE_INVALID, the per-page function
      runs for each frame in order until one fails, and the whole array is copied back;
    * an unknown ``cmd`` fails at the first frame with -EINVAL.

    Returns ``(rc, status)`` with rc 0 or a negative errno; ``status`` is None when Xen
    copied nothing back."""
    d = host.domains.get(caller)
    if d is None or not d.privileged:
        return -E.EPERM, None
    if not (0 <= start <= S.MFN_FIELD_MAX and 0 <= end <= S.MFN_FIELD_MAX):
        raise ValueError("page_offline_op: start and end are 32-bit fields")
    if end < start:
        return -E.EINVAL, None
    n = end - start + 1
    if not _status_array_fits(host, n):
        return -E.ENOMEM, None
    if cmd == S.sysctl_page_offline:
        return offline_range(host, start, end, broken=False, pcpu=pcpu)
    if cmd == S.sysctl_page_online:
        return online_range(host, start, end)
    if cmd == S.sysctl_query_page_offline:
        return query_range(host, start, end)
    return -E.EINVAL, np.full(n, S.STATUS_UNTOUCHED, dtype=np.uint32)


def page_offline_each(host: "Host", caller: int, cmd: int, mfns: np.ndarray,
                      pcpu: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The sysctl issued once per MFN as a one-frame call (``start == end``), in the order
    given: ``(rc, status)`` arrays, each element what that call answers.  A one-frame status
    array always fits (``xzalloc_array`` of 4 bytes); a caller that may not call the sysctl
    gets -EPERM for every frame with its status untouched."""
    mfns = np.asarray(mfns, dtype=np.int64).ravel()
    if mfns.size and (mfns.min() < 0 or mfns.max() > S.MFN_FIELD_MAX):
        raise ValueError("page_offline_op: start and end are 32-bit fields")
    d = host.domains.get(caller)
    if d is None or not d.privileged:
        return (np.full(mfns.size, -E.EPERM, dtype=np.int32),
                np.full(mfns.size, S.STATUS_UNTOUCHED, dtype=np.uint32))
    if cmd == S.sysctl_page_offline:
        return offline_each(host, mfns, pcpu=pcpu)
    if cmd == S.sysctl_page_online:
        return online_each(host, mfns)
    if cmd == S.sysctl_query_page_offline:
        return query_each(host, mfns)
    return (np.full(mfns.size, -E.EINVAL, dtype=np.int32),
            np.full(mfns.size, S.STATUS_UNTOUCHED, dtype=np.uint32))


def _status_array_fits(host: "Host", n: int) -> bool:
    """``xzalloc_array(uint32_t, n)``: below a page from the xmalloc pool; from a page up,
    ``xmalloc_whole_pages`` -- one contiguous buddy of order ``get_order_from_bytes``."""
    nbytes = 4 * n
    if nbytes < 4096:
        return True
    order = ((nbytes + 4095) // 4096 - 1).bit_length()
    if order > host.heap.max_order:
        return False
    return any(lst for (z, o), lst in host.heap.lists.items() if o >= order)


def machine_check_offline(host: "Host", mfn: int) -> tuple[int, int]:
    """The machine-check path: ``offline_page(mfn, broken=1)`` from the MCE handler
    (``xen/arch/x86/cpu/mcheck/mcaction.c``).  Returns (rc, status)."""
    rc, st = offline_range(host, mfn, mfn, broken=True, pcpu=host.nr_pcpus - 1)
    return rc, int(st[0])
