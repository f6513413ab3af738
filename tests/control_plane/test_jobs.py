"""Durable jobs end to end on real PostgreSQL: onboarding, offboarding, export/import.

DBOS is a process-wide singleton: one executor is launched for the whole
session against one session catalog (and pool), and tests isolate themselves
by creating their own tenants. The crash test runs its worker as a separate
process on its own catalog.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import structlog

from control_plane import schema
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.workflows import export
from data_plane.dsn import libpq
from data_plane.logs import configure_logging
from data_plane.settings import LogFormat
from tests.control_plane.conftest import audit_entries, ownership
from tests.harness import POOL_TEMPLATE, SILO_TEMPLATE, PgServers, fresh_database, owner_dsn

pytestmark = pytest.mark.slow


def slug() -> str:
    return f"t-{uuid.uuid4().hex[:10]}"


def seed(pool_url: str, tenant_id: str, *, projects: int, tasks_per_project: int) -> None:
    """Rows for one tenant, written as the owner (the data plane's API is not under test here)."""
    with psycopg.connect(libpq(pool_url)) as conn:
        for p in range(projects):
            project_id = uuid.uuid4()
            conn.execute(
                "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, %s)",
                (tenant_id, project_id, f'project {p} ünïcode "quoted"'),
            )
            for t in range(tasks_per_project):
                conn.execute(
                    "INSERT INTO tasks (tenant_id, id, project_id, title, done) VALUES (%s, %s, %s, %s, %s)",
                    (tenant_id, uuid.uuid4(), project_id, f"task {t}", t % 2 == 0),
                )


def snapshot(dsn: str, tenant_id: str) -> dict[str, list[str]]:
    """Every row of the tenant as canonical JSON, per table."""
    with psycopg.connect(libpq(dsn)) as conn:
        return {
            table: sorted(
                json.dumps(row[0], sort_keys=True)
                for row in conn.execute(
                    f"SELECT row_to_json(t) FROM {table} t WHERE tenant_id = %s", (tenant_id,)
                ).fetchall()
            )
            for table in ("projects", "tasks")
        }


async def wait_job(client: httpx.AsyncClient, job_id: str, timeout: float = 60) -> dict[str, Any]:
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] not in ("pending", "running"):
            return job
        assert time.monotonic() < deadline, f"job did not finish: {job}"
        await asyncio.sleep(0.1)


