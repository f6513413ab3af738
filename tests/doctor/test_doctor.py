"""``tenantctl doctor`` finds each class of RLS/role mistake, and only those."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import sql
from typer.testing import CliRunner

from control_plane import doctor
from control_plane.cli import app
from control_plane.doctor import audit_database, run_doctor
from control_plane.moves.engine import move_object_name
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.dsn import database_of, libpq, with_database
from migrations.helpers import POLICY_NAME, TENANT_PREDICATE
from tests.harness import PgServers
from tests.slots import push_slot_past_its_keep_size, slot_keep_size
from tests.world import World


def _checks(endpoints: Endpoints, app_role: str = "tenantctl_app") -> set[tuple[str, str]]:
    report = audit_database(name="pool", kind="pool", dsn=endpoints.pool_url, app_role=app_role)
    return {(f.check, f.object) for f in report.findings}


def _ddl(endpoints: Endpoints, *statements: str) -> None:
    with psycopg.connect(libpq(endpoints.pool_url)) as conn:
        for statement in statements:
            conn.execute(statement)


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


def test_silos_are_audited_too(world: World) -> None:
    endpoints = world.endpoints
    silo = world["S"]
    clean = run_doctor(catalog_dsn=endpoints.catalog_url, pool_dsn=endpoints.pool_url, app_role="tenantctl_app")
    assert clean["ok"], clean
    targets = {t["kind"]: t for t in clean["targets"]}
    assert set(targets) == {"pool", "silo"}
    assert set(targets["silo"]["tenant_tables"]) == {"public.projects", "public.tasks"}

    with psycopg.connect(libpq(silo.owner_dsn)) as conn:
        conn.execute("ALTER TABLE tasks NO FORCE ROW LEVEL SECURITY")
        conn.execute("GRANT TRUNCATE ON projects TO tenantctl_app")
    dirty = run_doctor(catalog_dsn=endpoints.catalog_url, pool_dsn=endpoints.pool_url, app_role="tenantctl_app")
    assert not dirty["ok"]
    by_kind = {t["kind"]: {(f["check"], f["object"]) for f in t["findings"]} for t in dirty["targets"]}
    assert by_kind["silo"] == {("rls_forced", "public.tasks"), ("grant", "public.projects")}
    assert by_kind["pool"] == set()  # control: the pool is untouched and still clean
    assert dirty["findings"] == 2


@pytest.fixture
def probe_roles(pg_servers: PgServers) -> Iterator[Callable[[str], str]]:
    """Creates throw-away roles (cluster-wide objects, so never the real app role) and drops them."""
    created: list[str] = []

    def make(attributes: str) -> str:
        name = f"doctor_probe_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(libpq(pg_servers.main_admin), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE {name} NOLOGIN {attributes}")
        created.append(name)
        return name

    yield make
    with psycopg.connect(libpq(pg_servers.main_admin), autocommit=True) as conn:
        for name in reversed(created):
            conn.execute(f"DROP ROLE {name}")


@pytest.mark.parametrize("attribute", ["SUPERUSER", "BYPASSRLS"])
def test_app_role_superuser_or_bypassrls_is_reported(
    endpoints: Endpoints, probe_roles: Callable[[str], str], attribute: str
) -> None:
    plain = probe_roles("NOSUPERUSER NOBYPASSRLS")
    assert _checks(endpoints, app_role=plain) == set()  # control: an ordinary role passes
    privileged = probe_roles(attribute)
    assert _checks(endpoints, app_role=privileged) == {("app_role", privileged)}


def test_membership_in_a_privileged_or_owning_role_is_reported(
    endpoints: Endpoints, pg_servers: PgServers, probe_roles: Callable[[str], str]
) -> None:
    member, harmless = probe_roles(""), probe_roles("")
    with psycopg.connect(libpq(pg_servers.main_admin), autocommit=True) as conn:
        conn.execute(f"GRANT {harmless} TO {member}")
    assert _checks(endpoints, app_role=member) == set()  # control: membership as such is fine
    bypass = probe_roles("BYPASSRLS")
    with psycopg.connect(libpq(pg_servers.main_admin), autocommit=True) as conn:
        conn.execute(f"GRANT {bypass} TO {harmless}")  # indirect: member -> harmless -> bypass
        conn.execute(f"GRANT {pg_servers.roles.owner} TO {member}")
    try:
        assert _checks(endpoints, app_role=member) == {("app_role", bypass), ("app_role", pg_servers.roles.owner)}
    finally:
        with psycopg.connect(libpq(pg_servers.main_admin), autocommit=True) as conn:
            conn.execute(f"REVOKE {pg_servers.roles.owner} FROM {member}")


def _tenant_table(name: str) -> list[str]:
    return [
        f"CREATE TABLE {name} (tenant_id uuid NOT NULL, id uuid NOT NULL, body text)",
        f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY",
        f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY",
        f"CREATE POLICY {POLICY_NAME} ON {name} USING ({TENANT_PREDICATE}) WITH CHECK ({TENANT_PREDICATE})",
    ]


def test_missing_tenant_leading_index_is_reported(endpoints: Endpoints) -> None:
    _ddl(endpoints, *_tenant_table("notes"), "CREATE INDEX notes_body_tenant ON notes (body, tenant_id)")
    assert _checks(endpoints) == {("tenant_index", "public.notes")}  # tenant_id second does not count
    _ddl(endpoints, "CREATE INDEX notes_tenant_id ON notes (tenant_id, id)")
    assert _checks(endpoints) == set()  # control: the same table with a tenant_id-leading index


def _rls(name: str) -> list[str]:
    return _tenant_table(name)[1:]


def test_a_partition_is_audited_as_a_table_of_its_own(endpoints: Endpoints) -> None:
    """Querying a partition directly skips its partitioned table's policies: each needs its own."""
    _ddl(
        endpoints,
        "CREATE TABLE events (tenant_id uuid NOT NULL, id uuid NOT NULL, PRIMARY KEY (tenant_id, id)) "
        "PARTITION BY HASH (tenant_id)",
        "CREATE TABLE events_0 PARTITION OF events FOR VALUES WITH (MODULUS 1, REMAINDER 0)",
        *_rls("events"),
    )
    assert _checks(endpoints) == {(check, "public.events_0") for check in ("rls_forced", "policy_coverage")}
    _ddl(endpoints, *_rls("events_0"))
    assert _checks(endpoints) == set()  # control: the partition with its own policy


