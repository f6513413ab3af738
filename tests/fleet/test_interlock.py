"""Fleet migrations and moves exclude each other through one catalog lock (DESIGN §4)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from control_plane.exceptions import IllegalTransitionError, MigrationInProgressError, OperationLockedError
from control_plane.fleet import FleetOptions, FleetReport, TargetStatus, migrate_new_silo, run_fleet
from control_plane.fleet.models import TargetResult
from control_plane.interlock import (
    fleet_migration_excluded,
    fleet_migration_lock,
    mark_tenant_moving,
    mark_tenant_moving_async,
)
from data_plane.dsn import async_url, libpq, sync_url
from tests.fleet.conftest import BASE, REV2, Fleet, make_scripts, revision_of


@pytest.fixture
def catalog_engine(fleet: Fleet) -> Iterator[Engine]:
    engine = create_engine(sync_url(fleet.catalog), poolclass=NullPool)
    yield engine
    engine.dispose()


def _tenant_id(fleet: Fleet, slug: str) -> uuid.UUID:
    with psycopg.connect(libpq(fleet.catalog)) as conn:
        row = conn.execute("SELECT id FROM tenants WHERE slug = %s", (slug,)).fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def _status(fleet: Fleet, slug: str) -> str:
    with psycopg.connect(libpq(fleet.catalog)) as conn:
        row = conn.execute("SELECT status FROM tenants WHERE slug = %s", (slug,)).fetchone()
    assert row is not None
    return str(row[0])


def test_runner_refuses_while_a_tenant_is_moving(fleet: Fleet, catalog_engine: Engine, scripts: str) -> None:
    silos = fleet.add_silos(2)
    with catalog_engine.begin() as conn:
        mark_tenant_moving(conn, _tenant_id(fleet, silos[1].slug))
    assert _status(fleet, silos[1].slug) == "moving"

    with pytest.raises(OperationLockedError) as refused:
        run_fleet(fleet.catalog, fleet.pool, FleetOptions(script_location=scripts))
    assert silos[1].slug in refused.value.message and "being moved" in refused.value.message
    assert revision_of(fleet.pool) == BASE  # nothing was touched
    # Refusing released the lock: a move can still be marked.
    with catalog_engine.begin() as conn:
        mark_tenant_moving(conn, _tenant_id(fleet, silos[0].slug))


def test_move_refuses_while_a_fleet_migration_runs(fleet: Fleet, catalog_engine: Engine) -> None:
    silos = fleet.add_silos(1)
    tenant = _tenant_id(fleet, silos[0].slug)
    with fleet_migration_lock(fleet.catalog):
        with pytest.raises(OperationLockedError, match="a fleet migration is running"), catalog_engine.begin() as conn:
            mark_tenant_moving(conn, tenant)
        assert _status(fleet, silos[0].slug) == "active"
    with catalog_engine.begin() as conn:  # released with the runner's context
        mark_tenant_moving(conn, tenant)
    assert _status(fleet, silos[0].slug) == "moving"
    with pytest.raises(IllegalTransitionError), catalog_engine.begin() as conn:
        mark_tenant_moving(conn, tenant)  # already moving


def test_runner_waits_for_an_uncommitted_mark_then_sees_it(fleet: Fleet, catalog_engine: Engine) -> None:
    silos = fleet.add_silos(1)
    with catalog_engine.connect() as move:
        tx = move.begin()
        mark_tenant_moving(move, _tenant_id(fleet, silos[0].slug))
        # The move's transaction holds the shared lock: the runner cannot get in ...
        with (
            pytest.raises(OperationLockedError, match="a move"),
            fleet_migration_lock(fleet.catalog, timeout_s=0.3),
        ):
            pass
        tx.commit()
    # ... and once it committed, the runner sees the moving tenant and refuses.
    with (
        pytest.raises(OperationLockedError, match=silos[0].slug),
        fleet_migration_lock(fleet.catalog, timeout_s=0.3),
    ):
        pass


async def test_async_mark_moving(fleet: Fleet) -> None:
    silos = fleet.add_silos(1)
    tenant = _tenant_id(fleet, silos[0].slug)
    engine = create_async_engine(async_url(fleet.catalog), poolclass=NullPool)
    try:
        with fleet_migration_lock(fleet.catalog), pytest.raises(OperationLockedError):
            async with engine.begin() as conn:
                await mark_tenant_moving_async(conn, tenant)
        async with engine.begin() as conn:
            await mark_tenant_moving_async(conn, tenant)
            status = (await conn.execute(text("SELECT status FROM tenants WHERE id = :i"), {"i": tenant})).scalar()
        assert status == "moving"
    finally:
        await engine.dispose()


def test_a_silo_still_onboarding_is_migrated_by_a_fleet_run(fleet: Fleet, scripts: str) -> None:
    """An onboarding between its migrate and activate steps: the fleet must not skip its silo.

    Otherwise the pool moves on, the silo turns ready on the old revision and no
    later run ever looks at it (issue 7 item 7).
    """
    ready, onboarding, failed_move = fleet.add_silos(3)
    with psycopg.connect(libpq(fleet.catalog), autocommit=True) as cat:
        # What onboarding's record_location leaves: a provisioning location owned by a
        # provisioning tenant that does not point at it yet (activate sets location_id).
        cat.execute(
            "UPDATE locations SET status = 'provisioning', tenant_id = t.id FROM tenants t "
            "WHERE t.slug = %s AND locations.id = t.location_id",
            (onboarding.slug,),
        )
        cat.execute(
            "UPDATE tenants SET status = 'provisioning', location_id = NULL WHERE slug = %s", (onboarding.slug,)
        )
        # Control: a provisioning location whose tenant is active (a move's leftover) stays out.
        cat.execute(
            "UPDATE locations SET status = 'provisioning', tenant_id = t.id FROM tenants t "
            "WHERE t.slug = %s AND locations.id = t.location_id",
            (failed_move.slug,),
        )
        cat.execute("UPDATE tenants SET location_id = NULL WHERE slug = %s", (failed_move.slug,))

    report = run_fleet(fleet.catalog, fleet.pool, FleetOptions(script_location=scripts))
    by_target = {r.target: r for r in report.results}
    assert set(by_target) == {"pool", ready.location, onboarding.location}
    assert by_target[onboarding.location].tenant == onboarding.slug
    assert revision_of(onboarding.dsn) == REV2
    assert revision_of(ready.dsn) == REV2
    assert revision_of(failed_move.dsn) == BASE


def _interlock_holder(fleet: Fleet) -> int | None:
    """The pid holding the interlock exclusively (a runner's catalog session), if any."""
    with psycopg.connect(libpq(fleet.catalog), autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock'"
            " AND classid = 7302 AND objid = 1 AND objsubid = 2"
            " AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    return None if row is None else int(row[0])


class _DropTheInterlockAfterThePool:
    """Progress that cuts the runner's catalog session once the pool is done (a catalog failover)."""

    def __init__(self, fleet: Fleet, *, then: Callable[[], None] = lambda: None) -> None:
        self.fleet, self.then = fleet, then
        self.dropped: int | None = None
        self.holders_later: list[int | None] = []

    def planned(self, total: int, to_migrate: int) -> None:
        pass

    def finished(self, result: TargetResult) -> None:
        if result.target != "pool":
            self.holders_later.append(_interlock_holder(self.fleet))
            return
        self.dropped = _interlock_holder(self.fleet)
        assert self.dropped is not None, "the runner holds the interlock"
        with psycopg.connect(libpq(self.fleet.catalog), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (self.dropped,))
        deadline = time.monotonic() + 10
        while _interlock_holder(self.fleet) is not None:  # the server has ended the session
            assert time.monotonic() < deadline
            time.sleep(0.01)
        self.then()


def test_a_runner_whose_interlock_session_drops_takes_it_back_and_goes_on(fleet: Fleet, scripts: str) -> None:
    silos = fleet.add_silos(3)
    progress = _DropTheInterlockAfterThePool(fleet)

    report = run_fleet(
        fleet.catalog, fleet.pool, FleetOptions(concurrency=1, script_location=scripts), progress=progress
    )

    assert not report.failed, report.to_json()
    assert all(revision_of(s.dsn) == REV2 for s in silos)
    # Every silo ran under the interlock again, held by a new session.
    assert len(progress.holders_later) == 3
    assert all(pid is not None and pid != progress.dropped for pid in progress.holders_later)
    assert _interlock_holder(fleet) is None  # released at the end


def test_a_runner_that_lost_its_interlock_to_a_move_starts_no_more_targets(
    fleet: Fleet, catalog_engine: Engine, scripts: str
) -> None:
    silos = fleet.add_silos(3)

    def a_move_starts() -> None:
        # The interlock is free: a move can mark its tenant (nothing else stops it).
        with catalog_engine.begin() as conn:
            mark_tenant_moving(conn, _tenant_id(fleet, silos[2].slug))

    progress = _DropTheInterlockAfterThePool(fleet, then=a_move_starts)
    report = run_fleet(
        fleet.catalog, fleet.pool, FleetOptions(concurrency=1, script_location=scripts), progress=progress
    )

    assert revision_of(fleet.pool) == REV2  # in flight when the session dropped: it finished
    assert all(revision_of(s.dsn) == BASE for s in silos)
    by_target = {r.target: r for r in report.results}
    assert by_target["pool"].status is TargetStatus.SUCCEEDED
    assert len(by_target) == 4
    assert {r.status for name, r in by_target.items() if name != "pool"} == {TargetStatus.NOT_RUN}
    assert report.stopped_reason is not None
    assert "interlock was lost" in report.stopped_reason and silos[2].slug in report.stopped_reason
    # Only the pool was migrated: the run is a failure (ok false, exit 1), not a success.
    assert report.failed and report.to_json()["ok"] is False
    assert progress.holders_later == [None, None, None]
    # The runner let go: its check did not keep the lock from the move's side.
    assert _interlock_holder(fleet) is None
    assert _status(fleet, silos[2].slug) == "moving"


def test_a_block_whose_shared_interlock_session_drops_fails_for_a_retry(fleet: Fleet) -> None:
    with fleet_migration_excluded(fleet.catalog):  # control: undisturbed, it passes
        pass
    with pytest.raises(MigrationInProgressError, match="session ended"), fleet_migration_excluded(fleet.catalog):
        with psycopg.connect(libpq(fleet.catalog), autocommit=True) as conn:
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid, 5000) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                " AND mode = 'ShareLock' AND classid = 7302 AND objid = 1 AND objsubid = 2"
            ).fetchall()
        assert killed == [(True,)]
    # Nothing left held: a fleet run can take the interlock.
    with fleet_migration_lock(fleet.catalog, timeout_s=0):
        pass