async def test_offboarding_a_pool_tenant_exports_deletes_and_tombstones(
    wf_admin: httpx.AsyncClient, wf_settings: ControlPlaneSettings, wf_endpoints: Endpoints, pg_servers: PgServers
) -> None:
    leaving = (await wf_admin.post("/v1/tenants", json={"slug": slug(), "name": "Leaving", "tier": "free"})).json()
    staying = (await wf_admin.post("/v1/tenants", json={"slug": slug(), "name": "Staying", "tier": "free"})).json()
    seed(wf_endpoints.pool_url, leaving["id"], projects=3, tasks_per_project=4)
    seed(wf_endpoints.pool_url, staying["id"], projects=2, tasks_per_project=2)
    before = snapshot(wf_endpoints.pool_url, leaving["id"])
    staying_before = snapshot(wf_endpoints.pool_url, staying["id"])

    accepted = await wf_admin.delete(f"/v1/tenants/{leaving['slug']}")
    assert accepted.status_code == 202
    job = await wait_job(wf_admin, accepted.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0
    assert job["step"] == "tombstone"

    tenant = (await wf_admin.get(f"/v1/tenants/{leaving['id']}")).json()
    assert tenant["status"] == "deleted"
    assert tenant["route_epoch"] == leaving["route_epoch"] + 1
    assert snapshot(wf_endpoints.pool_url, leaving["id"]) == {"projects": [], "tasks": []}
    assert ownership(wf_endpoints.pool_url, leaving["id"]) is None
    assert snapshot(wf_endpoints.pool_url, staying["id"]) == staying_before  # untouched
    assert ("alice", "tenant.tombstone") in audit_entries(wf_endpoints.catalog_url, leaving["id"])

    # The export is complete and re-importable into an empty store.
    directory = export.export_dir_for(wf_settings.export_dir, uuid.UUID(leaving["id"]))
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "tenantctl-export/1"
    assert [(t["name"], t["rows"]) for t in manifest["tables"]] == [("projects", 3), ("tasks", 12)]
    assert manifest["schema_revision"] == schema.current_revision(wf_endpoints.pool_url)
    with fresh_database(pg_servers.main_admin, pg_servers.roles, template=POOL_TEMPLATE, prefix="t_import") as db:
        target = owner_dsn(pg_servers.main_admin, db, pg_servers.roles)
        assert export.import_tenant(target, directory) == {"projects": 3, "tasks": 12}
        assert snapshot(target, leaving["id"]) == before


# A partitioned table, and a table outside public (offboarding searched public only).
PARTITIONED_AND_ELSEWHERE = (
    "CREATE TABLE events (tenant_id uuid NOT NULL, id int NOT NULL, body text, PRIMARY KEY (tenant_id, id)) "
    "PARTITION BY LIST (tenant_id); CREATE TABLE events_rest PARTITION OF events DEFAULT; "
    "CREATE SCHEMA app; CREATE TABLE app.notes (tenant_id uuid NOT NULL, id int NOT NULL, PRIMARY KEY (tenant_id, id)); "
    "CREATE TABLE app.marks (tenant_id uuid NOT NULL, at int)"  # no primary key
)


def test_every_tenant_table_is_exported_once_and_only_the_tenants_rows_are_deleted(
    tmp_path: Path, pg_servers: PgServers
) -> None:
    """Every partition has a row at ctid (0,1): a batch picked by ctid alone deleted the other tenant's too."""
    leaving, staying = uuid.uuid4(), uuid.uuid4()
    with fresh_database(pg_servers.main_admin, pg_servers.roles, template=POOL_TEMPLATE, prefix="t_parts") as db:
        dsn = owner_dsn(pg_servers.main_admin, db, pg_servers.roles)
        with psycopg.connect(libpq(dsn), autocommit=True) as conn:
            conn.execute(PARTITIONED_AND_ELSEWHERE)
            conn.execute(f"CREATE TABLE events_leaving PARTITION OF events FOR VALUES IN ('{leaving}')")
            for tenant in (leaving, staying):
                conn.execute("INSERT INTO events SELECT %s, g, 'e' FROM generate_series(1, 3) AS g", (tenant,))
                conn.execute("INSERT INTO app.notes SELECT %s, g FROM generate_series(1, 2) AS g", (tenant,))
                conn.execute("INSERT INTO app.marks VALUES (%s, 1)", (tenant,))
        manifest = export.export_tenant(dsn, leaving, tmp_path, slug="leaving", schema_revision=None)
        exported = {(t["schema"], t["name"]): (t["file"], t["rows"]) for t in manifest["tables"]}
        assert exported[("public", "events")] == ("events.jsonl", 3)
        assert exported[("app", "notes")] == ("app.notes.jsonl", 2)
        assert exported[("app", "marks")] == ("app.marks.jsonl", 1)
        assert not {name for _, name in exported} & {"events_leaving", "events_rest"}
        remaining = export.count_rows(dsn, leaving)
        assert remaining["public.events"] == 3 and remaining["app.notes"] == 2
        for table in remaining:
            while export.delete_batch(dsn, table, leaving, 1):
                pass
        assert sum(export.count_rows(dsn, leaving).values()) == 0
        kept = export.count_rows(dsn, staying)  # untouched
        assert kept["public.events"] == 3 and kept["app.notes"] == 2
    with fresh_database(pg_servers.main_admin, pg_servers.roles, template=POOL_TEMPLATE, prefix="t_parts") as db:
        target = owner_dsn(pg_servers.main_admin, db, pg_servers.roles)
        with psycopg.connect(libpq(target), autocommit=True) as conn:
            conn.execute(PARTITIONED_AND_ELSEWHERE)  # partitioned otherwise: a DEFAULT partition only
        imported = export.import_tenant(target, export.export_dir_for(tmp_path, leaving))
        assert imported["events"] == 3 and imported["app.notes"] == 2


NOTES = (
    "CREATE TABLE notes (tenant_id uuid NOT NULL, id bigint GENERATED ALWAYS AS IDENTITY, n bigserial, "
    "body text, length int GENERATED ALWAYS AS (length(body)) STORED, PRIMARY KEY (tenant_id, id))"
)


def test_an_import_restores_identity_and_generated_columns_and_moves_sequences_past_the_rows(
    tmp_path: Path, pg_servers: PgServers
) -> None:
    """An identity GENERATED ALWAYS refused the stored ids; sequences stayed behind and the next insert collided."""
    tenant = uuid.uuid4()
    with fresh_database(pg_servers.main_admin, pg_servers.roles, template=POOL_TEMPLATE, prefix="t_seq") as db:
        dsn = owner_dsn(pg_servers.main_admin, db, pg_servers.roles)
        with psycopg.connect(libpq(dsn), autocommit=True) as conn:
            conn.execute(NOTES)
            conn.execute(
                "INSERT INTO notes (tenant_id, body) SELECT %s, repeat('x', g) FROM generate_series(1, 3) g", (tenant,)
            )
        export.export_tenant(dsn, tenant, tmp_path, slug="seq", schema_revision=None)
    with fresh_database(pg_servers.main_admin, pg_servers.roles, template=POOL_TEMPLATE, prefix="t_seq") as db:
        target = owner_dsn(pg_servers.main_admin, db, pg_servers.roles)
        with psycopg.connect(libpq(target), autocommit=True) as conn:
            conn.execute(NOTES)
            conn.execute("SELECT setval('notes_n_seq', 50)")  # already further: stays
        assert export.import_tenant(target, export.export_dir_for(tmp_path, tenant))["notes"] == 3
        with psycopg.connect(libpq(target), autocommit=True) as conn:
            conn.execute("SET row_security = off")
            rows = conn.execute("SELECT id, n, length FROM notes ORDER BY id").fetchall()
            added = conn.execute(
                "INSERT INTO notes (tenant_id, body) VALUES (%s, 'y') RETURNING id, n", (tenant,)
            ).fetchone()
    assert rows == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    assert added == (4, 51)


def test_import_refuses_a_tampered_export(tmp_path: Path) -> None:
    directory = tmp_path / "x"
    directory.mkdir()
    (directory / "projects.jsonl").write_text('{"id": 1}\n')
    manifest = {
        "format": "tenantctl-export/1",
        "tables": [{"name": "projects", "file": "projects.jsonl", "rows": 1, "sha256": "0" * 64}],
    }
    (directory / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="checksum"):
        export.import_tenant("postgresql://unused@/x", directory)


async def test_onboarding_and_offboarding_a_silo_tenant(
    wf_admin: httpx.AsyncClient, wf_settings: ControlPlaneSettings, wf_endpoints: Endpoints, pg_servers: PgServers
) -> None:
    created = await wf_admin.post("/v1/tenants", json={"slug": slug(), "name": "Big", "tier": "enterprise"})
    assert created.status_code == 201, created.text
    tenant = created.json()
    assert tenant["status"] == "provisioning"
    assert tenant["placement"] == {"kind": "silo", "location": None}
    job = await wait_job(wf_admin, created.headers["X-Tenantctl-Job"])
    assert job["status"] == "succeeded", job
    assert job["kind"] == "onboarding"

    active = (await wf_admin.get(f"/v1/tenants/{tenant['id']}")).json()
    assert active["status"] == "active"
    assert active["placement"]["kind"] == "silo"
    location = active["placement"]["location"]
    assert location
    with psycopg.connect(libpq(wf_endpoints.catalog_url)) as conn:
        row = conn.execute(
            "SELECT dsn, app_dsn, status, tenant_id FROM locations WHERE name = %s", (location,)
        ).fetchone()
        route = conn.execute(
            "SELECT status, placement FROM tenant_routes WHERE tenant_id = %s", (tenant["id"],)
        ).fetchone()
    assert row is not None
    silo_dsn, app_dsn, status, owner = row
    assert status == "ready"
    assert str(owner) == tenant["id"]
    assert app_dsn
    assert route == ("active", "silo")
    assert ownership(silo_dsn, tenant["id"]) == ("active", 1)
    assert schema.current_revision(silo_dsn) == schema.current_revision(wf_endpoints.pool_url)
    seed(silo_dsn, tenant["id"], projects=2, tasks_per_project=3)
    before = snapshot(silo_dsn, tenant["id"])
    revision = schema.current_revision(silo_dsn)

    gone = await wf_admin.delete(f"/v1/tenants/{tenant['id']}")
    job = await wait_job(wf_admin, gone.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    assert (await wf_admin.get(f"/v1/tenants/{tenant['id']}")).json()["status"] == "deleted"
    with psycopg.connect(libpq(wf_endpoints.catalog_url)) as conn:
        assert conn.execute("SELECT status FROM locations WHERE name = %s", (location,)).fetchone() == ("deleted",)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(libpq(silo_dsn)).close()

    # The silo is gone, its rows are not: the export is complete and re-importable.
    directory = export.export_dir_for(wf_settings.export_dir, uuid.UUID(tenant["id"]))
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format"] == "tenantctl-export/1"
    assert [(t["name"], t["rows"]) for t in manifest["tables"]] == [("projects", 2), ("tasks", 6)]
    assert manifest["schema_revision"] == revision
    with fresh_database(pg_servers.silo_admin, pg_servers.roles, template=SILO_TEMPLATE, prefix="t_import") as db:
        target = owner_dsn(pg_servers.silo_admin, db, pg_servers.roles)
        assert export.import_tenant(target, directory) == {"projects": 2, "tasks": 6}
        assert snapshot(target, tenant["id"]) == before


async def test_a_finished_job_cannot_be_cancelled_and_unknown_jobs_are_404(wf_admin: httpx.AsyncClient) -> None:
    tenant = (await wf_admin.post("/v1/tenants", json={"slug": slug(), "name": "X", "tier": "free"})).json()
    job = await wait_job(wf_admin, (await wf_admin.delete(f"/v1/tenants/{tenant['id']}")).json()["job"]["id"])
    refused = await wf_admin.post(f"/v1/jobs/{job['id']}/cancel")
    assert refused.status_code == 409
    assert refused.json()["error"]["code"] == "job_not_cancellable"
    assert (await wf_admin.get(f"/v1/jobs/{uuid.uuid4()}")).status_code == 404
    listed = (await wf_admin.get("/v1/jobs", params={"tenant_id": tenant["id"]})).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]


async def test_cancelling_a_running_offboarding_before_the_delete_restores_the_tenant(
    wf_admin: httpx.AsyncClient, wf_settings: ControlPlaneSettings, wf_endpoints: Endpoints, tweak: Any
) -> None:
    tweak(test_step_delay_seconds=1.5)  # the job lingers after its export
    tenant = (await wf_admin.post("/v1/tenants", json={"slug": slug(), "name": "C", "tier": "free"})).json()
    await wf_admin.post(f"/v1/tenants/{tenant['id']}/suspend")
    seed(wf_endpoints.pool_url, tenant["id"], projects=2, tasks_per_project=2)
    before = snapshot(wf_endpoints.pool_url, tenant["id"])
    job_id = (await wf_admin.delete(f"/v1/tenants/{tenant['id']}")).json()["job"]["id"]

    import asyncio

    deadline = time.monotonic() + 30
    while (await wf_admin.get(f"/v1/jobs/{job_id}")).json()["step"] != "export":
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    export_dir = export.export_dir_for(wf_settings.export_dir, uuid.UUID(tenant["id"]))
    assert ownership(wf_endpoints.pool_url, tenant["id"]) == ("fenced", 1)
    requested = await wf_admin.post(f"/v1/jobs/{job_id}/cancel")
    assert requested.status_code == 202
    assert requested.json()["job"]["status"] == "running"  # cancelled at the next step boundary

    job = await wait_job(wf_admin, job_id)
    assert job["status"] == "cancelled", job
    restored = (await wf_admin.get(f"/v1/tenants/{tenant['id']}")).json()
    assert restored["status"] == "suspended"  # the status it had before
    assert ownership(wf_endpoints.pool_url, tenant["id"]) == ("active", 1)  # unfenced
    assert snapshot(wf_endpoints.pool_url, tenant["id"]) == before
    assert not export_dir.exists()


class BrokenProvisioner:
    kind = "broken"

    def provision(self, spec: Any) -> Any:
        from control_plane.exceptions import ProvisioningError

        raise ProvisioningError(f"no capacity for {spec.name}")

    def deprovision(self, location: Any) -> None:
        raise AssertionError("nothing was provisioned")

    def describe(self, location: Any) -> dict[str, Any]:
        return {}


class QuotingProvisioner(BrokenProvisioner):
    """Fails with the database's own error, whose message quotes the value it refused."""

    def __init__(self, dsn: str, value: str) -> None:
        self.dsn, self.value = dsn, value

    def provision(self, spec: Any) -> Any:
        with psycopg.connect(libpq(self.dsn)) as conn:
            conn.execute("SELECT %s::uuid", (self.value,))
        raise AssertionError("the cast fails")


async def test_a_job_error_names_a_database_error_without_the_value_it_quotes(
    wf_admin: httpx.AsyncClient, wf_endpoints: Endpoints, wf_settings: ControlPlaneSettings, tweak: Any
) -> None:
    canary = f"canary-{uuid.uuid4().hex[:8]}"
    tweak(provisioner=QuotingProvisioner(wf_endpoints.catalog_url, canary))
    stream = io.StringIO()
    configure_logging(wf_settings.model_copy(update={"log_format": LogFormat.JSON}), stream=stream)
    try:
        created = await wf_admin.post("/v1/tenants", json={"slug": slug(), "name": "Q", "tier": "enterprise"})
        job = await wait_job(wf_admin, created.headers["X-Tenantctl-Job"])
    finally:
        structlog.reset_defaults()
    assert job["status"] == "failed" and job["step"] == "provision"
    assert job["error"].startswith("InvalidTextRepresentation: [message withheld] (sqlstate=22P02)"), job["error"]
    assert canary not in json.dumps(job)
    # Nor in what DBOS checkpointed of the failed step (pickled, base64), which outlives an offboarding.
    checkpointed = _dbos_texts(wf_endpoints.catalog_url)
    assert any("StepFailedError" in text for text in checkpointed)  # control: the failure is there
    assert not [text for text in checkpointed if canary in text]
    logged = stream.getvalue()
    assert '"event": "job_step_failed"' in logged and "sqlstate=22P02" in logged  # the frames are logged...
    assert canary not in logged  # ...without the value


def _dbos_texts(catalog_url: str) -> list[str]:
    """Every output and error DBOS stored in the catalog, decoded where it is base64 (pickles)."""
    with psycopg.connect(libpq(catalog_url)) as conn:
        rows = conn.execute(
            "SELECT output, error FROM dbos.operation_outputs UNION ALL SELECT output, error FROM dbos.workflow_status"
        ).fetchall()
    texts = []
    for value in (v for row in rows for v in row if v):
        texts.append(value)
        with contextlib.suppress(ValueError):
            texts.append(base64.b64decode(value, validate=True).decode("utf-8", "replace"))
    return texts


async def test_a_failed_onboarding_is_recorded_and_the_tenant_can_be_offboarded(
    wf_admin: httpx.AsyncClient, tweak: Any
) -> None:
    tweak(provisioner=BrokenProvisioner())
    created = await wf_admin.post("/v1/tenants", json={"slug": slug(), "name": "F", "tier": "enterprise"})
    job = await wait_job(wf_admin, created.headers["X-Tenantctl-Job"])
    assert job["status"] == "failed"
    assert job["step"] == "provision"
    assert "no capacity" in job["error"]
    tenant_id = created.json()["id"]
    assert (await wf_admin.get(f"/v1/tenants/{tenant_id}")).json()["status"] == "provisioning"

    cleanup = await wait_job(wf_admin, (await wf_admin.delete(f"/v1/tenants/{tenant_id}")).json()["job"]["id"])
    assert cleanup["status"] == "succeeded", cleanup
    assert (await wf_admin.get(f"/v1/tenants/{tenant_id}")).json()["status"] == "deleted"


async def test_offboarding_a_tenant_whose_onboarding_failed_after_provisioning_drops_its_silo(
    wf_admin: httpx.AsyncClient, wf_endpoints: Endpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The silo was provisioned and recorded, then the migrate step failed: offboarding drops it.

    The tenant was never activated, so its catalog row names no location: the
    offboarding used to find "no store", succeed, and leave the silo running.
    """
    from control_plane.workflows import onboarding

    def broken_migrate(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("migration failed")

    monkeypatch.setattr(onboarding, "migrate_new_silo", broken_migrate)
    created = await wf_admin.post("/v1/tenants", json={"slug": slug(), "name": "F", "tier": "enterprise"})
    assert created.status_code == 201, created.text
    job = await wait_job(wf_admin, created.headers["X-Tenantctl-Job"])
    assert (job["status"], job["step"]) == ("failed", "migrate"), job
    tenant_id = created.json()["id"]
    with psycopg.connect(libpq(wf_endpoints.catalog_url)) as conn:
        recorded = conn.execute("SELECT name, dsn, status FROM locations WHERE tenant_id = %s", (tenant_id,)).fetchone()
    assert recorded is not None
    name, dsn, status = recorded
    assert status == "provisioning"
    psycopg.connect(libpq(dsn)).close()  # the control: the silo database exists
    monkeypatch.undo()

    gone = await wf_admin.delete(f"/v1/tenants/{tenant_id}")
    assert gone.status_code == 202, gone.text
    cleanup = await wait_job(wf_admin, gone.json()["job"]["id"])
    assert cleanup["status"] == "succeeded", cleanup
    assert (await wf_admin.get(f"/v1/tenants/{tenant_id}")).json()["status"] == "deleted"
    with psycopg.connect(libpq(wf_endpoints.catalog_url)) as conn:
        after = conn.execute("SELECT status FROM locations WHERE name = %s", (name,)).fetchone()
    assert after == ("deleted",)
    with pytest.raises(psycopg.OperationalError, match="does not exist"):
        psycopg.connect(libpq(dsn)).close()


async def test_onboarding_migrates_its_silo_only_while_no_fleet_migration_runs(
    wf_admin: httpx.AsyncClient, wf_endpoints: Endpoints
) -> None:
    """The migrate step reads the pool's revision under the fleet interlock: a running
    fleet migration makes it wait (not fail, not migrate past the runner)."""
    import asyncio

    from control_plane.interlock import fleet_migration_lock

    with fleet_migration_lock(wf_endpoints.catalog_url):
        created = await wf_admin.post("/v1/tenants", json={"slug": slug(), "name": "Racy", "tier": "enterprise"})
        job_id = created.headers["X-Tenantctl-Job"]
        deadline = time.monotonic() + 60
        while (job := (await wf_admin.get(f"/v1/jobs/{job_id}")).json())["detail"].get("waiting_for") is None:
            assert job["status"] in ("pending", "running"), job
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.1)
        assert (job["status"], job["step"]) == ("running", "migrate"), job
        assert job["detail"] == {"waiting_for": "fleet_migration"}
        with psycopg.connect(libpq(wf_endpoints.catalog_url)) as conn:
            row = conn.execute(
                "SELECT dsn, status FROM locations WHERE tenant_id = %s", (created.json()["id"],)
            ).fetchone()
        assert row is not None and row[1] == "provisioning"
        silo_dsn = str(row[0])
        assert schema.current_revision(silo_dsn) is None  # nothing applied behind the runner's back

    job = await wait_job(wf_admin, job_id)
    assert job["status"] == "succeeded", job
    assert schema.current_revision(silo_dsn) == schema.current_revision(wf_endpoints.pool_url)
    offboarded = await wf_admin.delete(f"/v1/tenants/{created.json()['id']}")
    assert (await wait_job(wf_admin, offboarded.json()["job"]["id"]))["status"] == "succeeded"
