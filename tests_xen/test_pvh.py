"""PVH memtest guests' frames retired on stock Xen 4.17 (lab group ``pvh``, its own boot):
found through dom0's page tables, retired in place (one frame, then eight under one pause) in
one guest, and by live migration through libxl in a second guest built at the start.  See
translated.py.

Two guests, because in three lab runs a live migration of a guest that had had a frame
retired in place failed (the sender's libxenguest: ``Unknown type 0xffffffffffffffff for pfn
0xfcbf0``, then ``Mapping of pfn 0x13400 (mfn 0x13400) failed -22``; then the receiving xl
died of SIGSEGV), while the same migration without the in-place step passed twice
(tests_xen/README.md)."""

from __future__ import annotations

import pytest

import translated as T

KIND = "pvh"


@pytest.fixture(scope="session")
def guests(xen, rec):
    # both built before anything is offlined (Xen 4.17's misaligned buddy split)
    return T.start(KIND, rec), T.start(KIND, rec, name="pvhmig")


@pytest.fixture(scope="session")
def guest(guests):
    return guests[0]


def test_pvh_frames(xen, rec, guest):
    T.check_frames(xen, guest, rec)


def test_pvh_in_place_one_frame(xen, rec, guest):
    T.retire_in_place(xen, guest, [T.ONE], rec, "in-place-1")


def test_pvh_in_place_batch(xen, rec, guest):
    T.retire_in_place(xen, guest, T.BATCH, rec, f"in-place-{len(T.BATCH)}")


@pytest.mark.skipif(not T.cli_enabled(), reason="XENPAGE_LAB_HVM_CLI=0")
def test_pvh_cli_exchange(xen, rec, guest):
    T.cli_exchange(xen, guest, rec)


def test_pvh_live_migration(xen, rec, guests):
    """``xenpage mem-offline`` with the default policy (XENPAGE_LAB_HVM_CLI=0: the backend's
    ``live_migrate`` called directly)."""
    if T.cli_enabled():
        T.cli_migrate(xen, guests[1], rec)
    else:
        T.migrate_off(xen, guests[1], rec)


def test_pvh_no_guest_crashed(rec):
    T.no_guest_crashed(rec, KIND)
