"""Move steps on two real clusters: no lost write, no phantom, nothing orphaned."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import psycopg
import pytest
import structlog

from control_plane.exceptions import MoveError, MoveNotReadyError, VerificationError
from control_plane.moves import engine
from control_plane.moves import verify as verify_mod
from control_plane.moves.engine import MovePlan
from data_plane.dsn import libpq
from tests.data_plane.conftest import World
from tests.moves.conftest import Silo, catalog_flip, move_plan, rows_of
from tests.slots import push_slot_past_its_keep_size, push_slot_past_its_wal, slot_keep_size, slot_status

pytestmark = pytest.mark.slow


def _seed_bulk(world: World, tenant_id: uuid.UUID, projects: int) -> None:
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        conn.execute(
            "INSERT INTO projects (tenant_id, id, name) SELECT %s, gen_random_uuid(), 'bulk-' || g "
            "FROM generate_series(1, %s) g",
            (tenant_id, projects),
        )
        conn.execute(
            "INSERT INTO tasks (tenant_id, id, project_id, title) "
            "SELECT tenant_id, gen_random_uuid(), id, 'task of ' || name FROM projects WHERE tenant_id = %s",
            (tenant_id,),
        )


def _replicating(world: World, silo: Silo) -> MovePlan:
    """A move's plan with the target prepared, subscribed and through its initial sync."""
    plan = move_plan(world, silo)
    engine.prepare_target(plan)
    engine.start_replication(plan)
    engine.wait_initial_sync(plan)
    return plan


@pytest.mark.parametrize("mode", ["online", "offline"])
async def test_promotion_under_writes_loses_nothing(
    client: httpx.AsyncClient, world: World, empty_silo: Silo, mode: str
) -> None:
    a, b = world["A"], world["B"]
    _seed_bulk(world, a.id, 300)
    plan = move_plan(world, empty_silo, mode)
    acknowledged: list[str] = []
    failures: list[int] = []
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            response = await client.post("/v1/projects", headers=a.headers, json={"name": f"live-{len(acknowledged)}"})
            if response.status_code == 201:
                acknowledged.append(response.json()["id"])
            else:
                failures.append(response.status_code)
            await asyncio.sleep(0.005)

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.2)
    timings = await asyncio.to_thread(engine.run_steps, plan, flip=catalog_flip(world, empty_silo.side, "silo"))
    await asyncio.sleep(0.3)
    stop.set()
    await task

    assert failures == [] or set(failures) <= {503}, failures
    moved = rows_of(empty_silo.side.owner_dsn, a.id)
    assert set(acknowledged) <= moved["projects"], "an acknowledged write is missing from the new home"
    assert len(moved["projects"]) == 301 + 300 + len(acknowledged) - 300  # seed + bulk + live
    assert rows_of(world.endpoints.pool_url, a.id) == {"projects": set(), "tasks": set()}  # cleaned up
    assert rows_of(empty_silo.side.owner_dsn, b.id) == {"projects": set(), "tasks": set()}  # no foreign rows
    assert rows_of(world.endpoints.pool_url, b.id)["projects"] == {str(b.project_id)}  # B untouched
    if mode == "online":
        assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}
    assert timings["fenced_seconds"] < 10
    # the API now serves A from the silo, including everything written during the move
    listed = await client.get("/v1/projects", headers=a.headers, params={"limit": "200"})
    assert listed.status_code == 200
    assert (await client.get("/v1/me", headers=a.headers)).json()["placement"]["kind"] == "silo"


def test_verification_mismatch_aborts_with_source_authoritative(world: World, empty_silo: Silo) -> None:
    a = world["A"]
    plan = _replicating(world, empty_silo)
    engine.fence_source(plan)
    engine.final_catch_up(plan)
    # Inject a difference on the target (a phantom row), as a buggy copy would.
    with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as conn:
        conn.execute("INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'phantom')", (a.id, uuid.uuid4()))
    with pytest.raises(VerificationError, match="public"):
        engine.verify(plan)
    engine.abort(plan)
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        assert conn.execute(
            "SELECT state FROM tenantctl.tenant_ownership WHERE tenant_id = %s", (a.id,)
        ).fetchone() == ("active",)
    assert rows_of(world.endpoints.pool_url, a.id)["projects"] == {str(a.project_id)}
    assert rows_of(empty_silo.side.owner_dsn, a.id) == {"projects": set(), "tasks": set()}
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}
    with pytest.raises(MoveError, match="not been retired"):
        engine.cleanup_source(plan)  # the source is authoritative again: never cleaned


def test_fence_drains_in_flight_and_terminates_stragglers(world: World, empty_silo: Silo) -> None:
    a = world["A"]
    plan = move_plan(world, empty_silo)
    done, fenced = threading.Event(), threading.Event()
    outcome: dict[str, object] = {}

    def in_flight() -> None:
        try:
            with psycopg.connect(libpq(world.endpoints.app_pool_url)) as conn:
                conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (a.id,))
                conn.execute(
                    "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'straggler')", (a.id, uuid.uuid4())
                )
                done.set()
                fenced.wait(10)  # never commits in time: only once the fence is up
                conn.commit()
                outcome["committed"] = True
        except psycopg.OperationalError as exc:
            outcome["error"] = str(exc)

    thread = threading.Thread(target=in_flight)
    thread.start()
    done.wait(5)
    start = time.monotonic()
    engine.fence_source(plan, drain_timeout=0.3)
    assert time.monotonic() - start < 5
    fenced.set()  # the straggler now tries to commit, after the fence
    thread.join(15)
    assert "committed" not in outcome  # terminated: the unacknowledged write rolled back
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        assert conn.execute("SELECT count(*) FROM projects WHERE name = 'straggler'").fetchone() == (0,)
    engine.unfence_source(plan)


