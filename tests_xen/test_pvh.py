"""A PVH memtest guest's frames retired on stock Xen 4.17 (lab group ``pvh``, its own boot):
found through dom0's page tables, retired in place (one frame, then eight under one pause,
then the CLI's ``--hvm=exchange``), then by live migration through libxl (the CLI's default
policy).  See translated.py.  Run with ``tests/contract/test_translated_contract.py`` as well,
the contract's translated part goes on this guest before its migration (conftest.py); the
``hvm`` group does that, this one not by default (tests_xen/README.md).

One guest, as the ``hvm`` group: on the lazy-FPU lab a migration after in-place steps failed,
so a second guest was migrated instead; on the eager-FPU lab the same guest migrates after
its in-place steps (``hvm``, ``dom0-watch``), and every guest more on this TCG machine is one
more chance of the translated guests' triple faults (tests_xen/README.md)."""

from __future__ import annotations

import pytest

import translated as T

KIND = "pvh"


@pytest.fixture(scope="session")
def guest(xen, rec):
    return T.start(KIND, rec)


def test_pvh_frames(xen, rec, guest):
    T.check_frames(xen, guest, rec)


def test_pvh_in_place_one_frame(xen, rec, guest):
    T.retire_in_place(xen, guest, [T.ONE], rec, "in-place-1")


def test_pvh_in_place_batch(xen, rec, guest):
    T.retire_in_place(xen, guest, T.BATCH, rec, f"in-place-{len(T.BATCH)}")


@pytest.mark.skipif(not T.cli_enabled(), reason="XENPAGE_LAB_HVM_CLI=0")
def test_pvh_cli_exchange(xen, rec, guest):
    T.cli_exchange(xen, guest, rec)


def test_pvh_live_migration(xen, rec, guest):
    """``xenpage mem-offline`` with the default policy (XENPAGE_LAB_HVM_CLI=0: the toolstack's
    ``migrate_for`` called directly)."""
    if T.cli_enabled():
        T.cli_migrate(xen, guest, rec)
    else:
        T.migrate_off(xen, guest, rec)


def test_pvh_no_guest_crashed(rec):
    T.no_guest_crashed(rec, KIND)
