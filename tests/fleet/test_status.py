"""Drift detection: one query per database, each kind of drift reported."""

from __future__ import annotations

import psycopg

from control_plane.fleet import Drift, FleetOptions, Target, migrate_targets, status_of
from control_plane.fleet.targets import load_targets
from data_plane.dsn import libpq, with_database
from tests.fleet.conftest import AHEAD, REV2, Fleet
from tests.harness import fresh_database, owner_dsn


def _set_version(dsn: str, revision: str) -> None:
    with psycopg.connect(libpq(dsn)) as conn:
        conn.execute("UPDATE alembic_version SET version_num = %s", (revision,))


def test_status_reports_every_kind_of_drift(fleet: Fleet, scripts: str) -> None:
    servers = fleet.servers
    silos = fleet.add_silos(4)
    targets = load_targets(fleet.catalog, fleet.pool)
    migrate_targets(targets[:2], FleetOptions(script_location=scripts))  # pool and silo-000 → head
    _set_version(silos[2].dsn, AHEAD)  # written by newer code
    _set_version(silos[3].dsn, "feature_x")  # unknown to this code, not ahead by convention
    with fresh_database(servers.silo_admin, servers.roles, template=None, prefix="t_unversioned") as db:
        extra = [
            Target("unversioned", "silo", owner_dsn(servers.silo_admin, db, servers.roles)),
            Target("gone", "silo", with_database(silos[0].dsn, "t_no_such_database")),
        ]
        report = status_of([*targets, *extra], script_location=scripts)

    drift = {s.target: s.drift for s in report.states}
    assert drift == {
        "pool": Drift.AT_HEAD,
        silos[0].location: Drift.AT_HEAD,
        silos[1].location: Drift.BEHIND,
        silos[2].location: Drift.AHEAD,
        silos[3].location: Drift.UNKNOWN,
        "unversioned": Drift.UNVERSIONED,
        "gone": Drift.UNREACHABLE,
    }
    states = {s.target: s for s in report.states}
    assert states[silos[1].location].behind_by == 1
    assert states["pool"].revision == REV2
    assert states[silos[1].location].tenant == silos[1].slug
    assert "t_no_such_database" in (states["gone"].error or "")
    assert report.exit_code == 1  # unreachable wins over drift
    assert report.counts()["at-head"] == 2

    # The runner refuses to touch a database at a revision it does not know.
    result = migrate_targets(targets[3:], FleetOptions(script_location=scripts)).results
    assert [r.status.value for r in result] == ["failed", "failed"]
    assert all("unknown to this code" in (r.error or "") for r in result)


def test_status_of_200_databases_is_one_query_each_and_fast(fleet: Fleet) -> None:
    # The same database 200 times: what is measured is the per-target round trip.
    targets = [Target(f"t{i}", "silo", fleet.pool) for i in range(200)]
    report = status_of(targets)
    assert {s.drift for s in report.states} == {Drift.AT_HEAD}
    assert report.duration_s < 5
