"""The steps of a move, each idempotent and safe to re-run after a crash.

Reference order (DESIGN §4, after Citus non-blocking moves and Vitess
MoveTables)::

    prepare_target → start_replication → wait_initial_sync → wait_caught_up
    → fence_source → final_catch_up → verify → activate_target → (flip route in
    the catalog) → retire_source → stop_replication → cleanup_source (after grace)

Offline mode replaces the replication steps with ``fence_source`` →
``copy_offline``. Until the route flips in the catalog the source stays
authoritative and :func:`abort` returns everything to how it was (the target,
activated inside the fence, is taken back while the catalog's epoch proves no
router reached it); ``cleanup_source`` is the only destructive step and
refuses to run unless the source has been retired.

Privileges: table-level work runs as the *owner* of each side (BYPASSRLS, and
``row_security = off`` so that any filtering would raise instead of silently
dropping rows); subscriptions, slots and terminating stragglers need each
side's *admin* DSN; the target server reaches the source as the replication
role (REPLICATION + BYPASSRLS: the row filter is the only filter applied).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
import structlog
from psycopg import sql
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, wait_chain, wait_fixed

from control_plane.exceptions import MoveError, MoveNotReadyError, VerificationError
from control_plane.moves.tables import (
    TENANT_BATCH_DELETE,
    TenantSequence,
    row_digest,
    sequences,
    stored_columns,
    tenant_tables,
    unmovable,
)
from data_plane.dsn import libpq

log = structlog.get_logger(__name__)

MARKERS = '"tenantctl"."move_markers"'
# The final catch-up polls for the fence's marker inside the write pause: each
# poll is one indexed lookup, and half the interval is added to the pause on average.
POLL_SECONDS = 0.001
# Once the final catch-up has waited this long (the marker normally lands in
# 10-20 ms), it also reads the subscription's apply error count, at that
# interval: an apply worker that fails (a row the target rejects, a full disk) never
# delivers the marker, and without the check the tenant stayed fenced -- its
# writes refused -- for the whole timeout (30 s) before the move gave up. The
# watch also reads the slot on the source: a lost slot counts no apply error.
APPLY_ERROR_WATCH_SECONDS = 0.1
# Citus-like back-off between catch-up attempts (5 s, 20 s, 80 s), then give up.
CATCH_UP_BACKOFF_SECONDS = (5.0, 20.0, 80.0)
DEFAULT_MAX_LAG_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class Side:
    """One database of a move.

    Its DSNs carry no password: a plan is checkpointed in the workflow's step
    outputs, which must never hold credentials. A side whose credentials sit in
    a secret store (RDS silos) names the secrets; :meth:`owner`, :meth:`admin`
    and :meth:`replication` read them at connect time.
    """

    kind: str  # 'pool' | 'silo'
    location_id: str
    owner_dsn: str
    admin_dsn: str
    replication_conninfo: str  # how the other server reaches this database as the replication role
    owner_secret: str | None = None  # secret holding the owner's (RDS master's) password
    replication_secret: str | None = None  # secret holding the replication role's password

    def owner(self) -> str:
        return _with_secret(self.owner_dsn, self.owner_secret)

    def admin(self) -> str:
        # Managed silos have no superuser: there the admin is the owner (master).
        return _with_secret(self.admin_dsn, self.owner_secret if self.admin_dsn == self.owner_dsn else None)

    def replication(self) -> str:
        return _with_secret(self.replication_conninfo, self.replication_secret)


def _with_secret(dsn: str, ref: str | None) -> str:
    from control_plane.provisioning.credentials import with_secret

    return with_secret(dsn, ref)


# Every publication, subscription and replication slot a move creates is named
# MOVE_OBJECT_PREFIX + its job id's first 24 hex digits, so that ``tenantctl
# doctor`` can tell one that no unfinished move owns (an orphaned slot keeps
# WAL until the source's disk is full).
MOVE_OBJECT_PREFIX = "tc_move_"


def move_object_name(move_id: uuid.UUID) -> str:
    return f"{MOVE_OBJECT_PREFIX}{move_id.hex[:24]}"


@dataclass(frozen=True)
class MovePlan:
    move_id: uuid.UUID
    tenant_id: uuid.UUID
    source: Side
    target: Side
    epoch: int  # the route epoch while the source serves the tenant
    mode: str = "online"  # 'online' (logical replication) | 'offline' (fence, then binary COPY)

    @property
    def name(self) -> str:
        """Publication, subscription and slot name (ASCII, < 64 bytes, unique per move)."""
        return move_object_name(self.move_id)

    @property
    def new_epoch(self) -> int:
        return self.epoch + 1


@contextlib.contextmanager
def connect(dsn: str, *, autocommit: bool = False) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(libpq(dsn), autocommit=autocommit, connect_timeout=10) as conn:
        yield conn


@contextlib.contextmanager
def _reuse(conn: psycopg.Connection[Any] | None, dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """``conn`` (an autocommit connection the caller opened) or a new autocommit one to ``dsn``.

    Steps inside the write pause take a connection opened before the fence:
    a new one costs a backend start, several milliseconds each on a loaded server.
    """
    if conn is not None:
        yield conn
        return
    with connect(dsn, autocommit=True) as own:
        yield own


def _privileged(conn: psycopg.Connection[Any]) -> None:
    """Session settings for copies and checksums (transaction-local)."""
    conn.execute(
        "SELECT set_config('row_security', 'off', true), set_config('TimeZone', 'UTC', true), "
        "set_config('DateStyle', 'ISO, YMD', true), set_config('extra_float_digits', '1', true), "
        # A row's text is what the portable checksum hashes (tables.row_digest).
        "set_config('IntervalStyle', 'postgres', true), set_config('bytea_output', 'hex', true)"
    )


def _ownership(conn: psycopg.Connection[Any], tenant_id: uuid.UUID) -> tuple[str, int] | None:
    row = conn.execute(
        "SELECT state, epoch FROM tenantctl.tenant_ownership WHERE tenant_id = %s", (tenant_id,)
    ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def _delete_tenant_rows(dsn: str, tenant_id: uuid.UUID, *, batch: int) -> int:
    """Delete the tenant's rows in bounded batches, children first; return the count."""
    deleted = 0
    with connect(dsn) as conn:
        tables = tenant_tables(conn)
        conn.commit()
        for table in reversed(tables):
            statement = sql.SQL(TENANT_BATCH_DELETE).format(t=sql.SQL(table))
            while True:
                with conn.transaction():
                    _privileged(conn)
                    count = conn.execute(statement, (tenant_id, tenant_id, batch)).rowcount
                deleted += count
                if count < batch:
                    break
    return deleted


