"""``tenantctl doctor`` finds each class of RLS/role mistake, and only those."""

from __future__ import annotations

import json
from collections.abc import Iterator

import psycopg
import pytest
from typer.testing import CliRunner

from control_plane.cli import app
from control_plane.doctor import audit_database, run_doctor
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.dsn import database_of, libpq, with_database
from tests.harness import PgServers


def _checks(endpoints: Endpoints) -> set[tuple[str, str]]:
    report = audit_database(name="pool", kind="pool", dsn=endpoints.pool_url, app_role="tenantctl_app")
    return {(f.check, f.object) for f in report.findings}


def test_a_freshly_migrated_pool_is_clean(endpoints: Endpoints) -> None:
    report = run_doctor(catalog_dsn=endpoints.catalog_url, pool_dsn=endpoints.pool_url, app_role="tenantctl_app")
    assert report["ok"], report
    assert set(report["targets"][0]["tenant_tables"]) == {"public.projects", "public.tasks"}


@pytest.mark.parametrize(
    ("ddl", "expected"),
    [
        (
            "CREATE TABLE leaky (tenant_id uuid NOT NULL, id uuid, PRIMARY KEY (tenant_id, id))",
            {("rls_forced", "public.leaky"), ("policy_coverage", "public.leaky")},
        ),
        ("ALTER TABLE projects NO FORCE ROW LEVEL SECURITY", {("rls_forced", "public.projects")}),
        ("GRANT TRUNCATE ON projects TO tenantctl_app", {("grant", "public.projects")}),
        ("GRANT SELECT ON tasks TO PUBLIC", {("grant", "public.tasks")}),
        ("CREATE UNIQUE INDEX uq_projects_name ON projects (name)", {("unique_oracle", "uq_projects_name")}),
        (
            "DROP POLICY tenant_isolation ON tasks; CREATE POLICY slow ON tasks USING "
            "(tenant_id::text = current_setting('app.current_tenant_id') OR false)",
            {("policy_form", "public.tasks")},
        ),
        ("CREATE VIEW all_projects AS SELECT * FROM projects", {("view", "all_projects")}),
        ("CREATE MATERIALIZED VIEW mv AS SELECT * FROM projects", {("view", "mv")}),
    ],
)
def test_each_mistake_is_reported(endpoints: Endpoints, ddl: str, expected: set[tuple[str, str]]) -> None:
    with psycopg.connect(libpq(endpoints.pool_url)) as conn:
        conn.execute(ddl)
    assert expected <= _checks(endpoints)


def test_app_role_posture_is_checked(endpoints: Endpoints, pg_servers: PgServers) -> None:
    admin = with_database(pg_servers.main_admin, database_of(endpoints.pool_url))
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        conn.execute("CREATE TABLE owned_by_app (x int)")
        conn.execute("ALTER TABLE owned_by_app OWNER TO tenantctl_app")
    try:
        assert ("app_owns", "relation owned_by_app") in _checks(endpoints)
    finally:
        with psycopg.connect(libpq(admin), autocommit=True) as conn:
            conn.execute("DROP TABLE owned_by_app")
    assert _checks(endpoints) == set()  # control


@pytest.fixture
def cli_env(cp_settings: ControlPlaneSettings, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TENANTCTL_CATALOG_URL", cp_settings.catalog_url or "")
    monkeypatch.setenv("TENANTCTL_POOL_URL", cp_settings.pool_url or "")
    monkeypatch.setenv("TENANTCTL_SILO_SERVER_URL", cp_settings.silo_server_url or "")
    yield


def test_cli_exit_code_and_json(endpoints: Endpoints, cli_env: None) -> None:
    runner = CliRunner()
    clean = runner.invoke(app, ["doctor", "--json"])
    assert clean.exit_code == 0, clean.output
    assert json.loads(clean.stdout)["ok"] is True
    with psycopg.connect(libpq(endpoints.pool_url)) as conn:
        conn.execute("ALTER TABLE tasks DISABLE ROW LEVEL SECURITY")
    dirty = runner.invoke(app, ["doctor"])
    assert dirty.exit_code == 1
    assert "rls_forced" in dirty.stdout and "public.tasks" in dirty.stdout
