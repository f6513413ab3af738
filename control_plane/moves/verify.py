"""Incremental verification: the bulk before the fence, only the changes inside it.

A full checksum of a large tenant does not fit in a write pause of
milliseconds, and verification is never weakened to make it fit. Instead:

1. Per-move row triggers on both sides record the primary key of every row of
   the tenant that changes (``tenantctl.move_changes``; ``ENABLE ALWAYS`` on
   the target, so replication apply fires them).
2. A brief first fence drains the tenant and writes marker M0; a REPEATABLE
   READ snapshot S is pinned on the source while fenced (= the state at M0),
   then the source is unfenced. Once M0 has been applied on the target, a
   snapshot T is pinned there. Full per-table counts and XOR checksums of S and
   T are computed while the tenant keeps writing.
3. The real fence and the final catch-up follow. With D = every key recorded
   on either side, rows outside D are unchanged on both sides since S and T,
   so the move is correct iff (a) checksum(S) ^ checksum(S ∩ D) equals
   checksum(T) ^ checksum(T ∩ D) -- the untouched rows agree -- and (b) the
   rows of D agree in the final state. Both are computed from index lookups of
   D; the counts are checked the same way. Only the final state must be read
   inside the fence: the snapshot side of the keys recorded before it is read
   just before it (an early pass), leaving inside it the few keys recorded since.

XOR is its own inverse, which is what makes removing D from the bulk
checksums exact. A difference survives only a 64-bit hash collision.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg import sql

from control_plane.exceptions import VerificationError
from control_plane.moves import engine
from control_plane.moves.engine import MovePlan
from control_plane.moves.tables import tenant_tables

CHANGES = '"tenantctl"."move_changes"'
Checksum = tuple[int, int]  # (rows, xor of row hashes)


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


def install_tracking(plan: MovePlan, *, lock_timeout: float = 2.0, attempts: int = 5) -> None:
    """Create the change-recording triggers on both sides (idempotent)."""
    for side, always in ((plan.source, False), (plan.target, True)):
        with engine.connect(side.owner(), autocommit=True) as conn:
            for table in tenant_tables(conn):
                columns = [c for c, _ in _pk(conn, table)]
                args = sql.SQL(", ").join(sql.Literal(a) for a in [str(plan.move_id), *columns])
                tenant = sql.Literal(str(plan.tenant_id))
                for op, event, when in (
                    ("i", "INSERT", sql.SQL("NEW.tenant_id = {}::uuid").format(tenant)),
                    ("u", "UPDATE", sql.SQL("NEW.tenant_id = {t}::uuid OR OLD.tenant_id = {t}::uuid").format(t=tenant)),
                    ("d", "DELETE", sql.SQL("OLD.tenant_id = {}::uuid").format(tenant)),
                ):
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
            time.sleep(0.2 * (attempt + 1))


def drop_tracking(plan: MovePlan) -> None:
    for side in (plan.source, plan.target):
        with engine.connect(side.owner(), autocommit=True) as conn:
            for table in tenant_tables(conn):
                for op in ("i", "u", "d"):
                    statement = sql.SQL("DROP TRIGGER IF EXISTS {n} ON {t}").format(
                        n=sql.Identifier(_trigger(plan, op)), t=sql.SQL(table)
                    )
                    _with_lock_retries(conn, statement, lock_timeout=2.0, attempts=5)
            conn.execute(f"DELETE FROM {CHANGES} WHERE move_id = %s", (plan.move_id,))


@contextlib.contextmanager
def pinned_snapshot(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    """A read-only REPEATABLE READ transaction whose snapshot is taken on entry."""
    with engine.connect(dsn) as conn:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        engine._privileged(conn)
        conn.execute("SELECT 1 FROM tenantctl.tenant_ownership LIMIT 1")  # takes the snapshot now
        try:
            yield conn
        finally:
            conn.rollback()


def _checksums(conn: psycopg.Connection[Any], tables: list[str], tenant_id: uuid.UUID) -> dict[str, Checksum]:
    result: dict[str, Checksum] = {}
    for table in tables:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(bit_xor(hash_record_extended(t, 0)), 0) FROM {} AS t WHERE tenant_id = %s"
            ).format(sql.SQL(table)),
            (tenant_id,),
        ).fetchone()
        assert row is not None
        result[table] = (int(row[0]), int(row[1]))
    return result


def _keys(conn: psycopg.Connection[Any], move_id: uuid.UUID) -> dict[str, set[str]]:
    rows = conn.execute(f"SELECT tbl, pk::text FROM {CHANGES} WHERE move_id = %s", (move_id,)).fetchall()
    keys: dict[str, set[str]] = {}
    for table, pk in rows:
        keys.setdefault(str(table), set()).add(str(pk))
    return keys


def _checksum_of_keys(
    conn: psycopg.Connection[Any], table: str, columns: list[tuple[str, str]], keys: set[str]
) -> Checksum:
    pick = sql.SQL(", ").join(
        sql.SQL("(k ->> {name})::{type} AS {alias}").format(
            name=sql.Literal(name), type=sql.SQL(kind), alias=sql.Identifier(f"k{i}")
        )
        for i, (name, kind) in enumerate(columns)
    )
    match = sql.SQL(" AND ").join(
        sql.SQL("t.{c} = d.{a}").format(c=sql.Identifier(name), a=sql.Identifier(f"k{i}"))
        for i, (name, _) in enumerate(columns)
    )
    statement = sql.SQL(
        "SELECT count(*), coalesce(bit_xor(hash_record_extended(t, 0)), 0) FROM {table} AS t "
        "JOIN (SELECT DISTINCT {pick} FROM jsonb_array_elements(%s::jsonb) AS k) AS d ON {match}"
    ).format(table=sql.SQL(table), pick=pick, match=match)
    row = conn.execute(statement, (json.dumps([json.loads(k) for k in keys]),)).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _snapshot_part(
    snapshot: psycopg.Connection[Any], pks: dict[str, list[tuple[str, str]]], keys: dict[str, set[str]]
) -> dict[str, Checksum]:
    """Per table: checksum of the keys' rows in the pinned snapshot."""
    return {table: _checksum_of_keys(snapshot, table, pks[table], k) for table, k in keys.items() if k}