def test_foreign_key_not_leading_with_tenant_id_is_reported(endpoints: Endpoints) -> None:
    _ddl(
        endpoints,
        "ALTER TABLE tasks ADD CONSTRAINT tasks_project_ok FOREIGN KEY (tenant_id, project_id) "
        "REFERENCES projects (tenant_id, id)",
    )
    assert _checks(endpoints) == set()  # control: a composite key leading with tenant_id
    _ddl(
        endpoints,
        "ALTER TABLE projects ADD CONSTRAINT projects_id_tenant_key UNIQUE (id, tenant_id)",
        "ALTER TABLE tasks ADD CONSTRAINT tasks_project_oracle FOREIGN KEY (project_id, tenant_id) "
        "REFERENCES projects (id, tenant_id)",
    )
    assert _checks(endpoints) == {("unique_oracle", "projects_id_tenant_key"), ("fk_oracle", "tasks_project_oracle")}


@pytest.mark.parametrize(
    "grant",
    ["GRANT REFERENCES ON projects TO tenantctl_app", "GRANT REFERENCES (id) ON projects TO tenantctl_app"],
    ids=["table", "column"],
)
def test_references_grant_is_reported(endpoints: Endpoints, grant: str) -> None:
    _ddl(
        endpoints,
        "GRANT SELECT, INSERT, UPDATE, DELETE ON projects TO tenantctl_app",
        "GRANT SELECT (id) ON projects TO tenantctl_app",
    )
    assert _checks(endpoints) == set()  # control: the grants the app needs, table and column level
    _ddl(endpoints, grant)
    assert _checks(endpoints) == {("grant", "public.projects")}


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


@contextlib.contextmanager
def _move_objects_on_the_pool(endpoints: Endpoints, name: str) -> Iterator[str]:
    """A move's slot, publication and (unconnected) subscription in the pool's database, dropped afterwards."""
    admin = endpoints.pool_admin_url
    assert admin is not None
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        conn.execute(f"CREATE PUBLICATION {name} FOR TABLE projects")
        conn.execute(
            sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (connect = false)").format(
                sql.Identifier(name), sql.Literal(libpq(endpoints.pool_url)), sql.Identifier(name)
            )
        )
    try:
        yield admin
    finally:
        _drop_move_objects(admin, name)


def _drop_move_objects(admin: str, name: str) -> None:
    """What the move's stop_replication does: subscription (detached from its slot), publication, slot."""
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_subscription WHERE subname = %s", (name,)).fetchone():
            conn.execute(f"ALTER SUBSCRIPTION {name} SET (slot_name = NONE)")
            conn.execute(f"DROP SUBSCRIPTION {name}")
        conn.execute(f"DROP PUBLICATION IF EXISTS {name}")
        conn.execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (name,)
        )


def _move_job(world: World, status: str) -> uuid.UUID:
    job = uuid.uuid4()
    with world.catalog() as cat:
        cat.execute(
            "INSERT INTO jobs (id, kind, tenant_id, status, created_by) VALUES (%s, 'promotion', %s, %s, 'test')",
            (job, world["A"].id, status),
        )
    return job