def test_target_that_serves_the_tenant_is_never_overwritten(world: World, empty_silo: Silo) -> None:
    a = world["A"]
    with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as conn:
        conn.execute("SELECT tenantctl.claim_tenant(%s, 5)", (a.id,))
        conn.execute("INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'precious')", (a.id, uuid.uuid4()))
    with pytest.raises(MoveError, match="already serves"):
        engine.prepare_target(move_plan(world, empty_silo))
    assert len(rows_of(empty_silo.side.owner_dsn, a.id)["projects"]) == 1


@pytest.mark.parametrize("when", ["before-baseline", "after-baseline"])
def test_incremental_verification_catches_drift(
    world: World, empty_silo: Silo, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """Drift present at the baseline fails the bulk comparison; drift after it fails the check in the fence.

    (Changes on the target all come from replication apply, which fires the
    move's ENABLE ALWAYS triggers; that is what makes "after the baseline"
    complete: only someone disabling those triggers could hide a change.)
    """
    a = world["A"]
    _seed_bulk(world, a.id, 50)
    plan = _replicating(world, empty_silo)

    def corrupt() -> None:
        with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as conn:
            if when == "before-baseline":  # e.g. a faulty initial copy
                conn.execute("UPDATE projects SET name = 'drifted' WHERE id = (SELECT id FROM projects LIMIT 1)")
            else:  # a row the source never had, applied after the baseline
                conn.execute(
                    "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'phantom')", (a.id, uuid.uuid4())
                )

    if when == "before-baseline":
        corrupt()
    else:
        original = engine.wait_caught_up

        def corrupt_then_wait(p: MovePlan, **kw: object) -> int:
            corrupt()
            return original(p)

        monkeypatch.setattr(engine, "wait_caught_up", corrupt_then_wait)
    with pytest.raises(VerificationError, match="unchanged_rows" if when == "before-baseline" else "changed_rows"):
        verify_mod.verify_incremental(plan)
    engine.abort(plan)
    assert rows_of(empty_silo.side.owner_dsn, a.id) == {"projects": set(), "tasks": set()}
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        assert conn.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'tc_track_%'").fetchone() == (0,)
        assert conn.execute(
            "SELECT state FROM tenantctl.tenant_ownership WHERE tenant_id = %s", (a.id,)
        ).fetchone() == ("active",)


def test_a_lagging_target_delays_the_fence_instead_of_failing_the_move(
    world: World, empty_silo: Silo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The catch-up gate right before the real fence backs off and tries again (never fails open).

    The target really lags: its subscription is disabled while the tenant
    writes, and enabled again a moment later. The first attempt must see the
    backlog and refuse to fence; a later one fences, and verification passes.
    """
    a = world["A"]
    plan = _replicating(world, empty_silo)
    original = engine.wait_caught_up
    outcomes: list[str] = []

    def subscription(enabled: bool) -> None:
        with psycopg.connect(libpq(empty_silo.side.admin_dsn), autocommit=True) as conn:
            conn.execute(f"ALTER SUBSCRIPTION {plan.name} {'ENABLE' if enabled else 'DISABLE'}")

    def lagging(p: MovePlan, **kw: object) -> int:
        if not outcomes:  # the gate in front of the real fence, first attempt
            subscription(False)
            _seed_bulk(world, a.id, 3000)  # ~1 MB of WAL the target has not seen
            threading.Timer(1.0, subscription, args=(True,)).start()
        try:
            lag = original(p, **kw)  # type: ignore[arg-type]  # kw: the gate's max_lag_bytes and timeout
        except MoveNotReadyError:
            outcomes.append("not ready")
            raise
        outcomes.append("caught up")
        return lag

    monkeypatch.setattr(engine, "wait_caught_up", lagging)
    timings = verify_mod.verify_incremental(plan, max_lag_bytes=64 * 1024, catch_up_timeout=0.3, backoff=[0.5] * 20)
    assert outcomes[0] == "not ready" and outcomes[-1] == "caught up", outcomes  # delayed, then fenced
    assert timings["changed_keys"] >= 3000  # the rows written while it lagged were checked inside the fence
    assert rows_of(empty_silo.side.owner_dsn, a.id) == rows_of(world.endpoints.pool_url, a.id)
    engine.abort(plan)
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}

    # Control: the same gate with no retry left gives up -- and never fences with the backlog.
    monkeypatch.setattr(engine, "wait_caught_up", original)
    engine.start_replication(plan)
    engine.wait_initial_sync(plan)
    subscription(False)
    _seed_bulk(world, a.id, 1000)
    with pytest.raises(MoveNotReadyError, match="replication lag"):
        engine.catch_up_gate(plan, max_lag_bytes=64 * 1024, timeout=0.3, backoff=[])
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        assert conn.execute(
            "SELECT state FROM tenantctl.tenant_ownership WHERE tenant_id = %s", (a.id,)
        ).fetchone() == ("active",)
    engine.abort(plan)
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}


def _ownership(dsn: str, tenant_id: uuid.UUID) -> tuple[str, int] | None:
    with psycopg.connect(libpq(dsn)) as conn:
        row = conn.execute(
            "SELECT state, epoch FROM tenantctl.tenant_ownership WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


def test_a_target_activated_in_the_fence_is_taken_back_only_while_the_route_names_the_source(
    world: World, empty_silo: Silo
) -> None:
    """The cutover activates the target before the flip; only the catalog's epoch can say it is not authoritative."""
    a = world["A"]
    _seed_bulk(world, a.id, 50)
    plan = _replicating(world, empty_silo)
    verify_mod.verify_incremental(plan, activate=True)
    assert _ownership(empty_silo.side.owner_dsn, a.id) == ("active", plan.new_epoch)
    assert _ownership(world.endpoints.pool_url, a.id) == ("fenced", plan.epoch)
    copied = rows_of(empty_silo.side.owner_dsn, a.id)
    assert copied == rows_of(world.endpoints.pool_url, a.id) and len(copied["projects"]) == 51
    # Denied: without the catalog's epoch, or once the route has reached the target, it may be authoritative.
    for route_epoch in (None, plan.new_epoch):
        with pytest.raises(MoveError, match="past its flip"):
            engine.abort(plan, route_epoch=route_epoch)
        assert _ownership(empty_silo.side.owner_dsn, a.id) == ("active", plan.new_epoch)
        assert rows_of(empty_silo.side.owner_dsn, a.id) == copied
    # Allowed: the route still names the source -- target retired and emptied, source authoritative again.
    engine.abort(plan, route_epoch=plan.epoch)
    assert _ownership(empty_silo.side.owner_dsn, a.id) == ("moved", plan.epoch)
    assert _ownership(world.endpoints.pool_url, a.id) == ("active", plan.epoch)
    assert rows_of(empty_silo.side.owner_dsn, a.id) == {"projects": set(), "tasks": set()}
    assert rows_of(world.endpoints.pool_url, a.id) == copied
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}


@pytest.mark.parametrize("drift", [True, False])
def test_a_key_checked_in_the_early_pass_is_checked_again_if_it_changes_before_the_fence(
    world: World, empty_silo: Silo, monkeypatch: pytest.MonkeyPatch, drift: bool
) -> None:
    """The early pass reads the current rows of the keys recorded so far; a later change must not hide behind it."""
    a = world["A"]
    plan = _replicating(world, empty_silo)
    written = uuid.uuid4()
    original_gate, original_fence = engine.wait_caught_up, engine.fence_source

    def write_then_wait(p: MovePlan, **kw: object) -> int:
        _live_write(world, p, a.id, written)  # after the baseline, replicated before the early pass reads it
        return original_gate(p, **kw)  # type: ignore[arg-type]  # kw: the gate's max_lag_bytes and timeout

    def drift_then_fence(p: MovePlan, **kw: object) -> None:
        if drift and kw.get("conn") is not None:  # the real fence, after the early pass
            with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as conn:
                conn.execute("UPDATE projects SET name = 'drifted' WHERE id = %s", (written,))
        original_fence(p, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "wait_caught_up", write_then_wait)
    monkeypatch.setattr(engine, "fence_source", drift_then_fence)
    if drift:
        with pytest.raises(VerificationError, match="changed_rows"):
            verify_mod.verify_incremental(plan)
    else:
        timings = verify_mod.verify_incremental(plan)  # control: the same move without the drift passes
        assert timings["changed_keys"] >= 1
    _abort_leaves_the_source_authoritative(world, plan, a.id)


@pytest.mark.parametrize("drift", [True, False])
def test_a_row_deleted_on_the_target_between_early_passes_fails_verification(
    world: World, empty_silo: Silo, monkeypatch: pytest.MonkeyPatch, drift: bool
) -> None:
    """A later pass re-reads a key: a row gone since its first read must not keep that read's hash."""
    a = world["A"]
    plan = _replicating(world, empty_silo)
    first, second = uuid.uuid4(), uuid.uuid4()
    original_gate, original_passes = engine.wait_caught_up, verify_mod._passes
    calls: list[int] = []

    def write_then_wait(p: MovePlan, **kw: object) -> int:
        _live_write(world, p, a.id, first)  # recorded on both sides before the first early pass
        return original_gate(p, **kw)  # type: ignore[arg-type]  # kw: the gate's max_lag_bytes and timeout

    def passes_then_change(*args: object) -> object:
        result = original_passes(*args)  # type: ignore[arg-type]
        calls.append(1)
        if len(calls) == 1:  # after the first early pass: something for a second one
            if drift:
                with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as conn:
                    conn.execute("DELETE FROM projects WHERE id = %s", (first,))
            else:
                _live_write(world, plan, a.id, second)
        return result

    monkeypatch.setattr(engine, "wait_caught_up", write_then_wait)
    monkeypatch.setattr(verify_mod, "_passes", passes_then_change)
    if drift:
        with pytest.raises(VerificationError, match="changed_rows"):
            verify_mod.verify_incremental(plan)
    else:
        timings = verify_mod.verify_incremental(plan)  # control: the same passes without the drift
        assert len(timings["early_pass_keys"]) >= 2
    _abort_leaves_the_source_authoritative(world, plan, a.id)


def _live_write(world: World, plan: MovePlan, tenant_id: uuid.UUID, project: uuid.UUID) -> None:
    """A tenant write on the source, on the target too when this returns (no fence)."""
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        conn.execute("INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'live')", (tenant_id, project))
    engine.final_catch_up(plan, marker=_marker(world, tenant_id))


def _abort_leaves_the_source_authoritative(world: World, plan: MovePlan, tenant_id: uuid.UUID) -> None:
    engine.abort(plan, route_epoch=plan.epoch)
    assert _ownership(world.endpoints.pool_url, tenant_id) == ("active", plan.epoch)
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}


