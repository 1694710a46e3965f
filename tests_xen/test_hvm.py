"""A HVM memtest guest's frames retired on stock Xen 4.17 (lab group ``hvm``, its own boot):
found through dom0's page tables, retired in place (one frame, then a batch under one pause),
then by live migration through libxl.  See translated.py."""

from __future__ import annotations

import pytest

import translated as T

KIND = "hvm"


@pytest.fixture(scope="session")
def guest(xen, rec):
    return T.start(KIND, rec)


def test_hvm_frames(xen, rec, guest):
    T.check_frames(xen, guest, rec)


def test_hvm_in_place_one_frame(xen, rec, guest):
    T.retire_in_place(xen, guest, [T.ONE], rec, "in-place-1")


def test_hvm_in_place_batch(xen, rec, guest):
    T.retire_in_place(xen, guest, T.BATCH, rec, f"in-place-{len(T.BATCH)}")


@pytest.mark.skipif(not T.cli_enabled(), reason="XENPAGE_LAB_HVM_CLI=0")
def test_hvm_cli_exchange(xen, rec, guest):
    T.cli_exchange(xen, guest, rec)


def test_hvm_live_migration(xen, rec, guest):
    T.migrate_off(xen, guest, rec)


def test_hvm_no_guest_crashed(rec):
    T.no_guest_crashed(rec, KIND)