def _side_delta(
    snapshot: psycopg.Connection[Any],
    now: psycopg.Connection[Any],
    pks: dict[str, list[tuple[str, str]]],
    new_keys: dict[str, set[str]],
    keys: dict[str, set[str]],
) -> dict[str, tuple[Checksum, Checksum]]:
    """Per table: (snapshot checksum of the keys recorded since the early pass, final checksum of all keys)."""
    return {
        table: (
            _checksum_of_keys(snapshot, table, pks[table], new_keys[table]) if new_keys[table] else (0, 0),
            _checksum_of_keys(now, table, pks[table], table_keys),
        )
        for table, table_keys in keys.items()
        if table_keys
    }


def _union(source: dict[str, set[str]], target: dict[str, set[str]], tables: list[str]) -> dict[str, set[str]]:
    return {table: source.get(table, set()) | target.get(table, set()) for table in tables}


def _remove(total: Checksum, part: Checksum) -> Checksum:
    return total[0] - part[0], total[1] ^ part[1]


def verify_incremental(
    plan: MovePlan,
    *,
    drain_timeout: float = 2.0,
    max_lag_bytes: int = engine.DEFAULT_MAX_LAG_BYTES,
    catch_up_timeout: float = 30.0,
    backoff: Sequence[float] = engine.CATCH_UP_BACKOFF_SECONDS,
) -> dict[str, Any]:
    """Baseline before the fence, fence, final catch-up, delta check; returns timings.

    Leaves the source *fenced* on success (the caller activates the target and
    flips the route); on any failure the caller aborts the move. The catch-up
    gate before the real fence backs off and tries again while the target lags
    (:func:`engine.catch_up_gate`): a target that fell behind during the bulk
    checksums delays the fence, it does not abort the move. ``fenced_at`` in
    the result is the ``time.monotonic()`` instant the real fence started.
    """
    install_tracking(plan)
    baseline_marker = uuid.uuid4()
    engine.fence_source(plan, drain_timeout=drain_timeout, marker=baseline_marker)
    timings: dict[str, Any] = {}
    with pinned_snapshot(plan.source.owner()) as source_snapshot:
        engine.unfence_source(plan)
        engine.final_catch_up(plan, marker=baseline_marker)
        with pinned_snapshot(plan.target.owner()) as target_snapshot:
            tables = tenant_tables(source_snapshot)
            start = time.monotonic()
            with ThreadPoolExecutor(max_workers=2) as pool:
                s_future = pool.submit(_checksums, source_snapshot, tables, plan.tenant_id)
                t_future = pool.submit(_checksums, target_snapshot, tables, plan.tenant_id)
                bulk_source, bulk_target = s_future.result(), t_future.result()
            timings["bulk_seconds"] = time.monotonic() - start
            timings["rows"] = {table: count for table, (count, _) in bulk_source.items()}
            pks = {table: _pk(source_snapshot, table) for table in tables}
            # Everything the fenced part needs is opened now, outside the pause:
            # a new connection costs a backend start, several milliseconds each.
            with (
                engine.connect(plan.source.owner()) as source_now,
                engine.connect(plan.target.owner()) as target_now,
                ThreadPoolExecutor(max_workers=2) as pool,
            ):
                engine._privileged(source_now)
                engine._privileged(target_now)
                engine.catch_up_gate(plan, max_lag_bytes=max_lag_bytes, timeout=catch_up_timeout, backoff=backoff)
                # Early pass, still unfenced: the snapshot side of every key
                # recorded so far (snapshots do not change), so that inside the
                # fence only the keys recorded since need it. XOR over disjoint
                # key sets composes, which keeps the split exact.
                early = _union(_keys(source_now, plan.move_id), _keys(target_now, plan.move_id), tables)
                s_early = pool.submit(_snapshot_part, source_snapshot, pks, early)
                t_early = pool.submit(_snapshot_part, target_snapshot, pks, early)
                early_source, early_target = s_early.result(), t_early.result()
                fenced = time.monotonic()  # the write pause starts here, drain included
                engine.fence_source(plan, drain_timeout=drain_timeout)
                drained = time.monotonic()
                timings["drain_seconds"] = drained - fenced
                engine.final_catch_up(plan)
                timings["final_catch_up_seconds"] = time.monotonic() - drained
                delta_start = time.monotonic()
                # READ COMMITTED statements: each sees every change committed before the fence.
                keys = _union(_keys(source_now, plan.move_id), _keys(target_now, plan.move_id), tables)
                new_keys = {table: keys[table] - early[table] for table in tables}
                # Source and target are checked side by side, each on its own connections.
                s_delta = pool.submit(_side_delta, source_snapshot, source_now, pks, new_keys, keys)
                t_delta = pool.submit(_side_delta, target_snapshot, target_now, pks, new_keys, keys)
                source_delta, target_delta = s_delta.result(), t_delta.result()
                source_now.rollback()
                target_now.rollback()
            mismatches: dict[str, Any] = {}
            for table in tables:
                stable_source, stable_target = bulk_source[table], bulk_target[table]
                final_source = final_target = (0, 0)
                if table in source_delta:
                    before_source, final_source = source_delta[table]
                    before_target, final_target = target_delta[table]
                    stable_source = _remove(stable_source, before_source)
                    stable_target = _remove(stable_target, before_target)
                if table in early_source:
                    stable_source = _remove(stable_source, early_source[table])
                    stable_target = _remove(stable_target, early_target[table])
                if stable_source != stable_target or final_source != final_target:
                    mismatches[table] = {
                        "unchanged_rows": {"source": stable_source, "target": stable_target},
                        "changed_rows": {"source": final_source, "target": final_target, "keys": len(keys[table])},
                    }
            timings["delta_seconds"] = time.monotonic() - delta_start
            timings["changed_keys"] = sum(len(k) for k in keys.values())
            timings["changed_keys_in_fence"] = sum(len(k) for k in new_keys.values())
            timings["fenced_at"] = fenced
    if mismatches:
        raise VerificationError(f"verification failed: {mismatches}")
    return timings
