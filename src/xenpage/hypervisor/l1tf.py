"""L1TF and PV guests (``xen/arch/x86/include/asm/shadow.h``, ``spec_ctrl.c``): Xen 4.17's
check of the *non-present* page-table entries a PV domain's tables receive.

On a CPU that may speculate through a non-present entry (L1 Terminal Fault), a PV guest
could read any cacheable frame whose address it leaves in one.  Xen therefore checks every
non-present entry written into a PV domain's tables -- by the guest (``mmu_update``, the
emulated write of a read-only L1, ``ptwr``) or by a toolstack updating them on its behalf
(``mmu_update`` naming the domain as page-table owner) -- when that domain has
``check_l1tf`` set (``pv_l1tf_domain_init``: ``pv-l1tf=`` for dom0 or for domUs):

* an entry is **safe** when its address bits, masked to the L1D's width, are 0 or at/above
  ``l1tf_safe_maddr`` (``is_l1tf_safe_maddr``); above L1 a set PSE bit is never safe;
* an unsafe entry (``pv_l1tf_check_pte``) is not written: with shadow paging built in,
  Xen logs ``d<N> L1TF-vulnerable L<n>e <pte> - Shadowing`` and schedules the
  ``pv_l1tf_tasklet``, which puts the domain in forced shadow mode (``PG_SH_forced``; not
  for a dying domain); without it, Xen logs ``... - Crashing`` and crashes the domain.
  Either way the update answers ``-ERESTART``: the hypercall is continued, and the same
  entry is tried again -- a shadowed domain's passes; a crashed guest never runs again; a
  toolstack's call for a guest that is suspended (``domain_crash`` of a domain already
  shut down changes nothing) is restarted for ever (:class:`.quirks.HypercallLivelock`).

Which CPU is vulnerable and Xen's defaults (``l1tf_calculations``, ``init_speculation_
mitigations``): Intel family-6 cores (not Atoms, not Knights, not with ``RDCL_NO``); domUs
are checked by default on a vulnerable CPU, dom0 never by default.  The simulated CPU's
facts live in :class:`.quirks.Quirks` (``cpu_l1tf``, ``paddr_bits``, ``l1d_maxphysaddr``,
``pv_l1tf_dom0``, ``pv_l1tf_domu``, with ``no_shadow_paging``); its default is the lab's
QEMU/TCG CPU, an AMD model Xen never believes vulnerable (both checks off).

Not modelled: the same check when a table is validated (``alloc_l1_table`` ... ``alloc_l4_table``
on a pin or a new CR3), and the 4 MiB shadow pool the tasklet allocates (its failure crashes
the domain).

xenpage's exchange clears entries to 0 -- safe on every setting; upstream's
``xc_exchange_page`` clears only ``_PAGE_PRESENT`` and leaves the frame's address in the
entry (:mod:`xenpage.toolstack.upstream`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..abi import pte as P

if TYPE_CHECKING:  # pragma: no cover
    from .host import Host
    from .quirks import Quirks

PAGE_MASK = ~0xFFF & 0xFFFFFFFFFFFFFFFF


_TRUE = ("1", "yes", "on", "true", "enable")
_FALSE = ("0", "no", "off", "false", "disable")


def _parse_bool(s: str) -> bool | None:
    """``parse_bool``: True, False, or None when ``s`` is no boolean."""
    return True if s in _TRUE else False if s in _FALSE else None


def _parse_boolean(name: str, s: str) -> bool | None:
    """``parse_boolean(name, s)``: ``name``, ``no-name`` or ``name=<bool>``; None otherwise."""
    if s == name:
        return True
    if s == "no-" + name:
        return False
    if s.startswith(name + "="):
        return _parse_bool(s[len(name) + 1:])
    return None


def parse_pv_l1tf(s: str) -> tuple[bool | None, bool | None]:
    """``pv-l1tf=`` as ``parse_pv_l1tf`` reads it: ``(dom0, domU)``, None where the option
    leaves Xen's default.  A boolean sets both; ``dom0``/``domu`` (``no-``, ``=<bool>``) one;
    the option alone means both on.  ValueError where Xen answers -EINVAL."""
    if s == "":
        return True, True
    dom0 = domu = None
    for item in s.split(","):
        b = _parse_bool(item)
        if b is not None:
            dom0 = domu = b
        elif (v := _parse_boolean("dom0", item)) is not None:
            dom0 = v
        elif (v := _parse_boolean("domu", item)) is not None:
            domu = v
        elif item:
            raise ValueError(f"pv-l1tf: unknown setting {item!r}")
    return dom0, domu


def l1d_maxphysaddr(q: "Quirks") -> int:
    return q.l1d_maxphysaddr or q.paddr_bits


def l1tf_addr_mask(q: "Quirks") -> int:
    """The address bits the L1D cache looks at (``l1tf_addr_mask``)."""
    return ((1 << l1d_maxphysaddr(q)) - 1) & PAGE_MASK


def l1tf_safe_maddr(host: "Host") -> int:
    """``l1tf_safe_maddr``: above the highest cacheable address -- ``2^paddr_bits`` when the
    L1D is wider than CPUID says, else the top quarter of the address space -- and never below
    the end of the last E820 entry (``__start_xen``)."""
    q = host.quirks
    l1d = l1d_maxphysaddr(q)
    guess = (1 << q.paddr_bits) if l1d > q.paddr_bits else (3 << (q.paddr_bits - 2))
    ents = host.e820.entries
    top = ((ents[-1].end + 0xFFF) & PAGE_MASK) if ents else 0
    return max(guess, top)


def is_l1tf_safe_maddr(host: "Host", pte) -> np.ndarray | bool:
    """``is_l1tf_safe_maddr`` for one entry or an array of them."""
    maddr = np.asarray(pte, dtype=np.uint64) & np.uint64(l1tf_addr_mask(host.quirks))
    safe = (maddr == np.uint64(0)) | (maddr >= np.uint64(l1tf_safe_maddr(host)))
    return bool(safe) if np.ndim(safe) == 0 else safe


def check_l1tf(host: "Host", domid: int) -> bool:
    """``d->arch.pv.check_l1tf`` (``pv_l1tf_domain_init``): ``pv-l1tf=`` for dom0 (default
    off) or domUs (default: on iff the CPU is believed vulnerable); never an HVM domain."""
    d = host.domains.get(domid)
    if d is None or d.hvm or d.is_system:
        return False
    q = host.quirks
    if domid == 0:
        return bool(q.pv_l1tf_dom0) if q.pv_l1tf_dom0 is not None else False
    return bool(q.pv_l1tf_domu) if q.pv_l1tf_domu is not None else bool(q.cpu_l1tf)


def unsafe(host: "Host", domid: int, level: int, ptes) -> np.ndarray:
    """Which of the non-present ``ptes`` written at ``level`` into ``domid``'s tables
    ``pv_l1tf_check_pte`` would stop (all False when the domain is not checked or already
    shadowed)."""
    ptes = np.asarray(ptes, dtype=np.uint64)
    d = host.domains.get(domid)
    if d is None or not check_l1tf(host, domid) or d.sh_forced:
        return np.zeros(ptes.shape, dtype=bool)
    bad = ~np.asarray(is_l1tf_safe_maddr(host, ptes))
    if level > 1:
        bad |= (ptes & np.uint64(P._PAGE_PSE)) != 0
    return bad


def pv_l1tf_check_pte(host: "Host", domid: int, level: int, pte: int) -> bool:
    """``pv_l1tf_check_pte``: True when the non-present ``pte`` may not be written (the
    caller answers -ERESTART).  With shadow paging the domain is shadowed before the
    hypercall is continued (``pv_l1tf_tasklet``, modelled as running at once); without it
    the domain is crashed."""
    if not unsafe(host, domid, level, np.uint64(pte)):
        return False
    d = host.domains[domid]
    if host.quirks.no_shadow_paging:
        host.log.append(f"d{domid} L1TF-vulnerable L{level}e {pte:016x} - Crashing")
        host.crash(domid, "pv_l1tf_check_pte")
    else:
        host.log.append(f"d{domid} L1TF-vulnerable L{level}e {pte:016x} - Shadowing")
        if not d.dying:  # pv_l1tf_tasklet: shadow_one_bit_enable(d, PG_SH_forced)
            d.sh_forced = True
    return True