def _marker(world: World, tenant_id: uuid.UUID) -> uuid.UUID:
    """A marker written on the source now (no fence): once on the target, so is every earlier write."""
    marker = uuid.uuid4()
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        conn.execute(f"INSERT INTO {engine.MARKERS} (marker, tenant_id) VALUES (%s, %s)", (marker, tenant_id))
    return marker


def _subscription(silo: Silo, plan: MovePlan, *, enabled: bool) -> None:
    with psycopg.connect(libpq(silo.side.admin_dsn), autocommit=True) as conn:
        conn.execute(f"ALTER SUBSCRIPTION {plan.name} {'ENABLE' if enabled else 'DISABLE'}")


@pytest.mark.parametrize("drift", [False, True])
def test_verification_fences_once_and_needs_no_common_snapshot_position(
    world: World, empty_silo: Silo, monkeypatch: pytest.MonkeyPatch, drift: bool
) -> None:
    """The snapshots are pinned with no fence, while the target lags the source; only the real fence pauses writes.

    Between the triggers' creation and the snapshots the tenant inserts rows
    and updates existing ones on the source while the target's subscription
    is off, so the target's snapshot misses them; they are applied after it.
    That move must verify (and every row match), fencing the tenant once. With
    drift, a row the lagging changes never touched is altered on the target
    after its snapshot: it must still fail verification.
    """
    a = world["A"]
    _seed_bulk(world, a.id, 50)
    plan = _replicating(world, empty_silo)
    original_install, original_fence, original_pin = (
        verify_mod.install_tracking,
        engine.fence_source,
        verify_mod.pinned_snapshot,
    )
    fences: list[bool] = []
    pinned: list[str] = []

    def install_then_lag(p: MovePlan, **kw: object) -> None:
        original_install(p, **kw)  # type: ignore[arg-type]
        _subscription(empty_silo, p, enabled=False)
        with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
            conn.execute(
                "INSERT INTO projects (tenant_id, id, name) SELECT %s, gen_random_uuid(), 'late-' || g "
                "FROM generate_series(1, 200) g",
                (a.id,),
            )
            conn.execute(
                "UPDATE projects SET name = name || '-edited' WHERE tenant_id = %s AND name = 'bulk-1'", (a.id,)
            )

    @contextlib.contextmanager
    def pin_then_resume(dsn: str) -> Iterator[psycopg.Connection[Any]]:
        with original_pin(dsn) as conn:
            pinned.append(dsn)
            if len(pinned) == 2:  # both snapshots taken: the target's misses the late rows
                assert conn.execute("SELECT count(*) FROM projects WHERE name LIKE 'late-%'").fetchone() == (0,)
                _subscription(empty_silo, plan, enabled=True)
                if drift:
                    with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as owner:
                        owner.execute("UPDATE projects SET name = 'drifted' WHERE name = 'bulk-2'")
            yield conn

    def counting_fence(p: MovePlan, **kw: object) -> None:
        fences.append(True)
        original_fence(p, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(verify_mod, "install_tracking", install_then_lag)
    monkeypatch.setattr(verify_mod, "pinned_snapshot", pin_then_resume)
    monkeypatch.setattr(engine, "fence_source", counting_fence)
    if drift:
        with pytest.raises(VerificationError, match="changed_rows"):
            verify_mod.verify_incremental(plan)
    else:
        timings = verify_mod.verify_incremental(plan)
        assert timings["changed_keys"] >= 201  # the late rows and the edited one were checked key by key
        assert rows_of(empty_silo.side.owner_dsn, a.id) == rows_of(world.endpoints.pool_url, a.id)
    assert len(fences) == 1 and len(pinned) == 2
    engine.abort(plan, route_epoch=plan.epoch)
    assert _ownership(world.endpoints.pool_url, a.id) == ("active", plan.epoch)
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}


