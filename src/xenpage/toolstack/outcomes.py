"""The typed outcomes of retiring a page: every MFN ends in exactly one of these."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum

from ..abi import sysctl as S


class Kind(str, Enum):
    #: the frame was offlined at once (it was free, already offlined, or a PoD cache page)
    OFFLINED = "offlined"
    #: a guest's frame was exchanged in place and the old frame is now offlined
    EXCHANGED = "exchanged"
    #: the guest was live-migrated off the frame, which is now offlined
    MIGRATED = "migrated"
    #: the frame is offline-pending and stays so (it will be offlined when freed)
    PENDING = "pending"
    #: nothing was changed: the frame cannot be offlined or exchanged this way
    REFUSED = "refused"
    #: an exchange was attempted, failed, and every change was undone bit for bit
    ROLLED_BACK = "rolled-back"
    #: the operation failed and the state could not be fully restored (must never happen)
    FAILED = "failed"


class Reason(str, Enum):
    NONE = ""
    # refused
    INVALID_MFN = "invalid-mfn"
    XEN_IMAGE = "xen-image"
    NOT_RAM = "not-conventional-ram"
    BROKEN = "broken"
    NOT_PENDING = "not-offline-pending"
    DOM0 = "dom0"
    HVM = "hvm-guest"
    SYSTEM_DOMAIN = "system-domain"
    NO_DOMAIN = "no-such-domain"
    NOT_SUSPENDED = "not-suspended"
    M2P_MISMATCH = "m2p-p2m-mismatch"
    NO_P2M = "p2m-unavailable"
    CR3_ROOT = "vcpu-root-table"
    P2M_FRAME = "p2m-frame"
    # pending
    GRANTED = "granted"
    XEN_HEAP = "xen-heap"
    ANONYMOUS = "anonymous"
    REFERENCED = "referenced-elsewhere"
    SUSPEND_FAILED = "suspend-failed"
    MIGRATION_NEEDED = "migration-needed"
    OWNER_CRASHED = "owner-crashed"
    #: the owner is being destroyed (``XEN_DOMINF_dying``): Xen frees the frame, and so
    #: offlines it, when the last reference to it goes
    DYING = "owner-dying"
    NO_HEADROOM = "no-allocation-headroom"
    RECOVERY_NEEDED = "recovery-needed"
    # rolled back / failed
    EXCHANGE_FAILED = "exchange-failed"
    CLEAR_FAILED = "clear-failed"
    RESTORE_FAILED = "restore-failed"


@dataclass
class Outcome:
    mfn: int
    kind: Kind
    reason: Reason = Reason.NONE
    detail: str = ""
    domid: int | None = None
    gpfn: int | None = None
    new_mfn: int | None = None
    ptes: int = 0
    status: int | None = None
    errno: int = 0
    extra: dict = field(default_factory=dict)
    #: the sysctl ``cmd`` whose answer ``status`` is: a query (the exchange's and the
    #: migration's checks), or the offline itself (:func:`xenpage.toolstack.offline._classify`)
    status_op: int = S.sysctl_query_page_offline

    def to_json(self) -> dict:
        d = asdict(self)
        del d["status_op"]
        d["kind"] = self.kind.value
        d["reason"] = self.reason.value
        d["mfn_hex"] = f"{self.mfn:x}"
        # the status word decoded as every command decodes it (hptool._base, the CLI)
        d["status"] = None if self.status is None or self.status < 0 else \
            S.decode(int(self.status), self.status_op)
        if self.new_mfn is not None:
            d["new_mfn_hex"] = f"{self.new_mfn:x}"
        return d

    @property
    def ok(self) -> bool:
        return self.kind in (Kind.OFFLINED, Kind.EXCHANGED, Kind.MIGRATED)


def not_pending(mfn: int, status: int, domid: int) -> Outcome | None:
    """The refusal for a frame an exchange may not touch, from its ``query_page_offline``
    answer (negative: the query failed): not queryable, or not offline-pending.  None when
    the frame is offline-pending."""
    if status < 0:
        return Outcome(mfn, Kind.REFUSED, Reason.INVALID_MFN, "the frame cannot be queried", domid=domid)
    if not status & S.PG_OFFLINE_STATUS_OFFLINE_PENDING:
        what = "already offlined" if status & S.PG_OFFLINE_STATUS_OFFLINED else "online (not marked offline)"
        return Outcome(mfn, Kind.REFUSED, Reason.NOT_PENDING, f"frame is {what}", domid=domid, status=status)
    return None
