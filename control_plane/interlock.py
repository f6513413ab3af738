"""Fleet migrations and tenant moves exclude each other (DESIGN §4).

One advisory lock on the **catalog** database, key ``(INTERLOCK_NAMESPACE,
FLEET_MIGRATION_KEY)`` = ``(7302, 1)``, arbitrates between the two:

* the fleet migration runner holds it **exclusively at session level** for its
  whole run (:func:`fleet_migration_lock`) and, once it holds it, refuses to
  start while any tenant has status ``'moving'``; before each target it checks
  that its session still holds it (:meth:`FleetLock.lost`: a session ended by a
  catalog failover releases the lock; after taking it back the runner re-reads
  its targets, since an onboarding may have added a silo in the gap);
* :func:`fleet_migration_excluded` holds it shared for a block of work that
  no ``'moving'`` tenant covers (a new tenant's silo being migrated);
* a move marks its tenant ``'moving'`` inside a catalog transaction that first
  takes the same lock **shared at transaction level without waiting**
  (:func:`mark_tenant_moving` / :func:`mark_tenant_moving_async`) and refuses
  with :class:`~control_plane.exceptions.MigrationInProgressError` (409
  ``migration_in_progress``, an :class:`OperationLockedError`) while a runner
  holds it.

Why this closes every race: a move that is marking a tenant holds the shared
lock until its transaction commits, so the runner's exclusive request waits for
that commit and then *sees* the ``'moving'`` row (READ COMMITTED: the check is a
new statement after the lock, with a fresh snapshot). A move that starts after
the runner got the lock fails its try-lock. Moves never block each other (the
lock is shared), and no lock is held between transactions of a move: the
``'moving'`` status itself is what keeps runners out for the move's duration.

A move migrates its own new silo (``control_plane.fleet.migrate_target_to``)
while the tenant is ``'moving'``, so that never conflicts with a fleet run.

Namespace 7301 belongs to the per-tenant fence locks of the tenant schema; 7302
is tenantctl's control namespace: key 1 is this interlock (catalog database),
key 2 the per-database fleet migration lock (``control_plane.fleet.worker``).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session

from control_plane.exceptions import IllegalTransitionError, MigrationInProgressError, OperationLockedError
from data_plane.dsn import libpq
from data_plane.exceptions import NotFoundError

INTERLOCK_NAMESPACE = 7302
FLEET_MIGRATION_KEY = 1
TARGET_MIGRATION_KEY = 2  # taken on each target database, see control_plane.fleet.worker

APPLICATION_NAME = "tenantctl migrate"

_TRY_SHARED = text("SELECT pg_try_advisory_xact_lock_shared(:ns, :key)")
_MARK_MOVING = text(
    "UPDATE tenants SET status = 'moving', version = version + 1, updated_at = now() "
    "WHERE id = :tenant_id AND status = 'active' RETURNING status"
)
_TENANT_STATUS = text("SELECT status FROM tenants WHERE id = :tenant_id")

_HOLDERS = """
SELECT l.pid, l.mode, coalesce(a.application_name, ''), a.backend_start
  FROM pg_locks l LEFT JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
         SELECT oid FROM pg_database WHERE datname = current_database())
   AND l.classid = %s::oid AND l.objid = %s::oid AND l.objsubid = 2
   AND l.pid <> pg_backend_pid()