def test_the_fence_reads_every_change_the_early_read_missed_even_out_of_id_order(world: World) -> None:
    """A change whose transaction commits after the early read is read again, whatever its id.

    Change-row ids follow insert order, not commit order: the open
    transaction's row gets the smaller id yet becomes visible after the read.
    The fence's read is filtered by the early snapshot, so it returns that
    row; a change committed before the snapshot is not read again (control).
    """
    move = uuid.uuid4()
    insert = f"INSERT INTO {verify_mod.CHANGES} (move_id, tbl, pk) VALUES (%s, 'projects', %s::jsonb) RETURNING id"
    dsn = libpq(world.endpoints.pool_url)
    with (
        psycopg.connect(dsn) as reader,
        psycopg.connect(dsn) as open_tx,
        psycopg.connect(dsn, autocommit=True) as committed,
    ):
        before = committed.execute(insert, (move, '{"id": "before"}')).fetchone()
        late = open_tx.execute(insert, (move, '{"id": "late"}')).fetchone()
        seen_row = committed.execute(insert, (move, '{"id": "seen"}')).fetchone()
        assert before is not None and late is not None and seen_row is not None
        mark = verify_mod._snapshot(reader)
        seen = verify_mod._changes(reader, move)
        open_tx.commit()
        unseen = verify_mod._changes(reader, move, unseen_by=mark)
        reader.rollback()
        committed.execute(f"DELETE FROM {verify_mod.CHANGES} WHERE move_id = %s", (move,))
    assert set(seen) == {before[0], seen_row[0]}
    assert late[0] < seen_row[0]  # the case an id watermark would miss
    assert late[0] in unseen
    assert before[0] not in unseen and seen_row[0] not in unseen