def _doctor(endpoints: Endpoints) -> dict[str, Any]:
    return run_doctor(catalog_dsn=endpoints.catalog_url, pool_dsn=endpoints.pool_url, app_role="tenantctl_app")


def _pool(report: dict[str, Any]) -> dict[str, Any]:
    return next(t for t in report["targets"] if t["kind"] == "pool")


def test_replication_objects_no_unfinished_move_owns_are_reported_with_a_drop_that_works(world: World) -> None:
    """An orphaned slot keeps WAL until the disk is full: the doctor names it, a running move's own objects are not."""
    endpoints = world.endpoints
    job = _move_job(world, "running")
    name = move_object_name(job)
    with _move_objects_on_the_pool(endpoints, name) as admin:
        live = _doctor(endpoints)
        assert live["ok"], live  # control: the objects of a running move are its own
        kinds = {(o["kind"], o["name"]) for o in _pool(live)["move_objects"]}
        assert kinds == {("replication slot", name), ("publication", name), ("subscription", name)}

        with world.catalog() as cat:  # its compensation failed: the job is over, its objects are not
            cat.execute("UPDATE jobs SET status = 'failed' WHERE id = %s", (job,))
        orphaned = _doctor(endpoints)
        assert not orphaned["ok"]
        findings = _pool(orphaned)["findings"]
        assert {(f["check"], f["object"]) for f in findings} == {("move_orphan", name)}
        assert len(findings) == 3 and orphaned["findings"] == 3
        slot = next(f["message"] for f in findings if f["message"].startswith("replication slot"))
        assert "retains" in slot and "of WAL" in slot

        with psycopg.connect(libpq(admin), autocommit=True) as conn:  # each finding's own drop, as printed
            for finding in sorted(findings, key=lambda f: not f["message"].startswith("subscription")):
                for statement in finding["message"].split("drop it with: ", 1)[1].split("; "):
                    conn.execute(statement)
        assert _doctor(endpoints)["ok"]


def test_a_move_that_ends_while_the_doctor_runs_is_not_an_orphan(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """The catalog is read after the databases; what a finished move dropped meanwhile is looked for again."""
    endpoints = world.endpoints
    job = _move_job(world, "running")
    name = move_object_name(job)
    read_catalog = doctor._live_move_names
    with _move_objects_on_the_pool(endpoints, name) as admin:

        def move_finishes_first(catalog_dsn: str) -> set[str]:
            _drop_move_objects(admin, name)
            with world.catalog() as cat:
                cat.execute("UPDATE jobs SET status = 'succeeded' WHERE id = %s", (job,))
            return read_catalog(catalog_dsn)

        monkeypatch.setattr(doctor, "_live_move_names", move_finishes_first)
        report = _doctor(endpoints)
    assert report["ok"], report
    assert {o["name"] for o in _pool(report)["move_objects"]} == {name}  # seen by the scan, then gone


def _at_risk(report: dict[str, Any]) -> list[dict[str, str]]:
    return [w for w in _pool(report)["warnings"] if w["check"] == "move_slot_at_risk"]


def test_a_running_moves_slot_past_its_keep_size_is_a_warning(world: World) -> None:
    endpoints = world.endpoints
    name = move_object_name(_move_job(world, "running"))
    with _move_objects_on_the_pool(endpoints, name) as admin:
        assert not _at_risk(_doctor(endpoints))  # control: a slot within its keep size
        with slot_keep_size(admin, "1MB"):
            push_slot_past_its_keep_size(admin, name)  # and no checkpoint: unreserved, not yet lost
            report = _doctor(endpoints)
    assert report["ok"], report  # a warning, not a finding: the move still owns its slot
    warnings = _at_risk(report)
    assert [w["object"] for w in warnings] == [name]
    assert "unreserved" in warnings[0]["message"] and "max_slot_wal_keep_size" in warnings[0]["message"]


def _server(dsn: str) -> str:
    """The system identifier of ``dsn``'s server: what a table-sync slot's name ends with."""
    with psycopg.connect(libpq(dsn)) as conn:
        row = conn.execute("SELECT system_identifier::text FROM pg_control_system()").fetchone()
    assert row is not None
    return str(row[0])


def _subscription_oid(admin: str, name: str) -> int:
    with psycopg.connect(libpq(admin)) as conn:
        row = conn.execute("SELECT oid::bigint FROM pg_subscription WHERE subname = %s", (name,)).fetchone()
    assert row is not None
    return int(row[0])


@contextlib.contextmanager
def _table_sync_slot(admin: str, subscription_oid: int, server: str) -> Iterator[str]:
    """A slot named as PostgreSQL names a table sync's, in the pool's database; dropped afterwards."""
    name = f"pg_{subscription_oid}_sync_16384_{server}"
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
    try:
        yield name
    finally:
        with psycopg.connect(libpq(admin), autocommit=True) as conn:
            conn.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (name,)
            )


