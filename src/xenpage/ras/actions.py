"""The ``hard`` action on a real Xen host: never a faked machine check.

On real hardware only the hardware reports memory errors.  Xen 4.17 gives dom0 no hypercall
for ``offline_page(mfn, broken=1)``: its machine-check handler (``mc_memerr_dhandler``) is
the only caller.  Making Xen believe the CPU reported an error (``xen-mceinj``, a test tool
that interposes MSR values; ``tools/tests/mce-test``) would be a lie with consequences: the
injected record comes back through dom0's ``/dev/mcelog`` as if the memory had failed again
(a feedback loop into the service's own counts), and the handler crashes a PV owner.

So on real Xen, ``hard`` means *retire by policy as if broken* (:class:`PolicyHard`): the
frame is retired with every means the toolstack has, whatever the policy allows ``soft``
-- a PV owner's frame exchanged in place and, if it stays pending (granted, mapped by
dom0), the PV guest live-migrated; an HVM owner live-migrated (or exchanged in place with
``hvm = exchange``); a free frame offlined -- and kept in the retired-page list as
*broken by policy*: it is written into ``badpage=`` like every retired frame.  What Xen
reports afterwards is recorded as it is: ``offlined`` (never ``+broken``: only the hardware
path sets ``PGC_broken``), or ``offlining`` while an owner still holds it.

The simulator keeps modelling Xen's own uncorrected-error path for ``hard``
(``xenpage.backends.sim.ras.hard_offline``): there the "hardware" is part of the model.
"""

from __future__ import annotations

from typing import Callable

from ..abi import sysctl as S
from ..toolstack.offline import mem_offline
from ..toolstack.outcomes import Kind
from ..toolstack.retire import RetireOptions

#: the outcome reason a frame retired by ``hard`` on real Xen keeps in the list
BROKEN_BY_POLICY = "broken-by-policy"


class PolicyHard:
    """``hard(hv, mfn) -> dict`` for a real Xen host: ``mem-offline`` with live migration as
    the fallback for every owner, then what Xen reports.  ``effect`` is ``offlined`` (Xen
    has it offlined), ``pending`` (offline-pending: its owner -- dom0, a system domain --
    still holds it; Xen offlines it when freed) or ``failed`` (with ``error``)."""

    #: the service records the outcome under this reason (not "marked broken")
    reason = BROKEN_BY_POLICY

    def __init__(self, hvm: str = "migrate", offline: Callable = mem_offline, journal_dir=None):
        self.hvm = hvm if hvm in ("migrate", "exchange") else "migrate"
        self.offline = offline
        self.journal_dir = journal_dir

    def __call__(self, hv, mfn: int) -> dict:
        res = self.offline(hv, [mfn], retire=RetireOptions(hvm=self.hvm, fallback="migrate"),
                           journal_dir=self.journal_dir)
        o = res.outcomes[0]
        rc, st = hv.page_offline_op(S.sysctl_query_page_offline, mfn, mfn)
        status = int(st[0]) if rc == 0 and st is not None else None
        out = {"method": "policy", "kind": o.kind.value, "reason": o.reason.value,
               "detail": o.detail, "owner": o.domid, "query_status": status,
               "broken_by_policy": True}
        if status is not None and status & S.PG_OFFLINE_STATUS_OFFLINED:
            out["effect"] = "offlined"
        elif status is not None and status & S.PG_OFFLINE_STATUS_OFFLINE_PENDING \
                and o.kind not in (Kind.FAILED, Kind.ROLLED_BACK):
            out["effect"] = "pending"
        else:
            out["effect"] = "failed"
            out["error"] = f"{o.kind.value}" + (f" ({o.reason.value})" if o.reason.value else "") \
                + (f": {o.detail}" if o.detail else "")
        return out
