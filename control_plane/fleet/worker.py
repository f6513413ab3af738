"""What runs inside a worker process: migrate one database under its advisory lock.

Why worker processes (and not threads, asyncio, or rendered SQL): Alembic's
``context`` and ``op`` are process-wide globals, so two migrations in one
process corrupt each other (PITFALLS: Migrations). Rendering offline SQL once
and replaying it per database would be faster, but it silently breaks every
migration that looks at the database (``op.get_bind()``, data migrations,
reflection) and skips whatever Python logic a migration runs; the fleet must
run exactly what ``alembic upgrade`` runs. So each worker process runs one
ordinary online migration at a time, and the runner bounds concurrency by the
number of processes. The cost (a process start and a script-directory load) is
only paid for targets that actually need work: up-to-date targets are skipped
by the parent from a single version query, without ever reaching a worker.

Per target, in ONE transaction:

1. ``pg_advisory_xact_lock(7302, 2)`` on the target database, waiting at most
   ``lock_timeout_s`` (PostgreSQL's ``lock_timeout`` bounds the wait), so two
   runners (or a runner and a move's ``migrate_target_to``) never migrate the
   same database at once; a blocked target fails with a message naming the
   holder instead of hanging;
2. re-read the revision under the lock (another runner may have just finished);
3. run Alembic on this connection (``env_common`` sees the open transaction
   and does not commit) and commit once. A migration that fails halfway rolls
   the whole transaction back, leaving the target at its previous revision.
"""

from __future__ import annotations

import signal
import time

from alembic import command
from sqlalchemy import Connection, create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from control_plane import schema
from control_plane.fleet.models import Job, Outcome, TargetStatus
from control_plane.interlock import INTERLOCK_NAMESPACE, TARGET_MIGRATION_KEY
from data_plane.dsn import sync_url

APPLICATION_NAME = "tenantctl migrate"
CONNECT_TIMEOUT_S = 10

_HOLDERS = text(
    "SELECT string_agg(format('pid %s (%s, since %s)', a.pid, "
    "coalesce(nullif(a.application_name, ''), 'no application_name'), "
    "date_trunc('second', a.xact_start)), '; ') "
    "FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
    "WHERE l.locktype = 'advisory' AND l.granted AND l.classid = :ns AND l.objid = :key "
    "AND l.objsubid = 2 AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())"
)


class TargetBusyError(Exception):
    """Another runner holds this database's migration lock."""


def init_worker() -> None:
    """Worker processes ignore Ctrl-C: the parent decides, and in-flight DDL completes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def read_version(conn: Connection) -> str | None:
    """The revision inside the current transaction (two queries: an error would abort it)."""
    if conn.execute(text("SELECT to_regclass('public.alembic_version')")).scalar() is None:
        return None
    rows = conn.execute(text("SELECT version_num FROM public.alembic_version ORDER BY 1")).scalars().all()
    return "+".join(str(r) for r in rows) or None


def _lock(conn: Connection, timeout_s: float) -> None:
    previous = conn.execute(text("SELECT current_setting('lock_timeout')")).scalar_one()
    wait_ms = max(1, int(timeout_s * 1000))
    conn.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": f"{wait_ms}ms"})
    try:
        conn.execute(
            text("SELECT pg_advisory_xact_lock(:ns, :key)"),
            {"ns": INTERLOCK_NAMESPACE, "key": TARGET_MIGRATION_KEY},
        )
    except OperationalError as exc:
        if getattr(exc.orig, "sqlstate", None) != "55P03":  # lock_not_available
            raise
        raise TargetBusyError(f"waited {timeout_s:g}s") from None
    # The bound was for the lock above only; the migration's own DDL runs under
    # the database's configured lock_timeout.
    conn.execute(text("SELECT set_config('lock_timeout', :v, true)"), {"v": str(previous)})


def _holders(conn: Connection) -> str:
    conn.rollback()
    found = conn.execute(_HOLDERS, {"ns": INTERLOCK_NAMESPACE, "key": TARGET_MIGRATION_KEY}).scalar()
    conn.rollback()
    return str(found) if found else "a session that has since released it"


def _describe(exc: BaseException) -> str:
    orig = getattr(exc, "orig", None)  # a SQLAlchemy DBAPIError: the driver's message is the useful part
    text_ = str(orig if orig is not None else exc).strip() or type(exc).__name__
    return f"{type(orig if orig is not None else exc).__name__}: {' '.join(text_.split())}"


def migrate_one(job: Job) -> Outcome:
    """Migrate one target; never raises (every failure becomes a FAILED outcome)."""
    started = time.monotonic()
    before: str | None = None
    cfg = schema.alembic_config(schema.Stream.TENANT, app_role=job.app_role, replication_role=job.replication_role)
    cfg.set_main_option("script_location", job.script_location)
    engine = create_engine(
        sync_url(job.dsn),
        poolclass=NullPool,
        connect_args={"application_name": APPLICATION_NAME, "connect_timeout": CONNECT_TIMEOUT_S},
    )
    try:
        with engine.connect() as conn:
            try:
                with conn.begin():
                    _lock(conn, job.lock_timeout_s)
                    before = read_version(conn)
                    if before == job.destination:
                        return Outcome(TargetStatus.SKIPPED, before, before, time.monotonic() - started)
                    cfg.attributes["connection"] = conn
                    if job.action == "upgrade":
                        command.upgrade(cfg, job.destination or "base")
                    else:
                        command.downgrade(cfg, job.destination or "base")
                    after = read_version(conn)
            except TargetBusyError as exc:
                holders = _holders(conn)
                message = (
                    f"blocked: another tenantctl migration holds this database's migration lock "
                    f"({holders}); {exc}, not migrated -- re-run when it has finished"
                )
                return Outcome(TargetStatus.FAILED, before, before, time.monotonic() - started, message)
        return Outcome(TargetStatus.SUCCEEDED, before, after, time.monotonic() - started)
    except Exception as exc:  # noqa: BLE001 -- a migration script can raise anything; the fleet
        # must record it against this target (which rolled back) and carry on with the others.
        return Outcome(TargetStatus.FAILED, before, before, time.monotonic() - started, _describe(exc))
    finally:
        engine.dispose()
