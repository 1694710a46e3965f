"""Fidelity switches: where Xen 4.17 has a defect that changes outcomes, the simulator has it
too (on by default) so that tools are tested against the real behaviour, and a switch to
turn it off so that a test can show what the behaviour would be without it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


class HostHang(Exception):
    """The real host would hang here (a CPU spinning forever with interrupts off in Xen).

    Raised instead of hanging, loudly, so that tests can prove a tool never gets here."""


@dataclass
class Quirks:
    #: Xen 4.17: ``p2m_pod_offline_or_broken_hit`` takes a PV domain's never-initialised PoD
    #: lock; taken first on physical CPU 0 the recursive spinlock is corrupted and the next
    #: acquisition (the next owned-frame offline of that domain, or its destruction) spins
    #: forever (xen-lab.md, "A hang in Xen 4.17's page offlining").
    pod_lock_hang: bool = True
    #: ``memory_exchange`` fail-after-steal: ``assign_pages`` resets count_info, so a stolen
    #: offlining frame handed back returns to ``inuse`` and loses PGC_broken (QUIRK 7.C5).
    assign_resets_state: bool = True

    def to_state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, st: dict) -> "Quirks":
        return cls(**{k: v for k, v in st.items() if k in cls.__dataclass_fields__})