def _findings(report: dict[str, Any]) -> dict[str, str]:
    return {f["object"]: f["message"] for f in _pool(report)["findings"] if f["check"] == "move_orphan"}


def test_a_moves_table_sync_slot_is_traced_to_its_subscription(world: World) -> None:
    """A table sync's slot outlives a subscription dropped detached from its slot: it is the move's, by name."""
    endpoints = world.endpoints
    job = _move_job(world, "running")
    name = move_object_name(job)
    admin = endpoints.pool_admin_url
    assert admin is not None
    with (
        _move_objects_on_the_pool(endpoints, name),
        _table_sync_slot(admin, _subscription_oid(admin, name), _server(admin)) as sync,
    ):
        live = _doctor(endpoints)
        assert live["ok"], live  # control: a running move's table sync
        assert ("table-sync slot", sync) in {(o["kind"], o["name"]) for o in _pool(live)["move_objects"]}

        with world.catalog() as cat:
            cat.execute("UPDATE jobs SET status = 'failed' WHERE id = %s", (job,))
        orphaned = _findings(_doctor(endpoints))
        assert set(orphaned) == {name, sync}
        assert orphaned[sync].startswith(f"table-sync slot of subscription {name}, of no unfinished move")
        assert "retains" in orphaned[sync]

        # The subscription's own drop (detached from its slot) leaves the sync slot; its drop removes it.
        _drop_move_objects(admin, name)
        assert set(_findings(_doctor(endpoints))) == {sync}
        with psycopg.connect(libpq(admin), autocommit=True) as conn:
            conn.execute(orphaned[sync].split("drop it with: ", 1)[1])
        assert _doctor(endpoints)["ok"]


def test_a_table_sync_slot_of_no_subscription_is_an_orphan_once_no_move_runs(world: World) -> None:
    endpoints = world.endpoints
    admin = endpoints.pool_admin_url
    assert admin is not None
    job = _move_job(world, "running")
    with (
        _table_sync_slot(admin, 4_000_000_000, _server(admin)) as gone,
        _table_sync_slot(admin, 16_500, "1234567890123456789") as elsewhere,
    ):
        running = _doctor(endpoints)
        assert running["ok"], running  # while a move runs, it may be that move's, being dropped
        warned = {w["object"] for w in _pool(running)["warnings"] if w["check"] == "table_sync_slot_unattributed"}
        assert warned == {gone, elsewhere}

        with world.catalog() as cat:
            cat.execute("UPDATE jobs SET status = 'succeeded' WHERE id = %s", (job,))
        findings = _findings(_doctor(endpoints))
        assert set(findings) == {gone, elsewhere}
        assert "no longer exists (oid 4000000000" in findings[gone]
        assert "server the doctor does not audit (system identifier 1234567890123456789)" in findings[elsewhere]


def test_a_table_sync_slot_of_another_subscription_is_not_a_moves(world: World) -> None:
    """Control: logical replication that is not a move's (its subscription is not named as a move's) is left alone."""
    endpoints = world.endpoints
    admin = endpoints.pool_admin_url
    assert admin is not None
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        conn.execute(
            sql.SQL(
                "CREATE SUBSCRIPTION reporting_replica CONNECTION {} PUBLICATION reports WITH (connect = false)"
            ).format(sql.Literal(libpq(endpoints.pool_url)))
        )
    try:
        with _table_sync_slot(admin, _subscription_oid(admin, "reporting_replica"), _server(admin)):
            report = _doctor(endpoints)
            assert report["ok"], report
            assert not [w for w in _pool(report)["warnings"] if w["check"] == "table_sync_slot_unattributed"]
    finally:
        with psycopg.connect(libpq(admin), autocommit=True) as conn:
            conn.execute("ALTER SUBSCRIPTION reporting_replica SET (slot_name = NONE)")
            conn.execute("DROP SUBSCRIPTION reporting_replica")


@pytest.mark.parametrize(
    ("ddl", "table"),
    [
        ("CREATE TABLE notes (tenant_id uuid NOT NULL, body text)", "public.notes"),
        ("CREATE TABLE labels (tenant_id uuid NOT NULL, id uuid PRIMARY KEY)", "public.labels"),
    ],
)
def test_a_table_a_move_would_refuse_is_a_warning(endpoints: Endpoints, ddl: str, table: str) -> None:
    clean = _doctor(endpoints)
    assert not [w for w in _pool(clean)["warnings"] if w["check"] == "not_movable"]  # control: the shipped schema
    with psycopg.connect(libpq(endpoints.pool_url)) as conn:
        conn.execute(ddl)
    warned = [w for w in _pool(_doctor(endpoints))["warnings"] if w["check"] == "not_movable"]
    assert [w["object"] for w in warned] == [table]
    assert "a move would refuse" in warned[0]["message"]
