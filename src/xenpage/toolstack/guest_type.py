"""A domain's type as libxl tells it (``libxl__domain_type``, ``tools/libs/light/libxl_dom.c``):
``XEN_DOMINF_hvm_guest`` clear is PV; set, the type is what libxl recorded in xenstore at
``/libxl/<domid>/type`` ("hvm" or "pvh") -- Xen 4.17's domain flags do not tell PVH from HVM
(a PVH guest is an HVM container: ``hvm_guest`` and ``hap`` set); with no such node libxl
assumes HVM.

Which rules hold for which type (the toolstack's view):

============================  =====  =====  =====
rule                          PV     HVM    PVH
============================  =====  =====  =====
XENMEM_exchange (steal_page)  yes    no     no     (translated: -EOPNOTSUPP)
suspend via control/shutdown  yes    --     --     (paused instead)
in-place retirement           PV     gfn    gfn    (decrease + populate by gfn)
live migration                yes    yes    yes
a device model's map cache    no     yes    no     (PVH has no device model)
vMCE on a broken gfn          no     yes    yes    (p2m_ram_broken, HAP)
============================  =====  =====  =====
"""

from __future__ import annotations

PV, HVM, PVH = "pv", "hvm", "pvh"


def domain_type(hv, info) -> str:
    """``pv``, ``hvm`` or ``pvh`` for a :class:`~.hypervisor.DomainInfo`."""
    if not info.hvm:
        return PV
    t = hv.xs_read(f"/libxl/{info.domid}/type")
    return PVH if t == PVH else HVM


def has_device_model(hv, domid: int) -> bool:
    """Whether a device model serves the guest: libxl's ``device-model/<domid>/state`` node
    (written by QEMU; a PVH guest has none)."""
    return hv.xs_read(f"/local/domain/0/device-model/{domid}/state") not in (None, "")