# -- preparation --------------------------------------------------------------------------


def prepare_target(plan: MovePlan, *, batch: int = 5000) -> int:
    """Make sure the target holds nothing of the tenant (leftovers of an earlier move).

    Refuses when the target already serves the tenant: that database is
    authoritative and must never be emptied by a move; and when the source's
    schema has a tenant table the move cannot carry (``tables.unmovable``),
    before anything is created on either side.
    """
    with connect(plan.source.owner()) as src:
        problems = unmovable(src, online=plan.mode == "online")
        needed = sequences(src)
    with connect(plan.target.owner()) as conn:
        owned = _ownership(conn, plan.tenant_id)
        # The cutover advances these on the target (carry_sequences): found
        # missing or read-only there, it would fail inside the write pause.
        there = {seq.qualified: seq for seq in sequences(conn)}
        problems += [
            (seq.qualified, "a sequence of a tenant table, missing on the target")
            for seq in needed
            if seq.qualified not in there
        ]
        problems += [
            (seq.qualified, "a sequence the move's role cannot advance on the target")
            for seq in there.values()
            if not seq.usable
        ]
    if problems:
        raise MoveError("the tenant schema cannot be moved: " + "; ".join(f"{t}: {why}" for t, why in problems))
    if owned is not None and owned[0] in ("active", "fenced"):
        raise MoveError(f"the target already serves tenant {plan.tenant_id} ({owned[0]}); refusing to overwrite it")
    return _delete_tenant_rows(plan.target.owner(), plan.tenant_id, batch=batch)


# -- logical replication ------------------------------------------------------------------


def start_replication(plan: MovePlan) -> None:
    """Publication (row-filtered to the tenant) on the source, subscription on the target."""
    name = sql.Identifier(plan.name)
    tenant = sql.Literal(str(plan.tenant_id))
    with connect(plan.source.owner(), autocommit=True) as src:
        tables = [*tenant_tables(src), MARKERS]
        binary = binary_safe(src, tables)
        exists = src.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (plan.name,)).fetchone()
        if not exists:
            # DDL takes no bind parameters; the tenant id is a UUID rendered as
            # a quoted literal by psycopg, never spliced as text.
            members = [
                sql.SQL("{t} WHERE (tenant_id = {id}::uuid)").format(t=sql.SQL(table), id=tenant) for table in tables
            ]
            # No TRUNCATE: row filters do not apply to it, so a truncate of a
            # table on the source (a silo being demoted) would empty that table
            # on the target for every tenant of the pool. Via the partition
            # root: a partition's changes are published as its partitioned
            # table's, under that table's row filter (the target's partitions
            # may differ), and the initial copy reads the partitioned table.
            src.execute(
                sql.SQL(
                    "CREATE PUBLICATION {} FOR TABLE {} "
                    "WITH (publish = 'insert, update, delete', publish_via_partition_root = true)"
                ).format(name, sql.SQL(", ").join(members))
            )
    if not binary:
        log.warning(
            "move_copy_in_text", move_id=str(plan.move_id), reason="a column type is not binary-safe between databases"
        )
    with connect(plan.target.admin(), autocommit=True) as dst:
        if dst.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (plan.name,)).fetchone():
            return
    # A slot left by a crash between "slot created" and "subscription created"
    # would make CREATE SUBSCRIPTION fail; nothing consumes it, so drop it.
    _drop_slot(plan.source.admin(), plan.name)
    with connect(plan.target.admin(), autocommit=True) as dst:
        dst.execute(
            sql.SQL(
                "CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} "
                "WITH (copy_data = true, create_slot = true, slot_name = {}, streaming = on, binary = {})"
            ).format(name, sql.Literal(plan.source.replication()), name, sql.Literal(plan.name), sql.Literal(binary))
        )


