"""Tenant schemas a move must refuse or carry, and a teardown that cannot strand a slot or a fence.

Each case went wrong late or silently before (found by a review):
a partitioned table was skipped by the copy, verification and cleanup, and the
route flipped to a store without its rows (then it was refused; now it moves
through its root); an identity column restarted on the
target and the tenant's first insert there collided with its own copied rows
(now the cutover carries every sequence's position);
a table whose replica identity lacks ``tenant_id`` made PostgreSQL refuse
*every* tenant's UPDATE and DELETE on it for the whole replication; an enum
column failed every verification; a replayed offline cutover hit duplicate
keys; a teardown waiting for table locks left the slot (and the fence) behind.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator
from typing import cast

import psycopg
import pytest

from control_plane.exceptions import MoveError
from control_plane.moves import engine, verify
from control_plane.moves.engine import MovePlan
from data_plane.dsn import libpq
from tests.moves.conftest import Silo, catalog_flip, move_plan
from tests.world import World

pytestmark = pytest.mark.slow


def _ddl(dsns: list[str], statement: str) -> None:
    for dsn in dsns:
        with psycopg.connect(libpq(dsn), autocommit=True) as conn:
            conn.execute(statement)


def _count(dsn: str, table: str, tenant: uuid.UUID) -> int:
    with psycopg.connect(libpq(dsn)) as conn:
        conn.execute("SET row_security = off")
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (tenant,)).fetchone()
        assert row is not None
        return int(row[0])


def _publications(dsn: str) -> int:
    with psycopg.connect(libpq(dsn)) as conn:
        row = conn.execute("SELECT count(*) FROM pg_publication").fetchone()
        assert row is not None
        return int(row[0])


# The pool partitions by range of id (each tenant's rows spread over both
# partitions, next to other tenants' at the same ctids); the silo, differently.
EVENTS = "CREATE TABLE events (tenant_id uuid NOT NULL, id int NOT NULL, body text, PRIMARY KEY (tenant_id, id)) "
POOL_EVENTS = (
    EVENTS + "PARTITION BY RANGE (id); "
    "CREATE TABLE events_low PARTITION OF events FOR VALUES FROM (MINVALUE) TO (100); "
    "CREATE TABLE events_high PARTITION OF events FOR VALUES FROM (100) TO (MAXVALUE); "
    "GRANT SELECT ON events TO tenantctl_replicator"
)
SILO_EVENTS = (
    EVENTS + "PARTITION BY HASH (tenant_id); "
    "CREATE TABLE events_all PARTITION OF events FOR VALUES WITH (MODULUS 1, REMAINDER 0)"
)
# Identity, serial and a free-standing sequence shared by default (the pool's
# tenants all draw from each).
SEQUENCED = (
    "CREATE SEQUENCE shared_refs; "
    "CREATE TABLE notes (tenant_id uuid NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY, n bigserial, "
    "ref bigint DEFAULT nextval('shared_refs'), PRIMARY KEY (tenant_id, id)); "
    "GRANT SELECT ON notes TO tenantctl_replicator"
)
NO_TENANT_IN_KEY = "CREATE TABLE labels (tenant_id uuid NOT NULL, id uuid PRIMARY KEY, name text)"
NO_KEY = "CREATE TABLE labels (tenant_id uuid NOT NULL, name text)"


@pytest.mark.parametrize(
    ("ddl", "table", "modes"),
    [
        (NO_TENANT_IN_KEY, "public.labels", ("online",)),
        (NO_KEY, "public.labels", ("online",)),
    ],
    ids=["tenant_id-outside-the-key", "no-key"],
)
def test_an_unmovable_tenant_table_refuses_the_move_before_anything_is_created(
    world: World, empty_silo: Silo, ddl: str, table: str, modes: tuple[str, ...]
) -> None:
    pool, silo = world.endpoints.pool_url, empty_silo.side.owner_dsn
    # Control first: the world's own schema moves (prepare and replicate, then abort).
    control = move_plan(world, empty_silo)
    engine.prepare_target(control)
    engine.start_replication(control)
    engine.abort(control, route_epoch=control.epoch)
    assert _publications(pool) == 0

    _ddl([pool, silo], ddl)
    for mode in ("online", "offline"):
        plan = move_plan(world, empty_silo, mode)
        if mode not in modes:
            engine.prepare_target(plan)  # offline needs no replica identity
            continue
        with pytest.raises(MoveError) as refused:
            engine.prepare_target(plan)
        assert table in str(refused.value)
        assert _publications(pool) == 0
    assert _count(pool, "projects", world["A"].id) == 1  # the source keeps its rows


def _insert_notes(dsn: str, tenant: uuid.UUID, count: int) -> list[tuple[int, int, int]]:
    with psycopg.connect(libpq(dsn), autocommit=True) as conn:
        conn.execute("SET row_security = off")
        return [
            cast(
                tuple[int, int, int],
                conn.execute("INSERT INTO notes (tenant_id) VALUES (%s) RETURNING id, n, ref", (tenant,)).fetchone(),
            )
            for _ in range(count)
        ]


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_sequences_follow_the_rows_and_never_go_back(world: World, empty_silo: Silo, mode: str) -> None:
    """An identity or serial column used to start again from 1 on the target: the first insert collided."""
    a, b, pool, silo = world["A"], world["B"], world.endpoints.pool_url, empty_silo.side.owner_dsn
    _ddl([pool, silo], SEQUENCED)
    _ddl([silo], "SELECT setval('shared_refs', 10000)")  # the target is already past the source here
    drawn = [*_insert_notes(pool, a.id, 2), *_insert_notes(pool, b.id, 2), *_insert_notes(pool, a.id, 1)]
    assert [row[0] for row in drawn] == [1, 2, 3, 4, 5]  # A's rows hold 1, 2 and 5; B drew 3 and 4

    engine.run_steps(move_plan(world, empty_silo, mode), flip=catalog_flip(world, empty_silo.side, "silo"))

    assert _count(silo, "notes", a.id) == 3 and _count(pool, "notes", a.id) == 0
    # The tenant's next row on its silo: past every value drawn from the pool, and
    # the sequence that was already further stayed where it was.
    assert _insert_notes(silo, a.id, 1) == [(6, 6, 10001)]
    # Control: the pool's sequences went on for its other tenants.
    assert _insert_notes(pool, b.id, 1) == [(6, 6, 6)]


def test_a_sequence_the_target_lacks_or_cannot_advance_refuses_the_move(world: World, empty_silo: Silo) -> None:
    pool, silo = world.endpoints.pool_url, empty_silo.side.owner_dsn
    _ddl([pool], SEQUENCED)
    _ddl([silo], SEQUENCED.replace("shared_refs", "other_refs"))
    with pytest.raises(MoveError, match=r"public\.shared_refs: a sequence of a tenant table, missing on the target"):
        engine.prepare_target(move_plan(world, empty_silo, "offline"))
    _ddl([silo], "CREATE SEQUENCE shared_refs; ALTER TABLE notes ALTER ref SET DEFAULT nextval('shared_refs')")
    engine.prepare_target(move_plan(world, empty_silo, "offline"))  # control: now it can
    _ddl([silo], "REVOKE UPDATE ON SEQUENCE notes_n_seq FROM CURRENT_USER")
    with pytest.raises(MoveError, match="notes_n_seq: a sequence the move's role cannot advance on the target"):
        engine.prepare_target(move_plan(world, empty_silo, "offline"))
    assert _publications(pool) == 0


def _events(dsn: str, tenant: uuid.UUID) -> dict[int, str]:
    with psycopg.connect(libpq(dsn)) as conn:
        conn.execute("SET row_security = off")
        return dict(conn.execute("SELECT id, body FROM events WHERE tenant_id = %s", (tenant,)).fetchall())


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_a_partitioned_table_moves_with_the_changes_made_during_the_move(
    world: World, empty_silo: Silo, mode: str
) -> None:
    """Partitioned tenant tables used to be refused; each partition's rows are the partitioned table's."""
    a, b, pool, silo = world["A"], world["B"], world.endpoints.pool_url, empty_silo.side.owner_dsn
    _ddl([pool], POOL_EVENTS)
    _ddl([silo], SILO_EVENTS)
    with psycopg.connect(libpq(pool), autocommit=True) as conn:
        for tenant in (a.id, b.id):
            conn.execute("INSERT INTO events SELECT %s, g, 'v1' FROM generate_series(95, 104) AS g", (tenant,))
    expected = {i: "v1" for i in range(95, 105)}
    others = _events(pool, b.id)

    def write_during_the_move() -> None:
        # A row in each partition changed, one deleted, one added: recorded by
        # the triggers on the partitions, checked as the partitioned table's.
        with psycopg.connect(libpq(pool), autocommit=True) as conn:
            conn.execute("UPDATE events SET body = 'v2' WHERE tenant_id = %s AND id IN (96, 103)", (a.id,))
            conn.execute("DELETE FROM events WHERE tenant_id = %s AND id = 104", (a.id,))
            conn.execute("INSERT INTO events VALUES (%s, 120, 'new')", (a.id,))
        expected.update({96: "v2", 103: "v2", 120: "new"})
        del expected[104]

    plan = move_plan(world, empty_silo, mode)
    flip = catalog_flip(world, empty_silo.side, "silo")
    if mode == "offline":
        write_during_the_move()
        engine.run_steps(plan, flip=flip)
    else:
        engine.prepare_target(plan)
        try:
            engine.start_replication(plan)
            engine.wait_initial_sync(plan)
            engine.catch_up_gate(plan)
            timings = verify.verify_incremental(plan, activate=True, before_fence=write_during_the_move)
        except BaseException:
            engine.abort(plan, route_epoch=plan.epoch)
            raise
        assert timings["changed_keys"] >= 4
        flip(plan)
        engine.retire_source(plan)
        engine.stop_replication(plan)
        engine.cleanup_source(plan)

    assert _events(silo, a.id) == expected
    assert _events(pool, a.id) == {}
    assert _events(pool, b.id) == others  # the other tenant's rows, in the same partitions, untouched
    assert _events(silo, b.id) == {}  # and never copied


def test_the_refusal_spares_other_tenants_writes(world: World, empty_silo: Silo) -> None:
    """With tenant_id outside the key, the refused move leaves the table writable for every tenant."""
    pool = world.endpoints.pool_url
    _ddl([pool, empty_silo.side.owner_dsn], NO_TENANT_IN_KEY)
    with psycopg.connect(libpq(pool), autocommit=True) as conn:
        conn.execute("INSERT INTO labels VALUES (%s, gen_random_uuid(), 'b')", (world["B"].id,))
    with pytest.raises(MoveError, match="replica identity"):
        engine.run_steps(move_plan(world, empty_silo), flip=catalog_flip(world, empty_silo.side, "silo"))
    with psycopg.connect(libpq(pool), autocommit=True) as conn:
        updated = conn.execute("UPDATE labels SET name = 'b2' WHERE tenant_id = %s", (world["B"].id,)).rowcount
    assert updated == 1


def test_the_publication_does_not_carry_truncate(world: World, empty_silo: Silo) -> None:
    # Row filters do not apply to TRUNCATE: a truncate on a demoted silo would empty the pool's table.
    plan = move_plan(world, empty_silo)
    engine.prepare_target(plan)
    engine.start_replication(plan)
    try:
        with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
            row = conn.execute(
                "SELECT pubinsert, pubupdate, pubdelete, pubtruncate, pubviaroot FROM pg_publication WHERE pubname = %s",
                (plan.name,),
            ).fetchone()
        # Via the root: published as their partitions, a partitioned table's rows escaped its row filter.
        assert row == (True, True, True, False, True)
    finally:
        engine.abort(plan, route_epoch=plan.epoch)


def test_a_replayed_offline_cutover_copies_again_and_verifies(world: World, empty_silo: Silo) -> None:
    """A crash after the offline copy committed, before the cutover's checkpoint: the replay resumes."""
    a = world["A"]
    plan = move_plan(world, empty_silo, "offline")
    engine.prepare_target(plan)
    engine.fence_source(plan)
    first = engine.copy_offline(plan)
    # The worker dies here; DBOS replays the cutover, which takes the target back and fences again.
    assert not engine.take_back_target(plan, route_epoch=plan.epoch)
    engine.fence_source(plan)
    assert engine.copy_offline(plan) == first
    engine.verify(plan)  # raises on any difference
    assert _count(empty_silo.side.owner_dsn, "projects", a.id) == _count(world.endpoints.pool_url, "projects", a.id)
    assert _count(empty_silo.side.owner_dsn, "tasks", a.id) == 1