def _recorded(dsn: str, plan: MovePlan) -> int:
    with psycopg.connect(libpq(dsn)) as conn:
        row = conn.execute("SELECT count(*) FROM tenantctl.move_changes WHERE move_id = %s", (plan.move_id,)).fetchone()
    assert row is not None
    return int(row[0])


def _app_write(world: World, silo: Silo, tenant_id: uuid.UUID, epoch: int) -> None:
    """A tenant transaction of the application role on the silo, as a request after the flip runs it."""
    with world.catalog() as cat:
        row = cat.execute("SELECT app_dsn FROM locations WHERE id = %s", (silo.location_id,)).fetchone()
    assert row is not None
    with psycopg.connect(libpq(str(row[0]))) as conn:
        conn.execute("SELECT tenantctl.begin_tenant(%s, %s)", (tenant_id, epoch))
        conn.execute(
            "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'after the flip')", (tenant_id, uuid.uuid4())
        )


def test_the_target_records_changes_only_until_it_serves_the_tenant(world: World, empty_silo: Silo) -> None:
    """Verification is over before the activation: the tenant's own writes after it fire no trigger on the target."""
    a = world["A"]
    plan = _replicating(world, empty_silo)
    verify_mod.install_tracking(plan)
    target, source = empty_silo.side.owner_dsn, world.endpoints.pool_url
    # Recorded: a write on the target before it serves the tenant, whoever makes it.
    with psycopg.connect(libpq(target)) as conn:
        conn.execute("INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'stray')", (a.id, uuid.uuid4()))
    assert _recorded(target, plan) == 1
    engine.fence_source(plan)
    engine.activate_target(plan)
    # Not recorded: the tenant's transactions once the target serves it (the
    # application role evaluates the triggers' condition: the write succeeds).
    _app_write(world, empty_silo, a.id, plan.new_epoch)
    assert _recorded(target, plan) == 1
    assert len(rows_of(target, a.id)["projects"]) == 3  # the seeded row, the stray one, the one after the activation
    # The source's triggers record whatever its state.
    before = _recorded(source, plan)
    with psycopg.connect(libpq(source)) as conn:
        conn.execute("UPDATE projects SET name = 'renamed' WHERE tenant_id = %s", (a.id,))
    assert _recorded(source, plan) == before + 2  # an update records the old and the new key
    engine.abort(plan, route_epoch=plan.epoch)
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}


@pytest.mark.parametrize("drift", [True, False])
def test_a_target_activated_before_a_crash_is_taken_back_and_verified_again(
    world: World, empty_silo: Silo, monkeypatch: pytest.MonkeyPatch, drift: bool
) -> None:
    """A replayed cutover (the worker died between the activation and the flip) starts from a target that records."""
    a = world["A"]
    _seed_bulk(world, a.id, 20)
    plan = _replicating(world, empty_silo)
    verify_mod.verify_incremental(plan, activate=True)
    assert _ownership(empty_silo.side.owner_dsn, a.id) == ("active", plan.new_epoch)
    with pytest.raises(MoveError, match="past its flip"):  # the route has reached the target: authoritative
        engine.take_back_target(plan, route_epoch=plan.new_epoch)
    assert engine.take_back_target(plan, route_epoch=plan.epoch) is True
    assert _ownership(empty_silo.side.owner_dsn, a.id) == ("moved", plan.epoch)
    assert engine.take_back_target(plan, route_epoch=plan.epoch) is False
    original_fence = engine.fence_source

    def drift_then_fence(p: MovePlan, **kw: object) -> None:
        if drift and kw.get("conn") is not None:  # after the replayed early pass, before its fence
            with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as conn:
                conn.execute(
                    "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'phantom')", (a.id, uuid.uuid4())
                )
        original_fence(p, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(engine, "fence_source", drift_then_fence)
    if drift:
        with pytest.raises(VerificationError):
            verify_mod.verify_incremental(plan, activate=True)
        assert _ownership(empty_silo.side.owner_dsn, a.id) == ("moved", plan.epoch)
    else:
        verify_mod.verify_incremental(plan, activate=True)  # control: the replay without drift passes
        assert _ownership(empty_silo.side.owner_dsn, a.id) == ("active", plan.new_epoch)
    engine.abort(plan, route_epoch=plan.epoch)
    assert _ownership(world.endpoints.pool_url, a.id) == ("active", plan.epoch)


def test_the_bulk_checksums_run_without_parallel_workers(world: World) -> None:
    """Background work on a shared database: one backend per side (bench/verify_load: concurrent writes' p99 8x lower)."""
    with verify_mod.pinned_snapshot(world.endpoints.pool_url) as conn:
        assert conn.execute("SHOW max_parallel_workers_per_gather").fetchone() == ("0",)
        assert conn.execute("SHOW transaction_isolation").fetchone() == ("repeatable read",)
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:  # control: only that transaction
        assert conn.execute("SHOW max_parallel_workers_per_gather").fetchone() != ("0",)


def test_the_initial_copy_is_binary_and_lands_every_row(world: World, empty_silo: Silo) -> None:
    """The subscription transfers in binary; the copied rows are the source's, value for value."""
    a = world["A"]
    _seed_bulk(world, a.id, 50)
    plan = _replicating(world, empty_silo)
    try:
        with psycopg.connect(libpq(empty_silo.side.admin_dsn)) as dst:
            row = dst.execute("SELECT subbinary FROM pg_subscription WHERE subname = %s", (plan.name,)).fetchone()
        assert row == (True,)
        columns = {"projects": "id, name, status, created_at, updated_at", "tasks": "id, project_id, title, done"}
        for table, cols in columns.items():
            query = f"SELECT {cols} FROM {table} WHERE tenant_id = %s ORDER BY id"
            with (
                psycopg.connect(libpq(world.endpoints.pool_url)) as src,
                psycopg.connect(libpq(empty_silo.side.owner_dsn)) as dst,
            ):
                source_rows = src.execute(query, (a.id,)).fetchall()
                assert len(source_rows) >= 50
                assert dst.execute(query, (a.id,)).fetchall() == source_rows
    finally:
        engine.abort(plan, route_epoch=plan.epoch)
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}