def test_a_silo_onboarded_while_the_runners_session_was_down_is_reported_and_fails_the_run(
    fleet: Fleet, tmp_path: Path
) -> None:
    """Such a silo lands on the pool's old revision; a run that took its lock back once said ok without it."""
    silos = fleet.add_silos(2)
    slow = make_scripts(tmp_path, sleep_s=3.0)
    reports: list[FleetReport] = []
    runner = threading.Thread(
        target=lambda: reports.append(
            run_fleet(fleet.catalog, fleet.pool, FleetOptions(concurrency=4, script_location=slow))
        )
    )
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while not _pool_migration_in_flight(fleet):
            assert time.monotonic() < deadline, "the pool's migration should start"
            time.sleep(0.05)
        holder = _interlock_holder(fleet)
        assert holder is not None
        with psycopg.connect(libpq(fleet.catalog), autocommit=True) as conn:  # a catalog failover
            conn.execute("SELECT pg_terminate_backend(%s, 5000)", (holder,))
        # An onboarding's migrate step runs in the gap: the pool's new revision is not committed yet.
        new = fleet.add_silos(1)[0]
        assert (
            migrate_new_silo(new.dsn, fleet.pool, catalog_dsn=fleet.catalog, script_location=slow).to_revision == BASE
        )
    finally:
        runner.join(60)
    (report,) = reports

    assert revision_of(fleet.pool) == REV2 and revision_of(new.dsn) == BASE
    by_target = {r.target: r for r in report.results}
    assert by_target[new.location].status is TargetStatus.NOT_RUN
    assert {by_target[s.location].status for s in silos} == {TargetStatus.NOT_RUN}
    assert report.failed and report.stopped_reason is not None and new.location in report.stopped_reason
    assert _interlock_holder(fleet) is None


def _pool_migration_in_flight(fleet: Fleet) -> bool:
    with psycopg.connect(libpq(fleet.pool), autocommit=True) as conn:
        row = conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'tenantctl migrate' AND query LIKE '%%pg_sleep%%'"
        ).fetchone()
    return row is not None
