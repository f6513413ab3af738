"""Replication-slot states for tests: a keep size for a block, and WAL pushed past it.

Shared by the engine's lost-slot tests and the doctor's at-risk check. The
slot must be idle (nothing confirming it), or it would keep up.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import psycopg

from data_plane.dsn import libpq


@contextlib.contextmanager
def slot_keep_size(admin_dsn: str, value: str) -> Iterator[None]:
    """``max_slot_wal_keep_size`` of the cluster for the block (ALTER SYSTEM, then RESET)."""
    with psycopg.connect(libpq(admin_dsn), autocommit=True) as admin:
        admin.execute(f"ALTER SYSTEM SET max_slot_wal_keep_size = '{value}'")
        admin.execute("SELECT pg_reload_conf()")
        try:
            yield
        finally:
            admin.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
            admin.execute("SELECT pg_reload_conf()")


def slot_status(admin_dsn: str, slot: str) -> tuple[str, bool] | None:
    """(wal_status, active) of the slot, None if there is none."""
    with psycopg.connect(libpq(admin_dsn), autocommit=True) as conn:
        row = conn.execute(
            "SELECT wal_status, active FROM pg_replication_slots WHERE slot_name = %s", (slot,)
        ).fetchone()
    return None if row is None else (str(row[0]), bool(row[1]))


def push_slot_past_its_wal(admin_dsn: str, slot: str) -> None:
    """Write and switch WAL segments, then checkpoint, until the server invalidates the idle slot."""
    with psycopg.connect(libpq(admin_dsn), autocommit=True) as conn:
        for _ in range(20):
            for _ in range(3):
                conn.execute("SELECT pg_logical_emit_message(false, 'tenantctl-test', 'wal')")
                conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
            if slot_status(admin_dsn, slot) == ("lost", False):
                return
    raise AssertionError(f"the slot was not invalidated: {slot_status(admin_dsn, slot)}")


def push_slot_past_its_keep_size(admin_dsn: str, slot: str) -> None:
    """Write and switch WAL segments, with no checkpoint, until the idle slot is past its keep size."""
    with psycopg.connect(libpq(admin_dsn), autocommit=True) as conn:
        for _ in range(10):
            conn.execute("SELECT pg_logical_emit_message(false, 'tenantctl-test', 'wal')")
            conn.execute("SELECT pg_switch_wal()")
            if slot_status(admin_dsn, slot) == ("unreserved", False):
                return
    raise AssertionError(f"the slot did not fall past its keep size: {slot_status(admin_dsn, slot)}")