# Binary transfer (PostgreSQL 16+ uses it for the initial copy too, not only
# for changes) skips every value's text output on the source and parsing on
# the target: ~27% less CPU across both servers for a 1M-row tenant's initial
# copy, which also finished ~20% sooner (3 alternating pairs, ad hoc). It is
# only safe for types whose binary form means the same on both servers:
# built-in types with send and receive functions (fixed OIDs), enums (sent as
# their label) and domains over either. An array or a composite of a
# user-defined type carries that type's OID, which differs between the two
# databases, and receiving it fails ("wrong element type"); a type with no
# binary functions fails the copy outright. A move with any such column keeps
# the text protocol.
_NOT_BINARY_SAFE = """
SELECT count(*) FROM pg_attribute AS a
JOIN pg_type AS t ON t.oid = a.atttypid
JOIN pg_type AS b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
WHERE a.attrelid = ANY(%s::regclass[]) AND a.attnum > 0 AND NOT a.attisdropped
  AND NOT (b.typtype = 'e' OR (b.oid < 16384 AND b.typsend::oid <> 0 AND b.typreceive::oid <> 0))
"""


def binary_safe(conn: psycopg.Connection[Any], tables: list[str]) -> bool:
    """Whether every column of ``tables`` can be replicated in binary between two databases (see above)."""
    row = conn.execute(_NOT_BINARY_SAFE, (tables,)).fetchone()
    return row is not None and int(row[0]) == 0


def _error_counts(conn: psycopg.Connection[Any], name: str) -> tuple[int, int]:
    """Errors the subscription's apply and table-sync workers have had ((0, 0) without statistics yet)."""
    row = conn.execute(
        "SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats WHERE subname = %s", (name,)
    ).fetchone()
    return (0, 0) if row is None else (int(row[0]), int(row[1]))


def _subscription_errors(conn: psycopg.Connection[Any], name: str) -> str:
    apply, sync = _error_counts(conn, name)
    if apply or sync:
        return f" (subscription errors: apply {apply}, sync {sync}; see the target server's log)"
    return ""


# What the initial copy has done so far, read on the target without taking a
# lock on its tables: each table's sync state, the target database's size (a
# COPY extends its table as it goes) and the rows that running table syncs
# have copied (pg_stat_progress_copy; NULL without pg_read_all_stats). A busy
# target (the pool, in a demotion) grows anyway: there only failed syncs end
# the wait. The size is a stat() of every file of the database, so the poll
# slows down as the copy goes on (a copy of minutes is seen done within 0.5 s).
_SYNC_PROGRESS = """
SELECT count(*), count(*) FILTER (WHERE r.srsubstate <> 'r'),
       string_agg(r.srsubstate::text, '' ORDER BY r.srrelid) || ':' || pg_database_size(current_database())
           || ':' || coalesce((SELECT sum(p.tuples_processed) FROM pg_stat_progress_copy AS p
                               WHERE p.datid = s.subdbid), 0),
       coalesce((SELECT sync_error_count FROM pg_stat_subscription_stats WHERE subid = s.oid), 0)
FROM pg_subscription_rel AS r JOIN pg_subscription AS s ON s.oid = r.srsubid
WHERE s.subname = %s GROUP BY s.oid
"""
INITIAL_SYNC_STALL_SECONDS = 300.0
INITIAL_SYNC_MAX_ERRORS = 3


def wait_initial_sync(
    plan: MovePlan,
    *,
    stall_timeout: float = INITIAL_SYNC_STALL_SECONDS,
    max_errors: int = INITIAL_SYNC_MAX_ERRORS,
) -> None:
    """Wait until every table of the subscription finished its initial copy.

    For as long as the copy makes progress: a large tenant's copy takes as long
    as it takes, and a fixed deadline would fail every tenant above some size
    (600 s was ~50M rows on the benchmark host). The wait ends in failure when
    nothing has moved for ``stall_timeout`` (MoveNotReadyError), or when table
    syncs have failed ``max_errors`` times (MoveError): PostgreSQL retries a
    failed sync forever, and a persistent cause -- a row the target rejects, a
    type it cannot receive -- would otherwise look like slow progress, since
    each retry copies (and extends the table) again. A slot the source has
    invalidated ends it at once (MoveError, see :func:`_slot_lag`).
    """
    with (
        connect(plan.target.admin(), autocommit=True) as dst,
        connect(plan.source.admin(), autocommit=True) as src,
    ):
        errors_before: int | None = None
        last, moved_at, pause = None, time.monotonic(), 0.05
        while True:
            row = dst.execute(_SYNC_PROGRESS, (plan.name,)).fetchone()
            if row is None:
                raise MoveError(f"subscription {plan.name} is missing on the target, or subscribes no table")
            tables, unfinished, progress, errors = int(row[0]), int(row[1]), row[2], int(row[3])
            if tables > 0 and unfinished == 0:
                return
            # A long copy under heavy pool writes is how a slot gets lost:
            # the copy's tables would never become ready, seen only as a stall.
            _slot_lag(src, plan)
            errors_before = errors if errors_before is None else errors_before
            if errors - errors_before >= max_errors:
                raise MoveError(
                    f"the initial copy keeps failing ({errors - errors_before} failed table syncs)"
                    f"{_subscription_errors(dst, plan.name)}"
                )
            now = time.monotonic()
            if progress != last:
                last, moved_at = progress, now
            elif now - moved_at > stall_timeout:
                raise MoveNotReadyError(
                    f"the initial copy made no progress for {stall_timeout:.0f}s{_subscription_errors(dst, plan.name)}"
                )
            time.sleep(pause)
            pause = min(pause * 1.5, 0.5)


