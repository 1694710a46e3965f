"""Small helpers the hypervisor tests share: reading page_info counts (masks written from
xen-semantics.md §2.1-2.2, not from xenpage.abi, so they check it) and the invariant check."""

from xenpage.hypervisor import invariants

COUNT = 0x00FFFFFFFFFFFFFF   # PGC_count_mask
TCOUNT = 0x007FFFFFFFFFFFFF  # PGT_count_mask


def ok(h) -> None:
    assert invariants.check(h) == []


def pte(mfn: int, flags: int) -> int:
    return (mfn << 12) | flags


def gen(h, m) -> int:
    """General reference count of frame ``m``."""
    return int(h.ft.count_info[m]) & COUNT


def tcnt(h, m) -> int:
    """Type reference count of frame ``m``."""
    return int(h.ft.type_info[m]) & TCOUNT


def write(h, table: int, entries: dict[int, int]) -> None:
    """Give frame ``table`` these entries (every other word 0) as a live page-table array."""
    import numpy as np
    w = np.zeros(512, dtype=np.uint64)
    for i, v in entries.items():
        w[i] = np.uint64(v)
    h.ft.write_page(table, w)
    h.ft.table(table)


class Dom:
    """A bare domain of ``pages`` frames: ``f[i]`` is the MFN of its pfn i; ``hc`` its
    hypercalls."""

    def __init__(self, h, pages=64, name="u", **kw):
        self.h = h
        self.d = h.create_domain(name, pages, **kw)
        self.id = self.d.domid
        self.f = [int(x) for x in h.p2m[self.id]]
        self.hc = h.hypercalls(self.id)