def test_binary_replication_only_for_types_whose_binary_form_is_the_same_in_both_databases(world: World) -> None:
    """Built-in types, enums and domains over them are binary-safe; a user type inside an array is not.

    An array's binary form carries its element type's OID, which differs between
    the pool and a silo for a user-defined type: receiving it fails, so such a
    move keeps the text protocol. Everything runs in a rolled-back transaction.
    """
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        assert engine.binary_safe(conn, [*engine.tenant_tables(conn), engine.MARKERS])
        conn.execute("CREATE TYPE t_mood AS ENUM ('calm', 'busy')")
        conn.execute("CREATE DOMAIN t_label AS text CHECK (VALUE <> '')")
        conn.execute("CREATE TEMP TABLE safe (tenant_id uuid, mood t_mood, label t_label, tags text[], n numeric)")
        conn.execute("CREATE TEMP TABLE moods (tenant_id uuid, moods t_mood[])")
        conn.execute("CREATE TEMP TABLE acl (tenant_id uuid, grant_ aclitem)")  # no binary send/receive
        assert engine.binary_safe(conn, ["safe"])  # control
        assert not engine.binary_safe(conn, ["moods"])
        assert not engine.binary_safe(conn, ["acl"])
        assert not engine.binary_safe(conn, ["safe", "moods"])
        conn.rollback()


def test_an_initial_copy_that_stops_moving_is_reported_and_one_that_resumes_finishes(
    world: World, empty_silo: Silo
) -> None:
    """The wait has no overall deadline (a large tenant's copy takes as long as it takes), only a stall limit."""
    a = world["A"]
    _seed_bulk(world, a.id, 200)
    plan = move_plan(world, empty_silo)
    engine.prepare_target(plan)
    # Someone holds the target's tasks table: that table's sync cannot write a row.
    with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as holder:
        holder.execute("LOCK TABLE tasks IN SHARE MODE")  # blocks the sync's COPY, not CREATE SUBSCRIPTION
        engine.start_replication(plan)
        started = time.monotonic()
        with pytest.raises(MoveNotReadyError, match="no progress for 2s"):
            engine.wait_initial_sync(plan, stall_timeout=2.0)
        assert time.monotonic() - started >= 2.0
        holder.rollback()
    # Control: once the table is free the same copy moves again and finishes.
    engine.wait_initial_sync(plan, stall_timeout=2.0)
    assert rows_of(empty_silo.side.owner_dsn, a.id) == rows_of(world.endpoints.pool_url, a.id)
    engine.abort(plan, route_epoch=plan.epoch)
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}


def _replicating_a_row_the_target_rejects(world: World, silo: Silo) -> MovePlan:
    """A move's plan subscribed to a tenant with a row the target rejects: its table sync fails, every time."""
    _seed_bulk(world, world["A"].id, 20)
    plan = move_plan(world, silo)
    engine.prepare_target(plan)
    with psycopg.connect(libpq(silo.side.owner_dsn)) as conn:
        conn.execute("ALTER TABLE projects ADD CONSTRAINT no_bulk_7 CHECK (name <> 'bulk-7')")
    engine.start_replication(plan)
    return plan


def test_an_initial_copy_the_target_keeps_refusing_fails_the_wait_at_once(world: World, empty_silo: Silo) -> None:
    """PostgreSQL retries a failed table sync forever; the move counts the failures and gives up."""
    plan = _replicating_a_row_the_target_rejects(world, empty_silo)
    started = time.monotonic()
    with pytest.raises(MoveError, match=r"keeps failing \([1-9]\d* failed table syncs\).*sync [1-9]") as failed:
        engine.wait_initial_sync(plan, max_errors=1)
    assert not isinstance(failed.value, MoveNotReadyError)
    assert time.monotonic() - started < 60  # not the stall limit: the failure itself ends the wait
    engine.abort(plan, route_epoch=plan.epoch)
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}
    # Control: without the constraint the same tenant copies (the abort emptied the target).
    with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as conn:
        conn.execute("ALTER TABLE projects DROP CONSTRAINT no_bulk_7")
    plan = _replicating(world, empty_silo)
    a = world["A"]
    assert rows_of(empty_silo.side.owner_dsn, a.id) == rows_of(world.endpoints.pool_url, a.id)
    engine.abort(plan, route_epoch=plan.epoch)


