"""Simulated durations of the hypervisor's work (seconds): what moves the simulated host's
clock when dom0 pauses a guest, allocates, copies or flushes.  Order-of-magnitude figures
for a current x86 server, stated so that they can be argued with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CostModel:
    #: a privcmd ioctl from dom0 user space into Xen and back
    hypercall_s: float = 1.0e-6
    #: ``domain_pause``: per vCPU, ``vcpu_sleep_sync`` (IPI, VM exit, deschedule)
    pause_vcpu_s: float = 5.0e-6
    #: ``domain_unpause``: wake the vCPUs
    unpause_s: float = 2.0e-6
    #: ``alloc_domheap_page`` / ``free_domheap_page``
    page_alloc_s: float = 0.3e-6
    #: one p2m table: take a pool page, write its 512 entries (``ept_split_super_page``)
    ept_table_s: float = 1.0e-6
    #: copy within the host's memory (bytes per second)
    memcpy_bps: float = 10e9
    #: ``ept_sync_domain`` / ``p2m_tlb_flush``: on every pCPU that ran the guest
    ept_flush_s: float = 4.0e-6
    #: ``xenforeignmemory_map`` + ``munmap`` of a batch: the privcmd ioctl and dom0's PTEs
    map_batch_s: float = 8.0e-6


COSTS = CostModel()
