"""``tenantctl migrate`` through the CLI: exit codes, one JSON document, a silo that comes back."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool
from typer.testing import CliRunner

from control_plane import interlock
from control_plane.cli import app
from control_plane.interlock import mark_tenant_moving
from data_plane.dsn import libpq, sync_url
from tests.fleet.conftest import BASE, REV2, Fleet, revision_of, set_allow_connections


@pytest.fixture
def cli(fleet: Fleet, tmp_path: Path, scripts: str) -> Any:
    runner = CliRunner()
    env = {
        "TENANTCTL_CATALOG_URL": fleet.catalog,
        "TENANTCTL_POOL_URL": fleet.pool,
        "TENANTCTL_SILO_SERVER_URL": fleet.servers.silo_admin,
        "TENANTCTL_STATE_DIR": str(tmp_path / "state"),
    }

    def invoke(*args: str) -> tuple[int, Any, str]:
        result = runner.invoke(app, ["migrate", *args, "--script-location", scripts], env=env)
        document = json.loads(result.stdout) if "--json" in args else None  # exactly one document
        return result.exit_code, document, result.stdout + result.stderr

    return invoke


def test_unreachable_silo_fails_alone_and_a_rerun_heals(fleet: Fleet, cli: Any) -> None:
    silos = fleet.add_silos(20)
    down = silos[5]
    set_allow_connections(fleet.servers.silo_admin, down.database, False)
    try:
        code, doc, _ = cli("upgrade", "--json", "--concurrency", "4")
        assert code == 1
        by_target = {t["target"]: t for t in doc["targets"]}
        assert by_target[down.location]["status"] == "failed"
        assert "unreachable" in by_target[down.location]["error"]
        assert doc["summary"] == {"succeeded": 20, "failed": 1, "skipped-up-to-date": 0, "not-run": 0}
        assert all(revision_of(s.dsn) == REV2 for s in silos if s is not down)

        code, doc, _ = cli("status", "--json")
        assert code == 1
        assert {t["target"]: t["drift"] for t in doc["targets"]}[down.location] == "unreachable"
    finally:
        set_allow_connections(fleet.servers.silo_admin, down.database, True)

    code, doc, _ = cli("upgrade", "--json")
    assert code == 0, doc
    assert doc["summary"] == {"succeeded": 1, "failed": 0, "skipped-up-to-date": 20, "not-run": 0}
    assert revision_of(down.dsn) == REV2

    code, doc, _ = cli("status", "--json")
    assert code == 0
    assert doc["summary"]["at-head"] == 21 and doc["head"] == REV2


def test_cli_targets_relative_downgrade_and_human_output(fleet: Fleet, cli: Any) -> None:
    silos = fleet.add_silos(2)
    code, doc, _ = cli("status", "--json")
    assert code == 3  # drift: everything is behind the test head
    assert doc["summary"]["behind"] == 3

    code, doc, _ = cli("upgrade", "head", "--target", silos[1].slug, "--json")
    assert code == 0
    assert [t["target"] for t in doc["targets"]] == [silos[1].location]
    assert revision_of(silos[1].dsn) == REV2 and revision_of(silos[0].dsn) == BASE

    code, _, output = cli("upgrade", "--target", "pool")
    assert code == 0
    assert "pool" in output and "succeeded" in output and f"{BASE} → {REV2}" in output

    code, doc, _ = cli("downgrade", "-1", "--target", silos[1].slug, "--json")
    assert code == 0
    assert [(t["from_revision"], t["to_revision"]) for t in doc["targets"]] == [(REV2, BASE)]
    assert revision_of(silos[1].dsn) == BASE

    code, doc, _ = cli("upgrade", "--json", "--canary", "1", "--concurrency", "2")
    assert code == 0
    assert doc["summary"] == {"succeeded": 2, "failed": 0, "skipped-up-to-date": 1, "not-run": 0}

    code, _, output = cli("upgrade", "no_such_rev")
    assert code == 1 and "unknown revision" in output
    code, _, output = cli("upgrade", "--target", "no-such-tenant")
    assert code == 1 and "no tenant with slug" in output


def test_json_refusals_still_print_one_document_and_exit_non_zero(fleet: Fleet, cli: Any) -> None:
    from control_plane.interlock import fleet_migration_lock

    fleet.add_silos(1)
    with fleet_migration_lock(fleet.catalog):  # another runner holds the interlock
        code, doc, output = cli("upgrade", "--json", "--lock-timeout", "0")
    assert code == 1
    assert doc["error"]["code"] == "locked" and "interlock" in doc["error"]["message"]
    assert "Traceback" not in output

    code, doc, _ = cli("upgrade", "no_such_rev", "--json")
    assert code == 1 and "unknown revision" in doc["error"]["message"]
    code, doc, _ = cli("status", "--target", "no-such-tenant", "--json")
    assert code == 1 and doc["error"]["code"] == "not_found"

    # Control: nothing was touched by the refusals, and a real run still works.
    assert revision_of(fleet.pool) == BASE
    code, doc, _ = cli("upgrade", "--json")
    assert code == 0 and doc["summary"]["succeeded"] == 2


def test_an_unreachable_catalog_is_a_clear_error_not_a_traceback(fleet: Fleet, scripts: str, tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        "TENANTCTL_CATALOG_URL": f"postgresql://nobody@127.0.0.1:{port}/catalog",
        "TENANTCTL_POOL_URL": fleet.pool,
        "TENANTCTL_SILO_SERVER_URL": fleet.servers.silo_admin,
        "TENANTCTL_STATE_DIR": str(tmp_path / "state"),
    }
    for command in (["upgrade"], ["status"]):
        result = CliRunner().invoke(app, ["migrate", *command, "--json", "--script-location", scripts], env=env)
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit)  # handled, no traceback
        document = json.loads(result.stdout)
        assert document["error"]["code"] == "database_unavailable"
        assert "catalog database error" in document["error"]["message"]
        assert "catalog database error" in result.stderr


def test_a_run_stopped_by_a_move_is_not_ok_exits_1_and_sets_the_failed_metric(
    fleet: Fleet, scripts: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that lost its interlock to a move migrated only the pool: scripts and alerts must see a failure."""
    silos = fleet.add_silos(3)
    checks = {"n": 0}
    original = interlock.FleetLock.lost

    def failover_then_a_move(self: interlock.FleetLock) -> str | None:
        checks["n"] += 1
        if checks["n"] == 2:  # the pool is done, no silo started: the session drops, a move marks its tenant
            with psycopg.connect(libpq(fleet.catalog), autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(%s, 5000)", (self.conn.info.backend_pid,))
                row = conn.execute("SELECT id FROM tenants WHERE slug = %s", (silos[0].slug,)).fetchone()
            assert row is not None
            engine = create_engine(sync_url(fleet.catalog), poolclass=NullPool)
            with engine.begin() as conn_:
                mark_tenant_moving(conn_, uuid.UUID(str(row[0])))
            engine.dispose()
        return original(self)

    monkeypatch.setattr(interlock.FleetLock, "lost", failover_then_a_move)
    metrics = tmp_path / "tenantctl.prom"
    env = {
        "TENANTCTL_CATALOG_URL": fleet.catalog,
        "TENANTCTL_POOL_URL": fleet.pool,
        "TENANTCTL_SILO_SERVER_URL": fleet.servers.silo_admin,
        "TENANTCTL_STATE_DIR": str(tmp_path / "state"),
        "TENANTCTL_METRICS_TEXTFILE": str(metrics),
    }
    args = ["migrate", "upgrade", "--json", "--concurrency", "1", "--script-location", scripts]
    result = CliRunner().invoke(app, args, env=env)

    doc = json.loads(result.stdout)
    assert revision_of(fleet.pool) == REV2 and all(revision_of(s.dsn) == BASE for s in silos)
    assert doc["summary"] == {"succeeded": 1, "failed": 0, "skipped-up-to-date": 0, "not-run": 3}
    assert "interlock was lost" in doc["stopped_reason"]
    assert doc["ok"] is False
    assert result.exit_code == 1
    assert "tenantctl_fleet_migration_failed 1.0" in metrics.read_text()
