"""Incremental verification: the bulk before the fence, only the changes inside it.

A full checksum of a large tenant does not fit in a write pause of
milliseconds, and verification is never weakened to make it fit. Instead:

1. Per-move row triggers on both sides record the primary key of every row of
   the tenant that changes (``tenantctl.move_changes``; ``ENABLE ALWAYS`` on
   the target, so replication apply fires them, and there only while the
   target does not serve the tenant: until its activation, which follows the
   verification).
2. Once the triggers exist on both sides, a REPEATABLE READ snapshot S is
   pinned on the source and T on the target, with no fence: the tenant keeps
   writing. Full per-table counts and XOR checksums of S and T are computed
   while it does.
3. The real fence and the final catch-up follow. With D = every key recorded
   on either side, rows outside D are unchanged on both sides since S and T,
   so the move is correct iff (a) checksum(S) ^ checksum(S ∩ D) equals
   checksum(T) ^ checksum(T ∩ D) -- the untouched rows agree -- and (b) the
   rows of D agree in the final state. Both are computed from index lookups of
   D; the counts are checked the same way, and (b) row by row. Early passes
   just before the fence read, for every key recorded so far, its snapshot
   side and its current row, each pass the keys changed during the one
   before; inside the fence only the keys with a change recorded since are
   read again -- a key with none has not changed since on either side, so
   its early read is final.
   Which changes are new is told per side by the transaction that recorded
   them, against a snapshot taken just before the early pass read the
   changes (migration ``tenant_0005``): the fence reads only those rows, not
   every change of the move.

Why S and T need no fence and no common replication position: a key outside
D has not changed on a side since that side's triggers were created, so S
shows its final source row and T its final target row. ``CREATE TRIGGER``
waits for every transaction that has written the table (its lock conflicts
with theirs), and every later change fires the trigger in its own
transaction. A change S shows and T does not yet (the target lags) is
applied after T -- with the target's trigger in place, which records its key.

XOR is its own inverse, which is what makes removing D from the bulk
checksums exact. A difference survives only a 64-bit hash collision.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from control_plane.exceptions import VerificationError
from control_plane.moves import engine
from control_plane.moves.engine import MovePlan
from control_plane.moves.tables import row_digest, sequences, tenant_tables

CHANGES = '"tenantctl"."move_changes"'
Checksum = tuple[int, int]  # (rows, xor of row hashes)
Changes = dict[int, tuple[str, str]]  # a side's recorded changes: row id -> (table, primary key as jsonb text)
Digests = dict[str, sql.Composable]  # per table, how its rows are hashed (tables.row_digest)
# A side's pass over some keys: their snapshot checksum per table, their current row hashes per table.
SidePass = tuple[dict[str, Checksum], dict[str, dict[str, int]]]


def _trigger(plan: MovePlan, op: str) -> str:
    return f"tc_track_{plan.move_id.hex[:16]}_{op}"


def _pk(conn: psycopg.Connection[Any], table: str) -> list[tuple[str, str]]:
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY array_position(i.indkey::int2[], a.attnum)",
        (table,),
    ).fetchall()
    if not rows:
        raise VerificationError(f"{table} has no primary key; a move needs one on every tenant table")
    return [(str(r[0]), str(r[1])) for r in rows]


# DDL on a pool table queues every tenant's statements behind it while it waits
# for its lock: wait at most this long per attempt, then step aside and retry.
TRIGGER_LOCK_TIMEOUT = 0.1
TRIGGER_LOCK_ATTEMPTS = 30


def install_tracking(
    plan: MovePlan, *, lock_timeout: float = TRIGGER_LOCK_TIMEOUT, attempts: int = TRIGGER_LOCK_ATTEMPTS
) -> None:
    """Create the change-recording triggers on both sides (idempotent)."""
    for side, always in ((plan.source, False), (plan.target, True)):
        with engine.connect(side.owner(), autocommit=True) as conn:
            for table in tenant_tables(conn):
                columns = [c for c, _ in _pk(conn, table)]
                args = sql.SQL(", ").join(sql.Literal(a) for a in [str(plan.move_id), *columns])
                tenant = sql.Literal(str(plan.tenant_id))
                # The target records only until it serves the tenant (migration
                # tenant_0006): verification is over by then, and the tenant's
                # own writes after the flip would otherwise fire the triggers.
                until = sql.SQL(" AND NOT tenantctl.serves_tenant({}::uuid)").format(tenant) if always else sql.SQL("")
                for op, event, rows in (
                    ("i", "INSERT", "NEW.tenant_id = {t}::uuid"),
                    ("u", "UPDATE", "(NEW.tenant_id = {t}::uuid OR OLD.tenant_id = {t}::uuid)"),
                    ("d", "DELETE", "OLD.tenant_id = {t}::uuid"),
                ):
                    when = sql.SQL(rows + "{u}").format(t=tenant, u=until)
                    name = _trigger(plan, op)
                    exists = conn.execute(
                        "SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s", (table, name)
                    ).fetchone()
                    if exists:
                        continue
                    statement = sql.SQL(
                        "CREATE TRIGGER {n} AFTER {e} ON {t} FOR EACH ROW WHEN ({w}) "
                        "EXECUTE FUNCTION tenantctl.track_move_change({a})"
                    ).format(n=sql.Identifier(name), e=sql.SQL(event), t=sql.SQL(table), w=when, a=args)
                    _with_lock_retries(conn, statement, lock_timeout=lock_timeout, attempts=attempts)
                    if always:
                        conn.execute(
                            sql.SQL("ALTER TABLE {t} ENABLE ALWAYS TRIGGER {n}").format(
                                t=sql.SQL(table), n=sql.Identifier(name)
                            )
                        )


def _with_lock_retries(
    conn: psycopg.Connection[Any], statement: sql.Composed, *, lock_timeout: float, attempts: int
) -> None:
    # CREATE TRIGGER briefly locks out writers of the whole table; never queue
    # behind a long transaction (and block every tenant behind us): give up fast
    # and retry.
    for attempt in range(attempts):
        try:
            with conn.transaction():
                conn.execute("SELECT set_config('lock_timeout', %s, true)", (f"{int(lock_timeout * 1000)}ms",))
                conn.execute(statement)
            return
        except psycopg.errors.LockNotAvailable:
            if attempt == attempts - 1:
                raise
            time.sleep(min(0.2 * (attempt + 1), 2.0))


def drop_tracking(plan: MovePlan) -> None:
    for side in (plan.source, plan.target):
        with engine.connect(side.owner(), autocommit=True) as conn:
            for table in tenant_tables(conn):
                for op in ("i", "u", "d"):
                    statement = sql.SQL("DROP TRIGGER IF EXISTS {n} ON {t}").format(
                        n=sql.Identifier(_trigger(plan, op)), t=sql.SQL(table)
                    )
                    _with_lock_retries(
                        conn, statement, lock_timeout=TRIGGER_LOCK_TIMEOUT, attempts=TRIGGER_LOCK_ATTEMPTS
                    )
            conn.execute(f"DELETE FROM {CHANGES} WHERE move_id = %s", (plan.move_id,))


@contextlib.contextmanager
def pinned_snapshot(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A read-only REPEATABLE READ transaction whose snapshot is taken on entry.

    Its bulk checksums run without parallel workers: they are background work
    on a shared database, and with workers each side's scan took every core
    of the benchmark's two-core host for a second or two, starving the tenant
    API until it fell seconds behind -- a backlog the write pause then
    started with.
    """
    with engine.connect(dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        engine._privileged(conn)
        conn.execute("SELECT set_config('max_parallel_workers_per_gather', '0', true)")
        conn.execute("SELECT 1 FROM tenantctl.tenant_ownership LIMIT 1")  # takes the snapshot now
        try:
            yield conn
        finally:
            conn.rollback()


def _checksums(
    conn: psycopg.Connection[Any], tables: list[str], digests: Digests, tenant_id: uuid.UUID
) -> dict[str, Checksum]:
    result: dict[str, Checksum] = {}
    for table in tables:
        row = conn.execute(
            sql.SQL("SELECT count(*), coalesce(bit_xor({}), 0) FROM {} AS t WHERE tenant_id = %s").format(
                digests[table], sql.SQL(table)
            ),
            (tenant_id,),
        ).fetchone()
        assert row is not None
        result[table] = (int(row[0]), int(row[1]))
    return result


def _snapshot(conn: psycopg.Connection[Any]) -> str:
    """The snapshot of a statement run now (READ COMMITTED: every statement takes a new one)."""
    row = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
    assert row is not None
    return str(row[0])


# The table a change belongs to: the trigger records the relation it fired on,
# which for a row of a partitioned table is the partition (the trigger is
# cloned onto each); the move knows the partitioned table. Named as
# tables.tenant_tables names it. (pg_partition_root is NULL for a plain table.)
_RECORDED_TABLE = """coalesce((
    SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname)
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = pg_partition_root(to_regclass(tbl))), tbl)"""


def _changes(conn: psycopg.Connection[Any], move_id: uuid.UUID, *, unseen_by: str | None = None) -> Changes:
    """The move's recorded changes on ``conn``'s side; with ``unseen_by``, only those it does not show.

    ``unseen_by`` is a snapshot taken just before an earlier read of the
    changes. A change that read did not return had not committed when it
    ran, so this earlier snapshot does not show it either: the rows returned
    include every change the read missed, and some it returned (which the
    caller drops by id). The index on ``(move_id, xid)`` (migration
    ``tenant_0005``) limits the scan to transactions from the snapshot's xmin on.
    """
    query = f"SELECT id, {_RECORDED_TABLE}, pk::text FROM {CHANGES} WHERE move_id = %s"
    params: tuple[Any, ...] = (move_id,)
    if unseen_by is not None:
        query += " AND xid >= pg_snapshot_xmin(%s::pg_snapshot) AND NOT pg_visible_in_snapshot(xid, %s::pg_snapshot)"
        params = (move_id, unseen_by, unseen_by)
    rows = conn.execute(query, params).fetchall()
    return {int(change_id): (str(table), str(pk)) for change_id, table, pk in rows}


def _keys(changes: Iterable[tuple[str, str]], tables: list[str]) -> dict[str, set[str]]:
    keys: dict[str, set[str]] = {table: set() for table in tables}
    for table, pk in changes:
        if table not in keys:
            # Never skip a change: a table the comparison does not know is a failure.
            raise VerificationError(f"a change was recorded for {table}, which is not a tenant table of this move")
        keys[table].add(pk)
    return keys


def _key_columns(columns: list[tuple[str, str]], source: sql.Composable) -> tuple[sql.Composable, sql.Composable]:
    """The key columns read out of the jsonb ``source``, and the join of ``t`` to them (``d``)."""
    pick = sql.SQL(", ").join(
        sql.SQL("({src} ->> {name})::{type} AS {alias}").format(
            src=source, name=sql.Literal(name), type=sql.SQL(kind), alias=sql.Identifier(f"k{i}")
        )
        for i, (name, kind) in enumerate(columns)
    )
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{c} = d.{a}").format(c=sql.Identifier(name), a=sql.Identifier(f"k{i}"))
        for i, (name, _) in enumerate(columns)
    )
    return pick, match