def _slot_lag(src: psycopg.Connection[Any], plan: MovePlan) -> int | None:
    """Bytes of source WAL the move's slot has not confirmed (None: no slot); MoveError if the slot is lost.

    A slot that falls more than ``max_slot_wal_keep_size`` behind is
    invalidated by the source (its WAL removed, so that an abandoned slot
    cannot fill the disk): the subscription can never catch up, and waiting
    for it would only look like lag or a stalled copy until a timeout. Not
    retried (a MoveError, not MoveNotReadyError): the move is compensated and
    can be started again, with a fresh copy.
    """
    row = src.execute(
        "SELECT wal_status, pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint "
        "FROM pg_replication_slots WHERE slot_name = %s",
        (plan.name,),
    ).fetchone()
    if row is None:
        return None
    if row[0] == "lost":
        raise MoveError(
            f"the source invalidated replication slot {plan.name}: it fell more than max_slot_wal_keep_size "
            "behind, and the WAL it needed is gone; start the move again (it copies afresh)"
        )
    lag = None if row[1] is None else int(row[1])
    if row[0] == "unreserved":
        _warn_slot_at_risk(plan.name, lag)
    return lag


# Slot name -> when its "at risk" warning was last logged. The slot is read
# every 50-500 ms while a copy runs; one line per minute is enough to be seen.
_AT_RISK_WARNED: dict[str, float] = {}
AT_RISK_WARN_EVERY_SECONDS = 60.0


def _warn_slot_at_risk(slot: str, lag: int | None) -> None:
    """Say that the source will invalidate the slot at its next checkpoint, while it still can be saved.

    ``unreserved`` is the last state before ``lost``: the slot is already more
    than ``max_slot_wal_keep_size`` behind and its WAL goes at the next
    checkpoint, which fails the move and throws its copy away. Raising the
    setting (or lowering the pool's write load) now saves it; afterwards only a
    fresh copy does.
    """
    now = time.monotonic()
    if now - _AT_RISK_WARNED.get(slot, -AT_RISK_WARN_EVERY_SECONDS) < AT_RISK_WARN_EVERY_SECONDS:
        return
    if len(_AT_RISK_WARNED) > 1024:  # bounded: a long-lived worker sees many moves
        _AT_RISK_WARNED.clear()
    _AT_RISK_WARNED[slot] = now
    log.warning(
        "replication_slot_at_risk",
        slot=slot,
        lag_bytes=lag,
        hint="the slot is past max_slot_wal_keep_size: the source drops its WAL at the next checkpoint "
        "and the move fails; raise max_slot_wal_keep_size on the source to keep it",
    )


def replication_lag(plan: MovePlan) -> int | None:
    """Bytes of source WAL the subscription has not confirmed (None: no slot); MoveError if the slot is lost."""
    with connect(plan.source.admin(), autocommit=True) as src:
        return _slot_lag(src, plan)


def wait_caught_up(plan: MovePlan, *, max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES, timeout: float = 30.0) -> int:
    """Catch-up gate: return the lag once it is small; raise MoveNotReadyError if it stays large.

    Never fails open: a caller that gets MoveNotReadyError backs off and tries
    again later instead of fencing with a large backlog (Vitess refuses to
    switch while lag is high for the same reason).
    """
    deadline = time.monotonic() + timeout
    while True:
        lag = replication_lag(plan)
        if lag is None:
            raise MoveError(f"replication slot {plan.name} is missing on the source")
        if lag <= max_lag_bytes:
            return lag
        if time.monotonic() > deadline:
            raise MoveNotReadyError(f"replication lag still {lag} bytes after {timeout:.0f}s")
        time.sleep(0.1)


