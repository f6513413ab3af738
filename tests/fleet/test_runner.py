"""The fleet runner on real PostgreSQL: pool + silos, order, failure semantics, locks."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import psycopg
import pytest

from control_plane.exceptions import MigrationFailedError, OperationLockedError
from control_plane.fleet import (
    FleetOptions,
    TargetStatus,
    migrate_new_silo,
    migrate_target_to,
    pool_revision,
    run_fleet,
)
from control_plane.fleet.models import TargetResult
from control_plane.interlock import (
    INTERLOCK_NAMESPACE,
    TARGET_MIGRATION_KEY,
    fleet_migration_excluded,
    fleet_migration_lock,
)
from data_plane.dsn import libpq
from tests.fleet.conftest import BASE, REV2, REV3, Fleet, has_column, make_scripts, revision_of
from tests.harness import fresh_database, owner_dsn


def _statuses(report_results: list[object]) -> dict[str, str]:
    return {r.target: r.status.value for r in report_results}  # type: ignore[attr-defined]


def test_upgrade_and_downgrade_pool_and_20_silos(fleet: Fleet, scripts: str) -> None:
    fleet.add_silos(20)
    opts = FleetOptions(revision="head", concurrency=4, script_location=scripts)

    report = run_fleet(fleet.catalog, fleet.pool, opts)

    assert not report.failed, report.to_json()
    assert report.results[0].target == "pool"
    assert len(report.results) == 21
    assert {r.status for r in report.results} == {TargetStatus.SUCCEEDED}
    assert all(r.from_revision == BASE and r.to_revision == REV2 for r in report.results)
    assert revision_of(fleet.pool) == REV2
    assert all(revision_of(s.dsn) == REV2 for s in fleet.silos)
    assert has_column(fleet.silos[7].dsn, "projects", "fleet_note")

    # A re-run skips everything from one version query per database: no worker process at all.
    again = run_fleet(fleet.catalog, fleet.pool, opts)
    assert {r.status for r in again.results} == {TargetStatus.SKIPPED}
    assert again.workers == 0 and not again.failed

    down = run_fleet(
        fleet.catalog, fleet.pool, FleetOptions(action="downgrade", revision="-1", script_location=scripts)
    )
    assert {r.status for r in down.results} == {TargetStatus.SUCCEEDED}, down.to_json()
    assert all(revision_of(s.dsn) == BASE for s in fleet.silos)
    assert revision_of(fleet.pool) == BASE
    assert not has_column(fleet.silos[7].dsn, "projects", "fleet_note")


def test_silos_migrate_in_parallel_up_to_the_concurrency(fleet: Fleet, tmp_path: Path) -> None:
    fleet.add_silos(4)
    slow = make_scripts(tmp_path, sleep_s=1.0)  # every target holds its migration for 1 s
    started = time.monotonic()
    report = run_fleet(fleet.catalog, fleet.pool, FleetOptions(concurrency=4, script_location=slow))
    elapsed = time.monotonic() - started
    assert not report.failed and report.workers == 4
    # Pool alone (1 s), then the 4 silos side by side (1 s); one at a time would take 5 s.
    assert elapsed < 4.0, elapsed


def test_migration_failing_halfway_leaves_that_silo_unchanged(fleet: Fleet, failing_scripts: str) -> None:
    silos = fleet.add_silos(5, failing={2})
    report = run_fleet(fleet.catalog, fleet.pool, FleetOptions(concurrency=3, script_location=failing_scripts))

    assert report.failed
    by_name = {r.target: r for r in report.results}
    failed = by_name[silos[2].location]
    assert failed.status is TargetStatus.FAILED
    assert "boom halfway" in (failed.error or "")
    assert failed.from_revision == BASE and failed.to_revision == BASE
    # One transaction for the whole run: not even REV2 stayed, nor the half-made table.
    assert revision_of(silos[2].dsn) == BASE
    assert not has_column(silos[2].dsn, "projects", "fleet_note")
    with psycopg.connect(libpq(silos[2].dsn)) as conn:
        assert conn.execute("SELECT to_regclass('public.fleet_half')").fetchone() == (None,)
    # ... and a failure in one silo does not stop the others.
    for i, silo in enumerate(silos):
        if i != 2:
            assert by_name[silo.location].status is TargetStatus.SUCCEEDED
            assert revision_of(silo.dsn) == REV3


def test_canary_failure_stops_the_wave(fleet: Fleet, failing_scripts: str) -> None:
    silos = fleet.add_silos(6, failing={0})  # silo-000 sorts first: it is in the canary wave
    report = run_fleet(
        fleet.catalog, fleet.pool, FleetOptions(concurrency=2, canary=2, script_location=failing_scripts)
    )

    statuses = _statuses(report.results)
    assert statuses["pool"] == "succeeded"
    assert statuses[silos[0].location] == "failed"
    assert statuses[silos[1].location] == "succeeded"
    assert [statuses[s.location] for s in silos[2:]] == ["not-run"] * 4
    assert all(revision_of(s.dsn) == BASE for s in silos[2:])
    assert report.stopped_reason is not None and "canary" in report.stopped_reason


def test_a_killed_worker_fails_its_silo_and_the_run_goes_on_with_fresh_workers(fleet: Fleet, tmp_path: Path) -> None:
    """An OOM-killed worker once aborted the run with a BrokenProcessPool traceback and no report."""
    silos = fleet.add_silos(4, failing={1})  # silo-001's worker is SIGKILLed mid-migration
    killing = make_scripts(tmp_path, killing=True)

    report = run_fleet(fleet.catalog, fleet.pool, FleetOptions(concurrency=1, script_location=killing))

    by_target = {r.target: r for r in report.results}
    assert len(by_target) == 5
    dead = by_target[silos[1].location]
    assert dead.status is TargetStatus.FAILED and dead.error is not None and "worker process died" in dead.error
    assert revision_of(silos[1].dsn) == BASE  # its one transaction rolled back
    # The silos after it ran in a fresh pool of workers.
    assert [by_target[s.location].status for s in silos if s is not silos[1]] == [TargetStatus.SUCCEEDED] * 3
    assert all(revision_of(s.dsn) == REV3 for s in silos if s is not silos[1])
    assert report.failed and report.stopped_reason is None
    with fleet_migration_lock(fleet.catalog, timeout_s=0):  # released
        pass


def test_a_killed_worker_in_the_canary_wave_stops_the_run_with_a_report(fleet: Fleet, tmp_path: Path) -> None:
    silos = fleet.add_silos(4, failing={0})
    killing = make_scripts(tmp_path, killing=True)

    report = run_fleet(fleet.catalog, fleet.pool, FleetOptions(concurrency=2, canary=2, script_location=killing))

    statuses = _statuses(report.results)
    assert statuses["pool"] == "succeeded"
    assert statuses[silos[0].location] == "failed"
    # Beside it, silo-001 either finished first or was terminated with the broken pool: failed, never lost.
    assert statuses[silos[1].location] in {"succeeded", "failed"}
    assert [statuses[s.location] for s in silos[2:]] == ["not-run"] * 2
    assert report.stopped_reason is not None and "canary" in report.stopped_reason
    assert report.failed


def test_pool_failure_stops_everything_and_a_locked_database_is_reported(fleet: Fleet, scripts: str) -> None:
    fleet.add_silos(3)
    # Another runner "migrating" the pool: it holds the per-database migration lock.
    with psycopg.connect(libpq(fleet.pool), autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, %s)", (INTERLOCK_NAMESPACE, TARGET_MIGRATION_KEY))
        started = time.monotonic()
        report = run_fleet(fleet.catalog, fleet.pool, FleetOptions(lock_timeout_s=0.5, script_location=scripts))
        assert time.monotonic() - started < 10  # bounded wait, then refuse
    pool = report.results[0]
    assert pool.status is TargetStatus.FAILED
    assert "another tenantctl migration holds this database's migration lock" in (pool.error or "")
    assert [r.status for r in report.results[1:]] == [TargetStatus.NOT_RUN] * 3
    assert report.stopped_reason is not None and "pool" in report.stopped_reason

    healed = run_fleet(fleet.catalog, fleet.pool, FleetOptions(script_location=scripts))
    assert not healed.failed and revision_of(fleet.pool) == REV2


def test_a_second_runner_refuses_while_one_holds_the_catalog_interlock(fleet: Fleet, scripts: str) -> None:
    fleet.add_silos(2)
    with fleet_migration_lock(fleet.catalog), pytest.raises(OperationLockedError) as refused:
        run_fleet(fleet.catalog, fleet.pool, FleetOptions(lock_timeout_s=0.3, script_location=scripts))
    assert "a fleet migration" in refused.value.message
    assert all(revision_of(s.dsn) == BASE for s in fleet.silos)


def test_two_concurrent_runners_one_waits_then_finds_everything_done(fleet: Fleet, scripts: str) -> None:
    fleet.add_silos(3)
    opts = FleetOptions(concurrency=2, lock_timeout_s=60, script_location=scripts)
    reports = []
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            reports.append(run_fleet(fleet.catalog, fleet.pool, opts))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=runner) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert len(reports) == 2
    kinds = sorted({r.status.value for r in rep.results}.pop() for rep in reports)
    assert kinds == ["skipped-up-to-date", "succeeded"]
    assert max(rep.lock_waited_s for rep in reports) > 0


def test_migrate_target_to_brings_a_new_silo_to_the_pool_revision(fleet: Fleet, scripts: str) -> None:
    servers = fleet.servers
    run_fleet(fleet.catalog, fleet.pool, FleetOptions(script_location=scripts))  # pool → REV2
    with fresh_database(servers.silo_admin, servers.roles, template=None, prefix="t_new_silo") as db:
        dsn = owner_dsn(servers.silo_admin, db, servers.roles)
        assert revision_of(dsn) is None
        result = migrate_target_to(dsn, pool_revision(fleet.pool), script_location=scripts)
        assert result.status is TargetStatus.SUCCEEDED
        assert (result.from_revision, result.to_revision) == (None, REV2)
        assert revision_of(dsn) == REV2
        assert migrate_target_to(dsn, REV2, script_location=scripts).status is TargetStatus.SKIPPED
        # Never downgrades implicitly, never to a revision this code does not know.
        with pytest.raises(MigrationFailedError, match="newer"):
            migrate_target_to(dsn, BASE, script_location=scripts)
        with pytest.raises(MigrationFailedError):
            migrate_target_to(dsn, "no_such_rev", script_location=scripts)


def test_migrate_new_silo_excludes_fleet_runs(fleet: Fleet, scripts: str) -> None:
    servers = fleet.servers
    with fresh_database(servers.silo_admin, servers.roles, template=None, prefix="t_new_silo") as db:
        dsn = owner_dsn(servers.silo_admin, db, servers.roles)
        with fleet_migration_lock(fleet.catalog), pytest.raises(OperationLockedError):
            migrate_new_silo(dsn, fleet.pool, catalog_dsn=fleet.catalog, script_location=scripts)
        assert revision_of(dsn) is None
        with fleet_migration_excluded(fleet.catalog), pytest.raises(OperationLockedError):
            run_fleet(fleet.catalog, fleet.pool, FleetOptions(lock_timeout_s=0.2, script_location=scripts))
        result = migrate_new_silo(dsn, fleet.pool, catalog_dsn=fleet.catalog, script_location=scripts)
        assert result.to_revision == BASE == revision_of(fleet.pool) == revision_of(dsn)


class _CtrlCAfterTheFirstSilo:
    """Progress whose first silo result arrives with a Ctrl-C (SIGINT lands in the runner's main thread)."""

    def __init__(self) -> None:
        self.interrupted = False

    def planned(self, total: int, to_migrate: int) -> None:
        pass

    def finished(self, result: TargetResult) -> None:
        if result.target != "pool" and not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt


def test_ctrl_c_lets_running_migrations_finish_and_starts_no_more(fleet: Fleet, scripts: str) -> None:
    silos = fleet.add_silos(5)
    opts = FleetOptions(concurrency=2, canary=0, script_location=scripts)

    report = run_fleet(fleet.catalog, fleet.pool, opts, progress=_CtrlCAfterTheFirstSilo())

    assert report.interrupted
    statuses = [r.status for r in report.results if r.target != "pool"]
    done = statuses.count(TargetStatus.SUCCEEDED)
    # The interrupted one and the one beside it ran to the end; nothing started after the Ctrl-C.
    assert 1 <= done <= 2, report.to_json()
    assert statuses.count(TargetStatus.NOT_RUN) == 5 - done
    assert sum(revision_of(s.dsn) == REV2 for s in silos) == done
    assert revision_of(fleet.pool) == REV2
    with fleet_migration_lock(fleet.catalog, timeout_s=0):  # released
        pass