def _slots_like(admin: str, pattern: str) -> set[str]:
    with psycopg.connect(libpq(admin)) as conn:
        rows = conn.execute("SELECT slot_name::text FROM pg_replication_slots WHERE slot_name LIKE %s", (pattern,))
        return {row[0] for row in rows.fetchall()}


def _sync_diagnostics(silo: Silo, plan: MovePlan) -> str:
    """What the subscriber says about the move's subscription (for a failure message)."""
    with psycopg.connect(libpq(silo.side.admin_dsn)) as conn:
        stats = conn.execute(
            "SELECT apply_error_count, sync_error_count FROM pg_stat_subscription_stats WHERE subname = %s",
            (plan.name,),
        ).fetchall()
        workers = conn.execute(
            "SELECT relid::regclass::text, pid FROM pg_stat_subscription WHERE subname = %s", (plan.name,)
        ).fetchall()
    return f"errors (apply, sync): {stats}; workers (relation, pid): {workers}"


def test_stopping_replication_drops_its_own_table_sync_slots_and_no_other_servers(
    world: World, empty_silo: Silo
) -> None:
    """A table sync's slot is named by subscription oid *and* subscriber: another server's subscription can share the oid."""
    plan = _replicating_a_row_the_target_rejects(world, empty_silo)  # the sync fails every time: its slot stays
    source = plan.source.admin()
    other: str | None = None
    try:
        with psycopg.connect(libpq(empty_silo.side.admin_dsn)) as conn:
            row = conn.execute(
                "SELECT s.oid, c.system_identifier FROM pg_subscription s, pg_control_system() c WHERE s.subname = %s",
                (plan.name,),
            ).fetchone()
        assert row is not None
        subid, subscriber = int(row[0]), int(row[1])
        own = engine.table_sync_slots(subid, subscriber)
        # A failed sync is retried after wal_retrieve_retry_interval; on a loaded host the
        # first attempt may come late: wait generously, and say what the subscriber saw if not.
        deadline = time.monotonic() + 90
        while not _slots_like(source, own) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _slots_like(source, own), f"no slot of the failing table sync: {_sync_diagnostics(empty_silo, plan)}"
        # The same oid's table sync from another server (a concurrent move to another silo server).
        other = f"pg_{subid}_sync_16384_{subscriber + 1}"
        with psycopg.connect(libpq(source), autocommit=True) as conn:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (other,))
        engine.abort(plan, route_epoch=plan.epoch)
        assert _slots_like(source, own) == set()
        assert _slots_like(source, f"pg\\_{subid}\\_sync\\_%") == {other}
    finally:
        # Whatever failed above, nothing of this test may outlive it: the servers are
        # shared by the session, and a leftover slot fails every later slot count.
        engine.abort(plan, route_epoch=plan.epoch)
        if other is not None:
            with psycopg.connect(libpq(source), autocommit=True) as conn:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (other,))


def _slot_status(plan: MovePlan) -> tuple[str, bool] | None:
    return slot_status(plan.source.admin(), plan.name)


def _lose_the_slot(world: World, silo: Silo, plan: MovePlan) -> None:
    """Disable the subscription (nothing advances the slot), then make the source invalidate the slot."""
    _subscription(silo, plan, enabled=False)
    deadline = time.monotonic() + 30
    while _slot_status(plan) != ("reserved", False) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert world.endpoints.pool_admin_url is not None
    with slot_keep_size(world.endpoints.pool_admin_url, "1MB"):
        push_slot_past_its_wal(plan.source.admin(), plan.name)


def test_a_replication_slot_the_source_invalidated_fails_the_move_at_once(world: World, empty_silo: Silo) -> None:
    """A lost slot can never catch up: the copy and the catch-up gate say so, instead of waiting minutes."""
    a = world["A"]
    _seed_bulk(world, a.id, 50)
    plan = move_plan(world, empty_silo)
    engine.prepare_target(plan)
    with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as holder:
        holder.execute("LOCK TABLE tasks IN SHARE MODE")  # the copy cannot finish while this is held
        engine.start_replication(plan)
        # Control: a copy held up with its slot intact is waiting, not failed.
        with pytest.raises(MoveNotReadyError, match="no progress"):
            engine.wait_initial_sync(plan, stall_timeout=1.0)
        assert engine.replication_lag(plan) is not None
        _lose_the_slot(world, empty_silo, plan)
        holder.rollback()
    started = time.monotonic()
    with pytest.raises(MoveError, match="invalidated replication slot") as lost:
        engine.wait_initial_sync(plan, stall_timeout=600.0)
    assert not isinstance(lost.value, MoveNotReadyError)
    with pytest.raises(MoveError, match="invalidated replication slot") as lost:
        engine.catch_up_gate(plan, timeout=600.0, backoff=(600.0,))  # not retried: it cannot get better
    assert not isinstance(lost.value, MoveNotReadyError)
    assert time.monotonic() - started < 30
    engine.abort(plan, route_epoch=plan.epoch)
    assert engine.replication_objects(plan) == {"publications": 0, "subscriptions": 0, "slots": 0}
    # Control: started again, the move copies afresh and catches up.
    plan = _replicating(world, empty_silo)
    assert engine.catch_up_gate(plan, backoff=()) >= 0
    assert rows_of(empty_silo.side.owner_dsn, a.id) == rows_of(world.endpoints.pool_url, a.id)
    engine.abort(plan, route_epoch=plan.epoch)