def _checksum_of_keys(
    conn: psycopg.Connection[Any], table: str, columns: list[tuple[str, str]], digest: sql.Composable, keys: set[str]
) -> Checksum:
    pick, match = _key_columns(columns, sql.SQL("k"))
    statement = sql.SQL(
        "SELECT count(*), coalesce(bit_xor({digest}), 0) FROM {table} AS t "
        "JOIN (SELECT DISTINCT {pick} FROM jsonb_array_elements(%s::jsonb) AS k) AS d ON {match}"
    ).format(digest=digest, table=sql.SQL(table), pick=pick, match=match)
    row = conn.execute(statement, (json.dumps([json.loads(k) for k in keys]),)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _row_hashes(
    conn: psycopg.Connection[Any], table: str, columns: list[tuple[str, str]], digest: sql.Composable, keys: set[str]
) -> dict[str, int]:
    """Per key (its recorded jsonb text): the hash of the key's row as ``conn`` sees it; no row, no entry."""
    pick, match = _key_columns(columns, sql.SQL("u.txt::jsonb"))
    statement = sql.SQL(
        "SELECT d.txt, {digest} FROM {table} AS t "
        "JOIN (SELECT u.txt, {pick} FROM unnest(%s::text[]) AS u(txt)) AS d ON {match}"
    ).format(digest=digest, table=sql.SQL(table), pick=pick, match=match)
    return {str(txt): int(digest) for txt, digest in conn.execute(statement, (sorted(keys),))}


def _snapshot_part(
    snapshot: psycopg.Connection[Any],
    pks: dict[str, list[tuple[str, str]]],
    digests: Digests,
    keys: dict[str, set[str]],
) -> dict[str, Checksum]:
    """Per table: checksum of the keys' rows in the pinned snapshot."""
    return {table: _checksum_of_keys(snapshot, table, pks[table], digests[table], k) for table, k in keys.items() if k}


def _current_rows(
    now: psycopg.Connection[Any], pks: dict[str, list[tuple[str, str]]], digests: Digests, keys: dict[str, set[str]]
) -> dict[str, dict[str, int]]:
    """Per table: the row hash of each key as committed now (READ COMMITTED)."""
    return {table: _row_hashes(now, table, pks[table], digests[table], k) for table, k in keys.items() if k}


def _passes(
    pool: ThreadPoolExecutor,
    sides: dict[str, tuple[psycopg.Connection[Any], psycopg.Connection[Any]]],
    pks: dict[str, list[tuple[str, str]]],
    digests: Digests,
    snapshot_keys: dict[str, set[str]],
    current_keys: dict[str, set[str]],
) -> dict[str, SidePass]:
    """Per side (its snapshot and its current connection): the snapshot checksum of
    ``snapshot_keys`` and the current rows of ``current_keys``.

    All four at once, each on its own connection: inside the fence every
    round trip in sequence lengthens the write pause.
    """
    futures = {
        side: (
            pool.submit(_snapshot_part, snapshot, pks, digests, snapshot_keys),
            pool.submit(_current_rows, now, pks, digests, current_keys),
        )
        for side, (snapshot, now) in sides.items()
    }
    return {side: (checksums.result(), rows.result()) for side, (checksums, rows) in futures.items()}


def _summary(rows: dict[str, int]) -> Checksum:
    digest = 0
    for value in rows.values():
        digest ^= value
    return len(rows), digest


def _remove(total: Checksum, part: Checksum) -> Checksum:
    return total[0] - part[0], total[1] ^ part[1]


def _new_changes(changes: Changes, seen: Changes) -> list[tuple[str, str]]:
    return [change for change_id, change in changes.items() if change_id not in seen]


# Each pass reads the keys that changed during the one before it, so under a
# steady write rate the sets shrink (pre-copy, as in live VM migration): the
# fence is left with the changes of the last, shortest pass. Measured under
# 200 writes/s: one pass left 34-95 keys to the fence, its check 16-66 ms.
MAX_EARLY_PASSES = 3


@dataclass
class _EarlyPasses:
    """Unfenced passes over the recorded changes, each over the keys changed since the one before.

    Holds every key read, the passes' combined result per side (snapshot
    checksums of disjoint key sets XOR-composed; each key's latest current
    row), the changes seen and the snapshot each side took just before its
    last read of them, and the number of keys each pass read.

    Each side's snapshot first, then its changes: every change the read
    misses is one this snapshot does not show either, so the next read
    (``unseen_by`` it) returns it (a superset of the unseen ones).
    """

    move_id: uuid.UUID
    sides: dict[str, tuple[psycopg.Connection[Any], psycopg.Connection[Any]]]
    pks: dict[str, list[tuple[str, str]]]
    digests: Digests
    tables: list[str]
    keys: dict[str, set[str]] = field(init=False)
    combined: dict[str, SidePass] = field(init=False)
    seen: dict[str, Changes] = field(init=False)
    marks: dict[str, str] = field(default_factory=dict, init=False)
    counts: list[int] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self.keys = {table: set() for table in self.tables}
        self.combined = {side: ({}, {}) for side in self.sides}
        self.seen = {side: {} for side in self.sides}

    def run(self, pool: ThreadPoolExecutor, *, passes: int) -> None:
        """Up to ``passes`` passes; stops early when a read finds no new change."""
        for _ in range(passes):
            new: list[tuple[str, str]] = []
            for side, (_, now) in self.sides.items():
                mark = _snapshot(now)
                changes = _changes(now, self.move_id, unseen_by=self.marks.get(side))
                new += _new_changes(changes, self.seen[side])
                self.seen[side].update(changes)
                self.marks[side] = mark
            delta = _keys(new, self.tables)
            if not any(delta.values()):
                return
            self.read(pool, delta)
            self.counts.append(sum(len(k) for k in delta.values()))

    def read(self, pool: ThreadPoolExecutor, delta: dict[str, set[str]]) -> None:
        """Read ``delta``'s keys: the snapshot side of those not read before, the current row of all."""
        snapshot_keys = {table: delta[table] - self.keys[table] for table in self.tables}
        for side, (checksums, rows) in _passes(pool, self.sides, self.pks, self.digests, snapshot_keys, delta).items():
            _merge(self.combined[side], checksums, rows, delta)
        for table in self.tables:
            self.keys[table] |= delta[table]


def _merge(
    into: SidePass, checksums: dict[str, Checksum], rows: dict[str, dict[str, int]], read: dict[str, set[str]]
) -> None:
    """Add a pass's snapshot checksums (of keys not read before) and replace the current rows it read again."""
    for table, checksum in checksums.items():
        before = into[0].get(table, (0, 0))
        into[0][table] = before[0] + checksum[0], before[1] ^ checksum[1]
    for table, k in read.items():
        current = into[1].setdefault(table, {})
        for key in k:
            current.pop(key, None)  # a row deleted since its last read has no entry now
        current.update(rows.get(table, {}))


def verify_incremental(
    plan: MovePlan,
    *,
    activate: bool = False,
    drain_timeout: float = 2.0,
    max_lag_bytes: int = engine.DEFAULT_MAX_LAG_BYTES,
    catch_up_timeout: float = 30.0,
    backoff: Sequence[float] = engine.CATCH_UP_BACKOFF_SECONDS,
    before_fence: Callable[[], None] | None = None,
    on_activated: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Bulk checksums of two unfenced snapshots, fence, final catch-up, delta check; returns timings.

    Leaves the source *fenced* on success -- with ``activate``, the target
    activated at the new epoch too, on the connection the fence already had
    open (the caller flips the route); on any failure the caller aborts the
    move. The catch-up gate before the real fence backs off and tries again
    while the target lags (:func:`engine.catch_up_gate`): a target that fell
    behind during the bulk checksums delays the fence, it does not abort the
    move. ``fenced_at`` in the result is the ``time.monotonic()`` instant the
    real fence started. ``before_fence`` is called (in this thread) just
    before it, once everything the fence needs is open and the early pass done;
    ``on_activated`` once the target is activated, before the read transactions
    end and the connections close (the caller's flip need not wait for those).
    """
    install_tracking(plan)
    timings: dict[str, Any] = {}
    # The snapshots need no fence and no common replication position: each is
    # taken after its side's triggers exist, which is all the argument in the
    # module docstring uses. (A first fence here pinned both at one marker: a
    # second write pause of up to ~170 ms that bought nothing.)
    with (
        pinned_snapshot(plan.source.owner()) as source_snapshot,
        pinned_snapshot(plan.target.owner()) as target_snapshot,
    ):
        tables = tenant_tables(source_snapshot)
        digests = {table: row_digest(source_snapshot, table) for table in tables}
        sequence_names = sequences(source_snapshot)  # their positions are carried inside the fence
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=2) as pool:
            s_future = pool.submit(_checksums, source_snapshot, tables, digests, plan.tenant_id)
            t_future = pool.submit(_checksums, target_snapshot, tables, digests, plan.tenant_id)
            bulk = {"source": s_future.result(), "target": t_future.result()}
        timings["bulk_seconds"] = time.monotonic() - start
        timings["rows"] = {table: count for table, (count, _) in bulk["source"].items()}
        pks = {table: _pk(source_snapshot, table) for table in tables}
        # Everything the fenced part needs is opened now, outside the pause:
        # a new connection costs a backend start, several milliseconds each.
        with (
            engine.connect(plan.source.owner()) as source_now,
            engine.connect(plan.target.owner()) as target_now,
            engine.connect(plan.source.owner(), autocommit=True) as source_control,
            engine.connect(plan.target.owner(), autocommit=True) as target_control,
            ThreadPoolExecutor(max_workers=4) as pool,
        ):
            engine._privileged(source_now)
            engine._privileged(target_now)
            engine.catch_up_gate(plan, max_lag_bytes=max_lag_bytes, timeout=catch_up_timeout, backoff=backoff)
            # Early passes, still unfenced, over every change recorded so far:
            # the snapshot side of each key (snapshots do not change) and its
            # current row. Inside the fence only the keys recorded since need
            # either: XOR over disjoint key sets composes, and a key with no
            # change recorded since its last read on either side has not
            # changed since on that side (its trigger records every change,
            # in the same transaction), so its current row is still its final one.
            sides = {"source": (source_snapshot, source_now), "target": (target_snapshot, target_now)}
            passes = _EarlyPasses(plan.move_id, sides, pks, digests, tables)
            passes.run(pool, passes=MAX_EARLY_PASSES)
            if before_fence is not None:
                staging = time.monotonic()
                before_fence()
                timings["before_fence_seconds"] = time.monotonic() - staging
                passes.run(pool, passes=1)  # the changes made while the flip was staged
            seen, marks = passes.seen, passes.marks
            timings["early_pass_keys"] = passes.counts
            fenced = time.monotonic()  # the write pause starts here, drain included
            engine.fence_source(plan, drain_timeout=drain_timeout, conn=source_control)
            drained = time.monotonic()
            timings["drain_seconds"] = drained - fenced
            engine.final_catch_up(plan, conn=target_control, source=source_control)
            timings["final_catch_up_seconds"] = time.monotonic() - drained
            delta_start = time.monotonic()
            # READ COMMITTED statements: each sees every change committed before the fence.
            s_changes = pool.submit(_changes, source_now, plan.move_id, unseen_by=marks["source"])
            t_changes = pool.submit(_changes, target_now, plan.move_id, unseen_by=marks["target"])
            since = _keys(
                [
                    *_new_changes(s_changes.result(), seen["source"]),
                    *_new_changes(t_changes.result(), seen["target"]),
                ],
                tables,
            )
            timings["delta_read_seconds"] = time.monotonic() - delta_start
            passes.read(pool, since)
            mismatches = _mismatches(tables, bulk, passes.combined, passes.keys)
            timings["delta_seconds"] = time.monotonic() - delta_start
            if activate and not mismatches:
                activated = time.monotonic()
                engine.activate_target(plan, conn=target_control, source=source_control, sequence_names=sequence_names)
                timings["activate_seconds"] = time.monotonic() - activated
                if on_activated is not None:
                    on_activated()
            # Read-only transactions: ended after the activation, not inside the pause.
            source_now.rollback()
            target_now.rollback()
        timings["changed_keys"] = sum(len(k) for k in passes.keys.values())
        timings["changed_keys_in_fence"] = sum(len(k) for k in since.values())
        timings["fenced_at"] = fenced
    if mismatches:
        raise VerificationError(f"verification failed: {mismatches}")
    return timings


def _mismatches(
    tables: list[str],
    bulk: dict[str, dict[str, Checksum]],
    changed: dict[str, SidePass],
    keys: dict[str, set[str]],
) -> dict[str, Any]:
    """Per table that differs: (a) the rows no change touched, (b) the final rows of the changed keys.

    (a) is each side's bulk checksum with the snapshot rows of every changed
    key removed; (b) compares the changed keys row by row.
    """
    mismatches: dict[str, Any] = {}
    for table in tables:
        stable: dict[str, Checksum] = {}
        final: dict[str, dict[str, int]] = {}
        for side in ("source", "target"):
            snapshot_part, current = changed[side]
            stable[side] = _remove(bulk[side][table], snapshot_part.get(table, (0, 0)))
            final[side] = current.get(table, {})
        if stable["source"] != stable["target"] or final["source"] != final["target"]:
            differing = {
                k
                for k in final["source"].keys() | final["target"].keys()
                if final["source"].get(k) != final["target"].get(k)
            }
            mismatches[table] = {
                "unchanged_rows": stable,
                "changed_rows": {
                    "source": _summary(final["source"]),
                    "target": _summary(final["target"]),
                    "keys": len(keys[table]),
                    "differing_keys": len(differing),
                },
            }
    return mismatches