def catch_up_gate(
    plan: MovePlan,
    *,
    max_lag_bytes: int = DEFAULT_MAX_LAG_BYTES,
    timeout: float = 30.0,
    backoff: Sequence[float] = CATCH_UP_BACKOFF_SECONDS,
) -> int:
    """:func:`wait_caught_up`, tried again after each pause of ``backoff`` while the lag stays large.

    The gate in front of every fence (the catch-up step and the one inside
    incremental verification): a lagging target delays the move instead of
    failing it, and after the last attempt :class:`MoveNotReadyError` is raised
    -- never a fence with a large backlog (fail closed). Other errors (a missing
    slot) are not retried.
    """

    def waiting(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.info("move_catch_up_backoff", move=plan.name, attempt=state.attempt_number, reason=str(error))

    retrying = Retrying(
        retry=retry_if_exception_type(MoveNotReadyError),
        stop=stop_after_attempt(len(backoff) + 1),
        wait=wait_chain(*(wait_fixed(delay) for delay in backoff)) if backoff else wait_fixed(0),
        before_sleep=waiting,
        reraise=True,
    )
    return retrying(lambda: wait_caught_up(plan, max_lag_bytes=max_lag_bytes, timeout=timeout))


# -- fence, catch-up, verification ----------------------------------------------------------


def fence_source(
    plan: MovePlan,
    *,
    drain_timeout: float = 2.0,
    attempts: int = 3,
    conn: psycopg.Connection[Any] | None = None,
) -> None:
    """Drain in-flight tenant transactions, then make the source refuse the tenant (I4).

    ``fence_tenant`` takes the tenant's advisory lock exclusively: it waits for
    every transaction that began with ``begin_tenant`` and blocks new ones. A
    straggler still holding the lock after ``drain_timeout`` is terminated (its
    transaction rolls back: it was never acknowledged). The fence also writes
    this move's marker, replicated in commit order behind every earlier write.
    ``conn``: an autocommit connection to the source as its owner, opened
    before the pause (else one is opened here).
    """
    for attempt in range(attempts):
        try:
            with _reuse(conn, plan.source.owner()) as src:
                # One statement, its own transaction (autocommit): one round
                # trip inside the pause instead of four. The settings are
                # transaction-local and computed by the subquery, whose row
                # the outer SELECT needs before it can call the fence: the
                # lock timeout is in force when the fence waits for its lock.
                # The marker's commit must reach the WAL on disk now, and with
                # it every write before it: a logical walsender only sends
                # flushed WAL, and under synchronous_commit=off the WAL writer
                # flushes every wal_writer_delay -- measured as 0.4 s of final
                # catch-up spent with the tenant fenced. 'local': no wait for standbys.
                src.execute(
                    "SELECT tenantctl.fence_tenant(%s, %s) FROM (SELECT set_config('lock_timeout', %s, true), "
                    "set_config('synchronous_commit', 'local', true) OFFSET 0) AS settings",
                    (plan.tenant_id, plan.move_id, f"{int(drain_timeout * 1000)}ms"),
                )
            return
        except psycopg.errors.LockNotAvailable:
            with connect(plan.source.admin(), autocommit=True) as admin:
                killed = admin.execute(
                    "SELECT pg_terminate_backend(h) FROM tenantctl.tenant_lock_holders(%s) AS h", (plan.tenant_id,)
                ).fetchall()
            log.warning(
                "fence_terminated_stragglers", tenant_id=str(plan.tenant_id), count=len(killed), attempt=attempt
            )
    raise MoveNotReadyError("could not drain the tenant's in-flight transactions")


def unfence_source(plan: MovePlan) -> None:
    """Give the tenant back to the source (abort before the flip)."""
    with connect(plan.source.owner()) as src:
        owned = _ownership(src, plan.tenant_id)
        if owned is not None and owned[0] == "fenced":
            src.execute("SELECT tenantctl.claim_tenant(%s, %s)", (plan.tenant_id, plan.epoch))


def final_catch_up(
    plan: MovePlan,
    *,
    timeout: float = 30.0,
    marker: uuid.UUID | None = None,
    conn: psycopg.Connection[Any] | None = None,
    source: psycopg.Connection[Any] | None = None,
) -> float:
    """Wait for the fence's marker on the target; return the seconds waited.

    Online, a subscription whose apply worker fails while this waits ends the
    wait (MoveError; the caller's compensation unfences the source, which
    stays authoritative): the worker retries from the same transaction every
    ``wal_retrieve_retry_interval`` (5 s by default), so a failure that has
    happened once is seen within about that, not after ``timeout``.
    The same watch reads the move's slot on the source: a slot the source
    invalidated (``max_slot_wal_keep_size``) after the catch-up gate can never
    deliver the marker, and its apply worker fails before it applies anything,
    so no apply error is counted. ``conn``: an autocommit connection to the
    target as its owner, and ``source`` one to the source, opened before the
    pause (else they are opened here, the source's at the first watch).
    """
    start = time.monotonic()
    watch_at, errors_before = start + APPLY_ERROR_WATCH_SECONDS, None
    with _reuse(conn, plan.target.owner()) as dst, contextlib.ExitStack() as opened:
        src = source
        while True:
            if dst.execute(f"SELECT 1 FROM {MARKERS} WHERE marker = %s", (marker or plan.move_id,)).fetchone():
                return time.monotonic() - start
            now = time.monotonic()
            if now - start > timeout:
                errors = _subscription_errors(dst, plan.name) if plan.mode == "online" else ""
                raise MoveNotReadyError(f"final catch-up did not arrive within {timeout:.0f}s{errors}")
            if plan.mode == "online" and now >= watch_at:
                watch_at = now + APPLY_ERROR_WATCH_SECONDS
                if src is None:
                    src = opened.enter_context(connect(plan.source.owner(), autocommit=True))
                _slot_lag(src, plan)  # MoveError when the slot is lost
                errors_now, _ = _error_counts(dst, plan.name)
                if errors_before is None:
                    errors_before = errors_now
                elif errors_now > errors_before:
                    raise MoveError(
                        f"replication to the target failed during the final catch-up ({errors_now - errors_before} "
                        f"apply errors of subscription {plan.name}; see the target server's log): the source "
                        "stays authoritative"
                    )
            time.sleep(POLL_SECONDS)


# hash_record_extended hashes each column with its type's own hash function
# (no text rendering: ~4x faster than hashing t::text); XOR makes the
# aggregate independent of row order. With the count, a difference goes
# unnoticed only on a 64-bit hash collision.
# (tables.row_digest: a table with a column of a user-defined type hashes its rows' text instead.)
CHECKSUM = "SELECT count(*), coalesce(bit_xor({digest}), 0)::text FROM {table} AS t WHERE tenant_id = %s"


def table_checksums(dsn: str, tenant_id: uuid.UUID) -> dict[str, tuple[int, str]]:
    """Per table: row count and an order-independent checksum of the tenant's rows."""
    result: dict[str, tuple[int, str]] = {}
    with connect(dsn) as conn:
        tables = tenant_tables(conn)
        conn.rollback()
        # One snapshot for all tables: the comparison is of one consistent state.
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        _privileged(conn)
        for table in tables:
            statement = sql.SQL(CHECKSUM).format(table=sql.SQL(table), digest=row_digest(conn, table))
            row = conn.execute(statement, (tenant_id,)).fetchone()
            assert row is not None
            result[table] = (int(row[0]), str(row[1]))
        conn.rollback()
    return result


def verify(plan: MovePlan) -> dict[str, Any]:
    """Compare both sides from independent privileged connections; raise on any difference."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        source_future = pool.submit(table_checksums, plan.source.owner(), plan.tenant_id)
        target_future = pool.submit(table_checksums, plan.target.owner(), plan.tenant_id)
        source, target = source_future.result(), target_future.result()
    mismatches = {
        table: {"source": source.get(table), "target": target.get(table)}
        for table in sorted(set(source) | set(target))
        if source.get(table) != target.get(table)
    }
    if mismatches:
        raise VerificationError(f"verification failed: {mismatches}")
    return {table: {"rows": rows, "checksum": digest} for table, (rows, digest) in source.items()}


# -- offline copy ---------------------------------------------------------------------------


def _columns(conn: psycopg.Connection[Any], table: str) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c) for c in stored_columns(conn, table))


def copy_offline(plan: MovePlan) -> dict[str, int]:
    """Stream binary COPY per table, parents first (source fenced), replacing any earlier copy on the target.

    Idempotent: the cutover that runs it is replayed after a crash, and the
    target then holds the copy an earlier attempt committed (duplicate keys
    used to fail the replay, and the move was rolled back instead of resumed).
    That copy is deleted in the same transaction as the new one is written,
    and only from a target that does not serve the tenant.
    """
    copied: dict[str, int] = {}
    with connect(plan.source.owner()) as src, connect(plan.target.owner()) as dst:
        tables = tenant_tables(src)
        owned = _ownership(dst, plan.tenant_id)
        if owned is not None and owned[0] in ("active", "fenced"):
            raise MoveError(f"the target already serves tenant {plan.tenant_id} ({owned[0]}); refusing to copy over it")
        _privileged(src)
        _privileged(dst)
        for table in reversed(tables):  # children first
            dst.execute(sql.SQL("DELETE FROM {t} WHERE tenant_id = %s").format(t=sql.SQL(table)), (plan.tenant_id,))
        for table in tables:
            columns = _columns(src, table)
            out = sql.SQL("COPY (SELECT {c} FROM {t} WHERE tenant_id = {id}::uuid) TO STDOUT (FORMAT binary)").format(
                c=columns, t=sql.SQL(table), id=sql.Literal(str(plan.tenant_id))
            )
            into = sql.SQL("COPY {t} ({c}) FROM STDIN (FORMAT binary)").format(t=sql.SQL(table), c=columns)
            with src.cursor().copy(out) as reader, dst.cursor() as cur, cur.copy(into) as writer:
                for chunk in reader:
                    writer.write(chunk)
            copied[table] = cur.rowcount
        dst.commit()
        src.rollback()
    return copied


# -- cutover ---------------------------------------------------------------------------------


# The target's sequence becomes the source's position unless it is already
# past it (a sequence of the pool, shared with other tenants, on a demotion).
# CASE: setval runs only for the rows that need it.
ADVANCE_SEQUENCES = """
SELECT x.nsp || '.' || x.name, ps.sequencename IS NOT NULL,
       CASE WHEN ps.sequencename IS NOT NULL AND (ps.last_value IS NULL
                 OR (ps.increment_by > 0 AND ps.last_value < x.v) OR (ps.increment_by < 0 AND ps.last_value > x.v))
            THEN pg_catalog.setval(format('%%I.%%I', x.nsp, x.name)::regclass, x.v, true) END
  FROM unnest(%s::text[], %s::text[], %s::bigint[]) AS x(nsp, name, v)
  LEFT JOIN pg_catalog.pg_sequences ps ON ps.schemaname = x.nsp AND ps.sequencename = x.name
"""


def carry_sequences(
    src: psycopg.Connection[Any], dst: psycopg.Connection[Any], names: Sequence[TenantSequence]
) -> dict[str, int]:
    """Advance the target's sequences ``names`` to the source's positions; return those advanced.

    Logical replication and COPY carry rows, not sequence positions: without
    this, a serial or identity column started again from 1 on the target, and
    the tenant's first insert after the move collided with its own copied rows.
    Called inside the fence, after the drain, so every value the tenant's rows
    hold was drawn from the source's sequence before its position is read
    (``last_value`` is past any value a backend's cache handed out). Never
    moves a sequence back: idempotent on a replayed cutover, and a demotion
    leaves the pool's shared sequences ahead of every tenant's rows.
    """
    if not names:
        return {}
    positions = src.execute(
        "SELECT schemaname, sequencename, last_value FROM pg_catalog.pg_sequences "
        "WHERE (schemaname, sequencename) IN (SELECT * FROM unnest(%s::text[], %s::text[])) AND last_value IS NOT NULL",
        ([n.schema for n in names], [n.name for n in names]),
    ).fetchall()
    if not positions:
        return {}  # none drawn from yet: the target's start is right
    rows = dst.execute(
        ADVANCE_SEQUENCES, ([p[0] for p in positions], [p[1] for p in positions], [p[2] for p in positions])
    ).fetchall()
    missing = [name for name, present, _ in rows if not present]
    if missing:
        raise MoveError(f"the target lacks sequences of tenant tables: {', '.join(missing)}")
    return {name: int(value) for name, _, value in rows if value is not None}


def activate_target(
    plan: MovePlan,
    *,
    conn: psycopg.Connection[Any] | None = None,
    source: psycopg.Connection[Any] | None = None,
    sequence_names: Sequence[TenantSequence] | None = None,
) -> None:
    """The target starts serving the tenant at the new epoch (before the route flips), its sequences carried.

    Safe while the source is fenced and the catalog still routes to it: no
    router holds the new epoch before the flip commits, so the target refuses
    every request until then (stale epoch), and :func:`abort` can still take
    it back. ``conn``: an autocommit connection to the target as its owner,
    ``source`` one to the source; ``sequence_names``: the tenant tables'
    sequences (``tables.sequences``), found before the pause (else here).
    """
    with _reuse(source, plan.source.owner()) as src, _reuse(conn, plan.target.owner()) as dst:
        names = sequences(src) if sequence_names is None else sequence_names
        carry_sequences(src, dst, names)
        # One statement, one transaction (autocommit): one round trip in the pause.
        dst.execute(
            f"WITH markers AS (DELETE FROM {MARKERS} WHERE tenant_id = %s) SELECT tenantctl.claim_tenant(%s, %s)",
            (plan.tenant_id, plan.tenant_id, plan.new_epoch),
        )


def retire_source(plan: MovePlan) -> None:
    """The source answers "moved" from now on, so a stale router follows the new route."""
    with connect(plan.source.owner()) as src:
        src.execute(
            "SELECT tenantctl.claim_tenant(%s, %s, 'moved')",
            (plan.tenant_id, plan.epoch),
        )
        src.execute(f"DELETE FROM {MARKERS} WHERE tenant_id = %s", (plan.tenant_id,))


# -- teardown --------------------------------------------------------------------------------


def _drop_slot(admin_dsn: str, slot: str, *, like: bool = False) -> int:
    operator = "LIKE" if like else "="
    with connect(admin_dsn, autocommit=True) as conn:
        rows = conn.execute(
            f"SELECT slot_name, active_pid FROM pg_replication_slots WHERE slot_name {operator} %s", (slot,)
        ).fetchall()
        for name, pid in rows:
            if pid is not None:
                conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
                time.sleep(0.1)
            with contextlib.suppress(psycopg.errors.UndefinedObject):
                conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))
    return len(rows)


def table_sync_slots(subid: int, subscriber: int) -> str:
    """The LIKE pattern of the table-sync slots of subscription ``subid`` on the cluster ``subscriber``.

    PostgreSQL names them ``pg_<subscription oid>_sync_<table oid>_<system identifier>``.
    """
    return f"pg\\_{subid}\\_sync\\_%\\_{subscriber}"


def stop_replication(plan: MovePlan) -> None:
    """Drop subscription, publication and every slot of this move (no orphan slot fills a disk), then its triggers.

    The slots first: dropping the change triggers waits for each table's lock
    (bounded retries, tens of seconds on a busy pool) and may give up, and a
    step that failed there used to leave the slot holding the source's WAL
    until the retry. Leftover triggers only record the tenant's changes; the
    retry drops them.
    """
    from control_plane.moves.verify import drop_tracking  # verify builds on this module

    with connect(plan.target.admin(), autocommit=True) as dst:
        row = dst.execute(
            "SELECT s.oid, c.system_identifier FROM pg_subscription s, pg_control_system() c WHERE s.subname = %s",
            (plan.name,),
        ).fetchone()
        if row is not None:
            subid, subscriber = int(row[0]), int(row[1])
            dst.execute(sql.SQL("ALTER SUBSCRIPTION {} DISABLE").format(sql.Identifier(plan.name)))
            # Detach the slot and drop it ourselves: DROP SUBSCRIPTION would
            # otherwise fail outright when the source is unreachable.
            dst.execute(sql.SQL("ALTER SUBSCRIPTION {} SET (slot_name = NONE)").format(sql.Identifier(plan.name)))
            dst.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(plan.name)))
            # Its table syncs' slots, named pg_<subscription oid>_sync_<table oid>_<subscriber's
            # system identifier>: the identifier too, since another cluster's subscription
            # (a concurrent move to another silo server) can have the same oid.
            _drop_slot(plan.source.admin(), table_sync_slots(subid, subscriber), like=True)
    _drop_slot(plan.source.admin(), plan.name)
    with connect(plan.source.owner(), autocommit=True) as src:
        src.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(plan.name)))
    drop_tracking(plan)


def replication_objects(plan: MovePlan) -> dict[str, int]:
    """How many publications, subscriptions and slots of this move exist (tests, doctor)."""
    with connect(plan.source.admin(), autocommit=True) as src:
        publications = src.execute("SELECT count(*) FROM pg_publication WHERE pubname = %s", (plan.name,)).fetchone()
        slots = src.execute(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s OR slot_name LIKE 'pg\\_%%\\_sync\\_%%'",
            (plan.name,),
        ).fetchone()
    with connect(plan.target.admin(), autocommit=True) as dst:
        subscriptions = dst.execute("SELECT count(*) FROM pg_subscription WHERE subname = %s", (plan.name,)).fetchone()
    assert publications and slots and subscriptions
    return {"publications": publications[0], "subscriptions": subscriptions[0], "slots": slots[0]}


def require_retired(side: Side, tenant_id: uuid.UUID) -> None:
    """Raise unless ``side`` has been retired for the tenant (answers "moved").

    The guard of both destructive steps -- deleting the pool's rows after a
    promotion, deprovisioning the silo after a demotion: a database that still
    serves (or is fenced for) the tenant may be authoritative.
    """
    with connect(side.owner()) as conn:
        owned = _ownership(conn, tenant_id)
    if owned is None or owned[0] != "moved":
        state = "no ownership record" if owned is None else owned[0]
        raise MoveError(f"refusing to clean up a source that has not been retired ({state}; it may be authoritative)")


def cleanup_source(plan: MovePlan, *, batch: int = 5000) -> int:
    """Delete the tenant's rows from the retired source: the only destructive step."""
    require_retired(plan.source, plan.tenant_id)
    return _delete_tenant_rows(plan.source.owner(), plan.tenant_id, batch=batch)


def take_back_target(plan: MovePlan, *, route_epoch: int | None) -> bool:
    """Retire a target activated by this move whose route never reached it; True if it was.

    ``route_epoch`` is the tenant's route epoch in the catalog, read by the
    caller. An active target is taken back only when that proves the route
    never named it (``route_epoch == plan.epoch``); otherwise it is treated as
    authoritative and this raises :class:`MoveError`. The source's fence
    marker goes too: the activation deleted the target's copy, and a fence
    that starts again (a replayed cutover) must write one that reaches the
    target, or its final catch-up would wait for a marker that never comes.
    """
    with connect(plan.target.owner()) as dst:
        owned = _ownership(dst, plan.tenant_id)
        if owned is None or owned[0] != "active":
            return False
        if owned[1] != plan.new_epoch or route_epoch != plan.epoch:
            raise MoveError("the target already serves the tenant; the move is past its flip and cannot be aborted")
        dst.execute("SELECT tenantctl.claim_tenant(%s, %s, 'moved')", (plan.tenant_id, plan.epoch))
    with connect(plan.source.owner()) as src:
        src.execute(f"DELETE FROM {MARKERS} WHERE tenant_id = %s", (plan.tenant_id,))
    return True


def abort(plan: MovePlan, *, route_epoch: int | None = None) -> None:
    """Undo a move before its flip: source authoritative and untouched, target emptied.

    ``route_epoch`` is the tenant's route epoch in the catalog, read by the
    caller. The cutover activates the target (at the move's new epoch) while
    the source is still fenced, so an active target alone does not mean the
    move is past its flip: it is taken back -- retired first, so that at no
    instant two databases accept the tenant (I4) -- only when the catalog
    proves that the route never reached it (``route_epoch == plan.epoch``).
    Without that proof an active target is treated as authoritative and the
    abort is refused.
    """
    take_back_target(plan, route_epoch=route_epoch)
    # The tenant's writes resume first: the teardown below can wait for table
    # locks for a long while, and the source is authoritative again now.
    unfence_source(plan)
    if plan.mode == "online":
        stop_replication(plan)  # also drops the change-tracking triggers
    with connect(plan.source.owner()) as src:
        # The fence's marker (one move per tenant at a time; markers of older code's baseline fences too).
        src.execute(f"DELETE FROM {MARKERS} WHERE tenant_id = %s", (plan.tenant_id,))
    _delete_tenant_rows(plan.target.owner(), plan.tenant_id, batch=5000)
    with connect(plan.target.owner()) as dst:
        dst.execute(f"DELETE FROM {MARKERS} WHERE tenant_id = %s", (plan.tenant_id,))


def run_steps(plan: MovePlan, *, flip: Any, cleanup: bool = True) -> dict[str, float]:
    """The whole move in one process, without durability; returns step timings.

    The durable version is the DBOS workflow in ``control_plane.workflows.moves``
    (same steps, each checkpointed); this one serves benchmarks and tests of
    the steps themselves. ``flip`` updates the catalog route (epoch + 1).

    Durations are in seconds; ``fenced_at`` is the ``time.monotonic()`` instant
    the fence started (online: inside incremental verification), so a caller
    can measure the write pause from the fence itself.
    """
    timings: dict[str, float] = {}

    def timed(name: str, fn: Any, *args: Any) -> Any:
        start = time.monotonic()
        result = fn(*args)
        timings[name] = time.monotonic() - start
        return result

    timed("prepare_target", prepare_target, plan)
    try:
        if plan.mode == "online":
            timed("start_replication", start_replication, plan)
            timed("wait_initial_sync", wait_initial_sync, plan)
            timed("wait_caught_up", catch_up_gate, plan)
        if plan.mode == "online":
            from control_plane.moves.verify import verify_incremental

            # Verified and activated inside the fence (as the workflow's cutover step).
            details = timed("verify_incremental", lambda p: verify_incremental(p, activate=True), plan)
            fenced_at = details["fenced_at"]
            timings.update({k: v for k, v in details.items() if k.endswith("_seconds")})
        else:
            fenced_at = time.monotonic()
            timed("fence_source", fence_source, plan)
            timed("copy_offline", copy_offline, plan)
            timed("verify", verify, plan)
            timed("activate_target", activate_target, plan)
    except Exception:
        abort(plan, route_epoch=plan.epoch)  # the route flips only below: it still names the source
        raise
    timed("flip", flip, plan)
    timings["fenced_seconds"] = time.monotonic() - fenced_at
    timings["fenced_at"] = fenced_at
    timed("retire_source", retire_source, plan)
    if plan.mode == "online":
        timed("stop_replication", stop_replication, plan)
    if cleanup:
        timed("cleanup_source", cleanup_source, plan)
    return timings


def replication_conninfo(dsn: str, role: str) -> str:
    """``dsn`` as the replication role, for the other server's CREATE SUBSCRIPTION."""
    from data_plane.dsn import with_user

    return with_user(dsn, role)