def test_an_offline_copy_never_overwrites_a_target_that_serves_the_tenant(world: World, empty_silo: Silo) -> None:
    plan = move_plan(world, empty_silo, "offline")
    engine.run_steps(plan, flip=catalog_flip(world, empty_silo.side, "silo"), cleanup=False)
    with pytest.raises(MoveError, match="already serves"):
        engine.copy_offline(plan)
    assert _count(empty_silo.side.owner_dsn, "projects", world["A"].id) == 1


@pytest.mark.parametrize("mode", ["online", "offline"])
def test_a_table_with_an_enum_column_moves_and_verifies(world: World, empty_silo: Silo, mode: str) -> None:
    """An enum hashes by its label's OID, which differs between databases: every such move failed verification."""
    a, pool, silo = world["A"], world.endpoints.pool_url, empty_silo.side.owner_dsn
    _ddl([silo], "CREATE TYPE padding AS ENUM ('x')")  # the target's OIDs now differ from the source's
    _ddl(
        [pool, silo],
        "CREATE TYPE mood AS ENUM ('ok', 'sad'); CREATE DOMAIN moods_t AS mood[]; "
        "CREATE TABLE moods (tenant_id uuid NOT NULL, id uuid NOT NULL, m mood, history moods_t, "
        "at timestamptz DEFAULT now(), PRIMARY KEY (tenant_id, id)); "
        "GRANT SELECT ON moods TO tenantctl_replicator",
    )
    with psycopg.connect(libpq(pool), autocommit=True) as conn:
        conn.execute(
            "INSERT INTO moods (tenant_id, id, m, history) VALUES (%s, gen_random_uuid(), 'sad', '{ok,sad}')", (a.id,)
        )
    plan = move_plan(world, empty_silo, mode)
    engine.run_steps(plan, flip=catalog_flip(world, empty_silo.side, "silo"), cleanup=False)
    assert _count(silo, "moods", a.id) == 1
    # Control: the check still sees a difference in such a table.
    with psycopg.connect(libpq(silo), autocommit=True) as conn:
        conn.execute("SET row_security = off")
        conn.execute("UPDATE moods SET m = 'ok' WHERE tenant_id = %s", (a.id,))
    assert engine.table_checksums(silo, a.id)["public.moods"] != engine.table_checksums(pool, a.id)["public.moods"]


