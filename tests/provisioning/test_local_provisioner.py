"""Contract of the local provisioner, on the real silo server of the test harness.

Every refusal has an "allowed" control next to it, so a test cannot pass
because nothing works at all.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg
import pytest
import structlog
from psycopg import sql

from control_plane import bootstrap, schema
from control_plane.exceptions import ProvisioningError, SiloOwnershipError
from control_plane.provisioning import (
    LocalProvisioner,
    RetryPolicy,
    SiloLocation,
    SiloSpec,
    local,
    location_for_cleanup,
)
from control_plane.provisioning.local import Marker, is_transient
from control_plane.provisioning.naming import silo_database_name
from data_plane.dsn import libpq, with_database, with_user
from tests.harness import PgServers

FAST = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=0.02)


@pytest.fixture
def spec() -> SiloSpec:
    return SiloSpec(tenant_id=uuid.uuid4(), slug=f"acme-{uuid.uuid4().hex[:8]}", tier="enterprise")


@pytest.fixture
def provisioner(pg_servers: PgServers, spec: SiloSpec) -> Iterator[LocalProvisioner]:
    yield LocalProvisioner(server_url=pg_servers.silo_admin, roles=pg_servers.roles, retry=FAST)
    # Whatever a test left behind (the provisioner may have refused to drop it).
    bootstrap.drop_database(pg_servers.silo_admin, silo_database_name(spec.slug))


def _db_row(admin: str, database: str) -> tuple[str, str | None] | None:
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        row = conn.execute(
            "SELECT r.rolname, shobj_description(d.oid, 'pg_database') FROM pg_database d "
            "JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname = %s",
            (database,),
        ).fetchone()
    return None if row is None else (row[0], row[1])


def test_provision_twice_returns_the_same_location(
    provisioner: LocalProvisioner, spec: SiloSpec, pg_servers: PgServers
) -> None:
    first = provisioner.provision(spec)
    second = provisioner.provision(spec)
    assert first == second
    assert first.provider == "local" and first.tenant_id == spec.tenant_id
    assert first.database == "silo_" + spec.slug.replace("-", "_")
    assert first.name == f"silo-{spec.slug}"
    assert first.dsn is not None and first.app_dsn is not None
    # owner and application roles, and never a password
    for dsn, role in ((first.dsn, "tenantctl_owner"), (first.app_dsn, "tenantctl_app")):
        url = psycopg.conninfo.conninfo_to_dict(libpq(dsn))
        assert url["user"] == role and url["dbname"] == first.database
        assert "password" not in url
    row = _db_row(pg_servers.silo_admin, first.database)
    assert row is not None and row[0] == pg_servers.roles.owner
    assert Marker.parse(row[1]) == Marker(tenant_id=spec.tenant_id, slug=spec.slug)
    assert provisioner.describe(first) | {"size_bytes": 0} == {
        "provider": "local",
        "database": first.database,
        "exists": True,
        "owner": "tenantctl_owner",
        "size_bytes": 0,
        "tenant_id": str(spec.tenant_id),
        "owned_by_tenant": True,
    }


def test_tenant_schema_migrates_onto_the_silo_and_the_app_role_works(
    provisioner: LocalProvisioner, spec: SiloSpec
) -> None:
    location = provisioner.provision(spec)
    assert location.dsn is not None and location.app_dsn is not None
    schema.upgrade(schema.Stream.TENANT, location.dsn)
    assert schema.current_revision(location.dsn) == schema.head(schema.Stream.TENANT)
    project = uuid.uuid4()
    with psycopg.connect(libpq(location.dsn)) as owner:
        owner.execute("SELECT tenantctl.claim_tenant(%s, 1)", (spec.tenant_id,))
        owner.execute(
            "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'silo-project')",
            (spec.tenant_id, project),
        )
    with psycopg.connect(libpq(location.app_dsn)) as app:
        flags = app.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user").fetchone()
        assert flags == (False, False)
        # fail closed without tenant context ...
        assert app.execute("SELECT count(*) FROM projects").fetchone() == (0,)
        app.rollback()
        # ... and the tenant's row through the tenant path
        app.execute("SELECT tenantctl.begin_tenant(%s, 1)", (spec.tenant_id,))
        assert app.execute("SELECT id FROM projects").fetchall() == [(project,)]
    # Provisioning again after migration leaves data and schema alone.
    assert provisioner.provision(spec) == location
    assert schema.current_revision(location.dsn) == schema.head(schema.Stream.TENANT)


def test_deprovision_drops_the_silo_and_is_idempotent(
    provisioner: LocalProvisioner, spec: SiloSpec, pg_servers: PgServers
) -> None:
    location = provisioner.provision(spec)
    assert location.database is not None
    provisioner.deprovision(location)
    assert _db_row(pg_servers.silo_admin, location.database) is None
    assert provisioner.describe(location) == {
        "provider": "local",
        "database": location.database,
        "exists": False,
    }
    provisioner.deprovision(location)  # already gone: still a success


def test_deprovision_of_a_location_claiming_another_tenant_is_refused(
    provisioner: LocalProvisioner, spec: SiloSpec, pg_servers: PgServers
) -> None:
    location = provisioner.provision(spec)
    assert location.database is not None
    forged = SiloLocation(name=location.name, provider="local", tenant_id=uuid.uuid4(), database=location.database)
    with pytest.raises(SiloOwnershipError, match="belongs to tenant"):
        provisioner.deprovision(forged)
    assert _db_row(pg_servers.silo_admin, location.database) is not None
    assert provisioner.describe(forged)["owned_by_tenant"] is False
    # control: the rightful location may drop it
    provisioner.deprovision(location)
    assert _db_row(pg_servers.silo_admin, location.database) is None


def test_deprovision_refuses_a_location_of_another_provider(provisioner: LocalProvisioner) -> None:
    foreign = SiloLocation(name="silo-x", provider="pulumi-aws", tenant_id=uuid.uuid4(), database="silo_x")
    with pytest.raises(ProvisioningError, match="pulumi-aws"):
        provisioner.deprovision(foreign)


def test_slug_collision_with_another_tenant_is_refused(provisioner: LocalProvisioner, spec: SiloSpec) -> None:
    provisioner.provision(spec)
    intruder = SiloSpec(tenant_id=uuid.uuid4(), slug=spec.slug, tier="enterprise")
    with pytest.raises(SiloOwnershipError, match=str(spec.tenant_id)):
        provisioner.provision(intruder)


def test_crash_after_create_before_marker_converges(
    provisioner: LocalProvisioner, spec: SiloSpec, pg_servers: PgServers
) -> None:
    database = silo_database_name(spec.slug)
    # The first attempt died right after CREATE DATABASE + grants.
    bootstrap.ensure_database(pg_servers.silo_admin, database, pg_servers.roles)
    before = _db_row(pg_servers.silo_admin, database)
    assert before is not None and before[1] is None
    location = provisioner.provision(spec)
    after = _db_row(pg_servers.silo_admin, database)
    assert after is not None and Marker.parse(after[1]) == Marker(spec.tenant_id, spec.slug)
    assert location == provisioner.location_for(spec)


def test_crash_before_grants_converges_and_app_can_connect(
    provisioner: LocalProvisioner, spec: SiloSpec, pg_servers: PgServers
) -> None:
    database = silo_database_name(spec.slug)
    # The first attempt died between CREATE DATABASE and the grants: PUBLIC
    # still has CONNECT, the app role has no explicit one, no marker.
    with psycopg.connect(libpq(pg_servers.silo_admin), autocommit=True) as conn:
        conn.execute(
            sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(pg_servers.roles.owner)
            )
        )
    location = provisioner.provision(spec)
    assert location.app_dsn is not None
    with psycopg.connect(libpq(pg_servers.silo_admin), autocommit=True) as conn:
        acl = conn.execute("SELECT datacl::text FROM pg_database WHERE datname = %s", (database,)).fetchone()
    assert acl is not None
    # grants were re-asserted: no PUBLIC entry ("=c/..."), explicit CONNECT for the app role
    assert "tenantctl_app=c/" in acl[0] and "{=" not in acl[0] and ",=" not in acl[0]
    with psycopg.connect(libpq(location.app_dsn)) as app:
        assert app.execute("SELECT current_database()").fetchone() == (database,)


def test_unmarked_database_with_content_is_never_adopted_or_dropped(
    provisioner: LocalProvisioner, spec: SiloSpec, pg_servers: PgServers
) -> None:
    database = silo_database_name(spec.slug)
    bootstrap.ensure_database(pg_servers.silo_admin, database, pg_servers.roles)
    with psycopg.connect(with_database(pg_servers.silo_admin, database), autocommit=True) as conn:
        conn.execute("CREATE TABLE someone_elses (id int)")
    with pytest.raises(SiloOwnershipError, match="without a tenantctl silo marker"):
        provisioner.provision(spec)
    with pytest.raises(SiloOwnershipError):
        provisioner.deprovision(provisioner.location_for(spec))
    assert _db_row(pg_servers.silo_admin, database) is not None


def test_database_with_a_foreign_comment_is_refused(
    provisioner: LocalProvisioner, spec: SiloSpec, pg_servers: PgServers
) -> None:
    database = silo_database_name(spec.slug)
    bootstrap.ensure_database(pg_servers.silo_admin, database, pg_servers.roles)
    with psycopg.connect(libpq(pg_servers.silo_admin), autocommit=True) as conn:
        conn.execute(sql.SQL("COMMENT ON DATABASE {} IS 'billing team, do not touch'").format(sql.Identifier(database)))
    with pytest.raises(SiloOwnershipError, match="not a tenantctl silo marker"):
        provisioner.provision(spec)
    with pytest.raises(SiloOwnershipError):
        provisioner.deprovision(provisioner.location_for(spec))


def test_concurrent_provisions_of_one_silo_converge(provisioner: LocalProvisioner, spec: SiloSpec) -> None:
    results: list[SiloLocation] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(provisioner.provision(spec))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == 4 and len(set(map(repr, results))) == 1


def test_unreachable_server_is_retried_then_reported(spec: SiloSpec, unused_tcp_port: int) -> None:
    down = LocalProvisioner(server_url=f"postgresql://postgres@127.0.0.1:{unused_tcp_port}/postgres", retry=FAST)
    with structlog.testing.capture_logs() as logs, pytest.raises(ProvisioningError) as info:
        down.provision(spec)
    retries = [entry for entry in logs if entry["event"] == "provisioning.retry"]
    assert [entry["attempt"] for entry in retries] == [1, 2]  # 3 attempts, 2 sleeps
    assert "local silo provision" in info.value.message and str(unused_tcp_port) in info.value.message


def test_permanent_errors_are_not_retried(pg_servers: PgServers, spec: SiloSpec) -> None:
    # A role that does not exist: a configuration error, reported at once.
    bad = LocalProvisioner(
        server_url=with_user(pg_servers.silo_admin, "no_such_role_" + uuid.uuid4().hex[:6]), retry=FAST
    )
    with structlog.testing.capture_logs() as logs, pytest.raises(ProvisioningError):
        bad.provision(spec)
    assert [entry for entry in logs if entry["event"] == "provisioning.retry"] == []


def test_transient_classification() -> None:
    assert is_transient(psycopg.OperationalError("connection refused")) is True
    assert is_transient(psycopg.OperationalError('password authentication failed for user "x"')) is False
    assert is_transient(psycopg.errors.DuplicateDatabase()) is True
    assert is_transient(psycopg.errors.InsufficientPrivilege()) is False
    assert is_transient(ValueError("x")) is False


def test_concurrent_provisions_of_different_silos_all_succeed(pg_servers: PgServers) -> None:
    provisioner = LocalProvisioner(server_url=pg_servers.silo_admin, roles=pg_servers.roles, retry=FAST)
    specs = [SiloSpec(tenant_id=uuid.uuid4(), slug=f"par-{uuid.uuid4().hex[:8]}", tier="enterprise") for _ in range(4)]
    errors: list[BaseException] = []

    def run(spec: SiloSpec) -> None:
        try:
            provisioner.provision(spec)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(spec,)) for spec in specs]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert errors == []
        assert all(provisioner.describe(provisioner.location_for(spec))["owned_by_tenant"] for spec in specs)
    finally:
        for spec in specs:
            bootstrap.drop_database(pg_servers.silo_admin, silo_database_name(spec.slug))


def test_an_unrecorded_silo_can_be_cleaned_up_from_the_spec_alone(
    provisioner: LocalProvisioner, spec: SiloSpec, pg_servers: PgServers
) -> None:
    provisioner.provision(spec)  # ... and the caller crashed before recording the location
    stub = location_for_cleanup(spec, provider=provisioner.kind)
    # control: the stub does not let another tenant drop it
    with pytest.raises(SiloOwnershipError):
        provisioner.deprovision(location_for_cleanup(SiloSpec(uuid.uuid4(), spec.slug, "enterprise"), provider="local"))
    provisioner.deprovision(stub)
    assert _db_row(pg_servers.silo_admin, silo_database_name(spec.slug)) is None


def test_a_stuck_holder_of_the_silo_lock_makes_provisioning_give_up_not_hang(
    provisioner: LocalProvisioner, spec: SiloSpec, pg_servers: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The silo lock's wait is bounded by ``lock_timeout``; each attempt times out, then it is reported."""
    monkeypatch.setattr(local, "LOCK_TIMEOUT", "100ms")
    database = silo_database_name(spec.slug)
    with psycopg.connect(libpq(pg_servers.silo_admin), autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (local.LOCK_NAMESPACE, database))
        with structlog.testing.capture_logs() as logs, pytest.raises(ProvisioningError) as info:
            provisioner.provision(spec)
        assert "LockNotAvailable" in info.value.message
        assert [entry["attempt"] for entry in logs if entry["event"] == "provisioning.retry"] == [1, 2]
        assert _db_row(pg_servers.silo_admin, database) is None  # nothing made while the lock was held
    # Control: the holder has gone, and the same provisioner makes the silo.
    location = provisioner.provision(spec)
    assert location.database == database and _db_row(pg_servers.silo_admin, database) is not None
