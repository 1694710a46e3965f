"""The M2P lives in Xen's frames: XENMEM_machphys_mfn_list names its 2 MiB chunks, dom0 maps
them read-only as DOMID_XEN's (xc_map_m2p), and they read as the table itself."""


from xenpage.abi import errno as E
from xenpage.abi import sysctl as S
from xenpage.abi.xen import DOMID_XEN, INVALID_M2P_ENTRY
from xenpage.hypervisor import invariants


def test_machphys_mfn_list_covers_the_table(host):
    chunks = host.hypercalls(0).machphys_mfn_list(1 << 20)
    assert len(chunks) == (host.nframes * 8 + (1 << 21) - 1) >> 21
    assert all(c % 512 == 0 for c in chunks)
    assert host.hypercalls(0).machphys_mfn_list(1) == chunks[:1]
    for c in chunks:
        assert host.ft.owner(c) == DOMID_XEN and host.ft.owner(c + 511) == DOMID_XEN


def test_mapped_m2p_frames_read_as_the_m2p(host, hv):
    g = host.guests[1]
    p2m = g.p2m()
    chunks = host.hypercalls(0).machphys_mfn_list(1 << 20)
    frame = int(p2m[100]) // 512
    m = hv.map_foreign(DOMID_XEN, [chunks[frame // 512] + frame % 512], False)
    assert not isinstance(m, int)
    assert int(m.array[0, int(p2m[100]) % 512]) == 100
    m.unmap()
    assert hv.m2p(p2m[:50]).tolist() == list(range(50))
    assert hv.m2p([host.nframes, -1]).tolist() == [INVALID_M2P_ENTRY] * 2
    assert invariants.check(host) == []


def test_a_guest_cannot_map_the_m2p_writable_and_offline_leaves_it_pending(host, hv):
    chunk = host.m2p_chunks[0]
    rc, _ = host.hypercalls(1).foreign_map(DOMID_XEN, [chunk], True)
    assert rc == -E.EPERM
    rc, st = hv.page_offline_op(S.sysctl_page_offline, chunk, chunk)
    assert rc == 0 and int(st[0]) == (S.PG_OFFLINE_OWNED | S.PG_OFFLINE_PENDING | DOMID_XEN << 16)
    assert invariants.check(host) == []