def _tracked_with_one_lock_attempt(world: World, silo: Silo, monkeypatch: pytest.MonkeyPatch) -> MovePlan:
    """A replicating move with its change triggers, whose teardown tries each table's lock once."""
    plan = move_plan(world, silo)
    engine.prepare_target(plan)
    engine.start_replication(plan)
    verify.install_tracking(plan)
    monkeypatch.setattr(verify, "TRIGGER_LOCK_ATTEMPTS", 1)
    return plan


@contextlib.contextmanager
def _busy_table(world: World) -> Iterator[None]:
    """An open write transaction on ``projects``: dropping a trigger there cannot get its lock."""
    with psycopg.connect(libpq(world.endpoints.pool_url)) as busy:
        busy.execute("LOCK TABLE projects IN ROW EXCLUSIVE MODE")
        yield


def test_teardown_drops_the_slot_even_when_the_triggers_cannot_be_dropped_yet(
    world: World, empty_silo: Silo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A busy table delays dropping the change triggers; the slot (which holds the source's WAL) goes first."""
    pool = world.endpoints.pool_url
    plan = _tracked_with_one_lock_attempt(world, empty_silo, monkeypatch)
    with _busy_table(world):
        with pytest.raises(psycopg.errors.LockNotAvailable):
            engine.stop_replication(plan)
        assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}
    engine.stop_replication(plan)  # the retry, once the table is free, drops the triggers
    with psycopg.connect(libpq(pool)) as conn:
        row = conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tc_track_%'").fetchone()
    assert row == (0,)
    engine.abort(plan, route_epoch=plan.epoch)


def test_an_abort_gives_the_tenant_its_writes_back_before_the_teardown(
    world: World, empty_silo: Silo, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = world.endpoints.pool_url
    plan = _tracked_with_one_lock_attempt(world, empty_silo, monkeypatch)
    engine.fence_source(plan)
    with _busy_table(world), pytest.raises(psycopg.errors.LockNotAvailable):
        engine.abort(plan, route_epoch=plan.epoch)
    with psycopg.connect(libpq(pool)) as conn:
        row = conn.execute("SELECT state FROM tenantctl.tenant_ownership WHERE tenant_id = %s", (plan.tenant_id,))
        assert row.fetchone() == ("active",)  # not left fenced until an operator steps in
    engine.abort(plan, route_epoch=plan.epoch)  # the retry completes the teardown
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}