"""

FLEET_RUNNING_MESSAGE = (
    "a fleet migration is running (`tenantctl migrate`); moves are refused until it finishes, retry then"
)


@dataclass
class FleetLock:
    """The interlock as held by a runner; ``conn`` is its catalog session."""

    conn: psycopg.Connection[tuple[object, ...]]
    waited_s: float
    catalog_dsn: str
    # How often :meth:`lost` took the lock back on a new session. While the
    # lock was down an onboarding may have added a silo the run never loaded,
    # so the runner re-reads its targets whenever this changes.
    retakes: int = 0

    def lost(self) -> str | None:
        """None while the runner holds the interlock; else why it must start no more targets.

        The lock dies with its session, and a catalog failover or a network
        cut ends the session under a live runner: a move may then have marked
        its tenant and started on the databases this run migrates. So a lost
        lock is taken back on a new session only if it is free and no tenant
        is moving; otherwise the run stops (in-flight migrations finish).
        """
        try:
            self.conn.execute("SELECT 1")
            return None
        except psycopg.Error:
            self.conn.close()
        try:
            conn = _connect(self.catalog_dsn)
        except psycopg.Error as exc:
            return f"its catalog session ended and the catalog is unreachable ({str(exc).strip()})"
        try:
            _acquire_exclusive(conn, 0)
            moving = moving_tenants(conn)
        except OperationLockedError as exc:  # names the holder
            conn.close()
            return f"its catalog session ended, and {exc.message}"
        except psycopg.Error as exc:
            conn.close()
            return f"its catalog session ended and could not be taken back ({str(exc).strip()})"
        if moving:
            conn.close()  # releases the lock
            return f"its catalog session ended and meanwhile a move started: {', '.join(moving)}"
        self.conn = conn
        self.retakes += 1
        return None

    def release(self) -> None:
        """Unlock and close; a session that already ended holds nothing any more."""
        with contextlib.suppress(psycopg.Error):
            self.conn.execute("SELECT pg_advisory_unlock(%s, %s)", (INTERLOCK_NAMESPACE, FLEET_MIGRATION_KEY))
        self.conn.close()


def _connect(catalog_dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(libpq(catalog_dsn), autocommit=True, application_name=APPLICATION_NAME)


def describe_holders(conn: psycopg.Connection[tuple[object, ...]], namespace: int, key: int) -> str:
    """Who holds advisory lock ``(namespace, key)`` in this database, for error text."""
    rows = conn.execute(_HOLDERS, (namespace, key)).fetchall()
    if not rows:
        return "unknown holder (it may just have been released)"
    parts = []
    for pid, mode, app, started in rows:
        who = "a move or provisioning workflow" if mode == "ShareLock" else "a fleet migration"
        parts.append(f"{who} (pid {pid}, {app or 'no application_name'}, connected {started})")
    return "; ".join(parts)


def _acquire_exclusive(conn: psycopg.Connection[tuple[object, ...]], timeout_s: float) -> float:
    """Take the interlock exclusively, polling until ``timeout_s``; return the time waited.

    Polling ``pg_try_advisory_lock`` rather than a blocking ``pg_advisory_lock``
    under ``lock_timeout``: a blocked exclusive request would queue *ahead* of
    later shared requests in PostgreSQL's lock queue, so a merely waiting runner
    would already make moves fail their try-lock. Polling queues nothing.
    """
    started = time.monotonic()
    deadline = started + max(timeout_s, 0.0)
    delay = 0.05
    while True:
        row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (INTERLOCK_NAMESPACE, FLEET_MIGRATION_KEY)).fetchone()
        if row is not None and row[0]:
            return time.monotonic() - started
        if time.monotonic() >= deadline:
            holders = describe_holders(conn, INTERLOCK_NAMESPACE, FLEET_MIGRATION_KEY)
            raise OperationLockedError(
                f"the migration/move interlock on the catalog is busy after waiting {timeout_s:g}s: "
                f"held by {holders}; retry when it is released"
            )
        time.sleep(min(delay, max(deadline - time.monotonic(), 0.0)))
        delay = min(delay * 2, 0.5)


def moving_tenants(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    rows = conn.execute("SELECT slug FROM tenants WHERE status = 'moving' ORDER BY slug").fetchall()
    return [str(r[0]) for r in rows]


@contextlib.contextmanager
def fleet_migration_lock(catalog_dsn: str, *, timeout_s: float = 10.0) -> Iterator[FleetLock]:
    """Hold the interlock exclusively for a whole fleet run (session-level lock).

    Waits at most ``timeout_s`` for another runner or an in-flight "mark moving"
    transaction, then raises :class:`OperationLockedError` naming the holder.
    Under the lock, refuses with :class:`OperationLockedError` listing every
    tenant whose status is ``'moving'``. The lock dies with the session, so a
    crashed runner never leaves the catalog locked.
    """
    conn = _connect(catalog_dsn)
    try:
        waited = _acquire_exclusive(conn, timeout_s)
    except BaseException:
        conn.close()
        raise
    lock = FleetLock(conn=conn, waited_s=waited, catalog_dsn=catalog_dsn)
    try:
        moving = moving_tenants(conn)
        if moving:
            raise OperationLockedError(
                f"{len(moving)} tenant(s) are being moved: {', '.join(moving)}; "
                "a fleet migration cannot run during a move, retry when the moves have finished"
            )
        yield lock
    finally:
        # Never lets a dead session's error replace the run's report.
        lock.release()


@contextlib.contextmanager
def fleet_migration_excluded(catalog_dsn: str) -> Iterator[None]:
    """Keep fleet runs out while the block runs (session-level shared lock, no waiting).

    For a workflow step that is not covered by a ``'moving'`` tenant -- e.g.
    provisioning a silo for a new tenant -- and must not interleave with a fleet
    run (it reads the pool's revision and migrates a silo the runner does not
    know yet). Raises :class:`OperationLockedError` at once if a runner holds
    the interlock; a runner that starts meanwhile waits for the block to end.
    """
    with psycopg.connect(libpq(catalog_dsn), autocommit=True, application_name="tenantctl workflow") as conn:
        row = conn.execute(
            "SELECT pg_try_advisory_lock_shared(%s, %s)", (INTERLOCK_NAMESPACE, FLEET_MIGRATION_KEY)
        ).fetchone()
        if row is None or not row[0]:
            raise MigrationInProgressError(FLEET_RUNNING_MESSAGE)
        try:
            yield
        finally:
            held = _unlock_shared(conn)
        if not held:
            # The lock died with its session (a catalog failover): a fleet run
            # may have started meanwhile, so the block's work is not known to
            # be excluded. The caller's step retries it under a fresh lock.
            raise MigrationInProgressError(
                "the migration/move interlock's catalog session ended during the work; retry it"
            )


def _unlock_shared(conn: psycopg.Connection[tuple[object, ...]]) -> bool:
    """Release the shared interlock; False if it was no longer held (its session ended)."""
    try:
        row = conn.execute(
            "SELECT pg_advisory_unlock_shared(%s, %s)", (INTERLOCK_NAMESPACE, FLEET_MIGRATION_KEY)
        ).fetchone()
    except psycopg.Error:
        return False
    return bool(row and row[0])


def _refuse_if_not_moved(status: object, tenant_id: uuid.UUID) -> None:
    if status is None:
        raise NotFoundError(f"no tenant with id {tenant_id}")
    raise IllegalTransitionError(f"tenant {tenant_id} is {status}; only an active tenant can start a move")


def mark_tenant_moving(conn: Connection | Session, tenant_id: uuid.UUID) -> None:
    """Inside the caller's catalog transaction: lock out fleet runs, then set status 'moving'.

    ``conn`` is a SQLAlchemy ``Connection`` or ``Session`` in an open
    transaction (e.g. a DBOS transaction). Raises :class:`OperationLockedError`
    at once if a fleet migration holds the interlock (never waits: a move is
    retried by its workflow), :class:`IllegalTransitionError` if the tenant is
    not ``'active'`` (already moving, suspended ...), :class:`NotFoundError` if
    it does not exist. The shared lock is released when the transaction ends.
    """
    locked = conn.execute(_TRY_SHARED, {"ns": INTERLOCK_NAMESPACE, "key": FLEET_MIGRATION_KEY})
    if not locked.scalar_one():
        raise MigrationInProgressError(FLEET_RUNNING_MESSAGE)
    updated = conn.execute(_MARK_MOVING, {"tenant_id": tenant_id})
    if updated.first() is None:
        status = conn.execute(_TENANT_STATUS, {"tenant_id": tenant_id}).scalar_one_or_none()
        _refuse_if_not_moved(status, tenant_id)


async def mark_tenant_moving_async(conn: AsyncConnection | AsyncSession, tenant_id: uuid.UUID) -> None:
    """:func:`mark_tenant_moving` for SQLAlchemy's asyncio ``AsyncConnection`` / ``AsyncSession``."""
    locked = await conn.execute(_TRY_SHARED, {"ns": INTERLOCK_NAMESPACE, "key": FLEET_MIGRATION_KEY})
    if not locked.scalar_one():
        raise MigrationInProgressError(FLEET_RUNNING_MESSAGE)
    updated = await conn.execute(_MARK_MOVING, {"tenant_id": tenant_id})
    if updated.first() is None:
        status = (await conn.execute(_TENANT_STATUS, {"tenant_id": tenant_id})).scalar_one_or_none()
        _refuse_if_not_moved(status, tenant_id)