def test_replication_failing_inside_the_fence_ends_the_final_catch_up_not_its_timeout(
    world: World, empty_silo: Silo
) -> None:
    """A marker that cannot arrive (the apply worker keeps failing) must not hold the tenant fenced for 30 s."""
    a = world["A"]
    plan = _replicating(world, empty_silo)
    engine.catch_up_gate(plan, backoff=())
    clash = uuid.uuid4()
    # A row the target already has: applying the source's insert of the same key fails, every retry.
    with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as conn:
        conn.execute("INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'in the way')", (a.id, clash))
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        conn.execute("INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'live')", (a.id, clash))
    engine.fence_source(plan)
    with pytest.raises(MoveError, match="apply errors") as failed:
        engine.final_catch_up(plan, timeout=600.0)
    assert not isinstance(failed.value, MoveNotReadyError)  # not the timeout
    # Control: with the clash gone, the same wait ends with the marker, and both sides agree.
    with psycopg.connect(libpq(empty_silo.side.owner_dsn)) as conn:
        conn.execute("DELETE FROM projects WHERE tenant_id = %s AND id = %s", (a.id, clash))
    engine.final_catch_up(plan, timeout=120.0)
    engine.verify(plan)
    assert str(clash) in rows_of(empty_silo.side.owner_dsn, a.id)["projects"]
    _abort_leaves_the_source_authoritative(world, plan, a.id)
    assert rows_of(world.endpoints.pool_url, a.id)["projects"] >= {str(a.project_id), str(clash)}


def test_a_slot_about_to_be_invalidated_is_warned_about_while_it_can_still_be_kept(
    world: World, empty_silo: Silo, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``unreserved``: past max_slot_wal_keep_size, its WAL goes at the next checkpoint. Said once, and the hint works."""
    monkeypatch.setattr(engine, "_AT_RISK_WARNED", {})
    a = world["A"]
    plan = _replicating(world, empty_silo)
    engine.catch_up_gate(plan, backoff=())
    with structlog.testing.capture_logs() as logs:
        assert engine.replication_lag(plan) is not None
    assert not [line for line in logs if line["event"] == "replication_slot_at_risk"]  # control: a safe slot
    _subscription(empty_silo, plan, enabled=False)
    deadline = time.monotonic() + 30
    while _slot_status(plan) != ("reserved", False) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert world.endpoints.pool_admin_url is not None
    with slot_keep_size(world.endpoints.pool_admin_url, "1MB"):
        push_slot_past_its_keep_size(plan.source.admin(), plan.name)
        with structlog.testing.capture_logs() as logs:
            engine.replication_lag(plan)
            engine.replication_lag(plan)  # read again at once: not a second line
        warnings = [line for line in logs if line["event"] == "replication_slot_at_risk"]
        assert len(warnings) == 1, logs
        assert warnings[0]["log_level"] == "warning" and warnings[0]["slot"] == plan.name
        assert "max_slot_wal_keep_size" in warnings[0]["hint"]
    # The setting raised again (reset: no limit) before a checkpoint: the checkpoint keeps the slot's WAL.
    with psycopg.connect(libpq(plan.source.admin()), autocommit=True) as src:
        src.execute("CHECKPOINT")
    assert _slot_status(plan) not in (("lost", False), ("unreserved", False))
    _subscription(empty_silo, plan, enabled=True)
    engine.catch_up_gate(plan, backoff=())
    engine.fence_source(plan)
    engine.final_catch_up(plan, timeout=60.0)
    engine.verify(plan)
    _abort_leaves_the_source_authoritative(world, plan, a.id)


def test_a_slot_lost_after_the_catch_up_gate_ends_the_final_catch_up_not_its_timeout(
    world: World, empty_silo: Silo
) -> None:
    """The slot invalidated between the gate and the fence: the marker can never arrive, and the wait says why."""
    a = world["A"]
    plan = _replicating(world, empty_silo)
    engine.catch_up_gate(plan, backoff=())
    _lose_the_slot(world, empty_silo, plan)
    # The worker restarts and fails at START_REPLICATION, before any change: no apply error to see.
    _subscription(empty_silo, plan, enabled=True)
    engine.fence_source(plan)
    started = time.monotonic()
    with (
        psycopg.connect(libpq(plan.source.owner()), autocommit=True) as source,
        pytest.raises(MoveError, match="invalidated replication slot") as lost,
    ):
        engine.final_catch_up(plan, timeout=60.0, source=source)
    assert not isinstance(lost.value, MoveNotReadyError)  # not the timeout
    assert time.monotonic() - started < 30
    _abort_leaves_the_source_authoritative(world, plan, a.id)
    # Control: the move started again copies afresh, and its final catch-up ends with the marker.
    plan = _replicating(world, empty_silo)
    engine.catch_up_gate(plan, backoff=())
    engine.fence_source(plan)
    assert engine.final_catch_up(plan, timeout=60.0) < 60.0
    engine.verify(plan)
    _abort_leaves_the_source_authoritative(world, plan, a.id)
