"""Promotion and demotion end to end: admin API -> DBOS workflow -> tenant API under load."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import psycopg
import pytest

from control_plane import keys
from control_plane.exceptions import MigrationFailedError, MoveError, ProvisioningError
from control_plane.fleet.runner import FleetOptions, run_fleet
from control_plane.interlock import fleet_migration_lock
from control_plane.moves import engine
from control_plane.moves import verify as verify_mod
from control_plane.moves.engine import MovePlan, Side
from control_plane.provisioning import SiloLocation, SiloProvisioner, SiloSpec
from control_plane.provisioning.naming import silo_database_name
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.workflows import moves as move_workflows
from control_plane.workflows.executor import Executor
from control_plane.workflows.kinds import PROMOTION
from data_plane.api import create_app as create_tenant_app
from data_plane.dsn import libpq
from data_plane.settings import DataPlaneSettings
from tests.harness import PgServers, asgi_client

pytestmark = pytest.mark.slow


@pytest.fixture
async def api(wf_settings: ControlPlaneSettings, wf_endpoints: Endpoints) -> AsyncIterator[httpx.AsyncClient]:
    settings = DataPlaneSettings(
        state_dir=wf_settings.state_dir,
        environment="test",
        app_catalog_url=wf_endpoints.app_catalog_url,
        app_pool_url=wf_endpoints.app_pool_url,
    )
    async for client in asgi_client(create_tenant_app(settings)):
        yield client


async def _tenant(admin: httpx.AsyncClient, settings: ControlPlaneSettings, tier: str = "standard") -> dict[str, Any]:
    slug = f"mv-{uuid.uuid4().hex[:8]}"
    created = await admin.post("/v1/tenants", json={"slug": slug, "name": slug, "tier": tier})
    assert created.status_code == 201, created.text
    tenant = created.json()
    token = keys.tenant_token(settings, tenant_id=uuid.UUID(tenant["id"]))
    return {**tenant, "headers": {"Authorization": f"Bearer {token}"}}


async def _wait_job(admin: httpx.AsyncClient, job_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = (await admin.get(f"/v1/jobs/{job_id}")).json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def _move_leftovers(servers: PgServers, *databases: str) -> dict[str, list[Any]]:
    """Everything a move may leave behind that it must not: an orphaned slot fills the pool's disk.

    Slots and subscriptions are per cluster (both clusters are checked);
    publications, change-tracking triggers and recorded changes are per
    database (``databases``: the pool, and any silo that still exists).
    """
    found: dict[str, list[Any]] = {"slots": [], "subscriptions": [], "publications": [], "triggers": [], "changes": []}
    for admin in {servers.main_admin, servers.silo_admin}:
        with psycopg.connect(libpq(admin), autocommit=True) as conn:
            found["slots"] += [r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots")]
            found["subscriptions"] += [r[0] for r in conn.execute("SELECT subname FROM pg_subscription")]
    for dsn in databases:
        with psycopg.connect(libpq(dsn), autocommit=True) as conn:
            found["publications"] += [r[0] for r in conn.execute("SELECT pubname FROM pg_publication")]
            found["triggers"] += [
                r[0] for r in conn.execute("SELECT tgname FROM pg_trigger WHERE tgname LIKE 'tc\\_track\\_%'")
            ]
            found["changes"] += [r[0] for r in conn.execute("SELECT DISTINCT move_id FROM tenantctl.move_changes")]
    return {kind: names for kind, names in found.items() if names}


def _silo_exists(servers: PgServers, slug: str) -> bool:
    with psycopg.connect(libpq(servers.silo_admin), autocommit=True) as conn:
        return (
            conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (silo_database_name(slug),)).fetchone()
            is not None
        )


def _silo_statuses(catalog_url: str, tenant_id: str) -> list[str]:
    with psycopg.connect(libpq(catalog_url)) as cat:
        rows = cat.execute("SELECT status FROM locations WHERE tenant_id = %s AND kind = 'silo'", (tenant_id,))
        return [str(r[0]) for r in rows]


def _silo_dsn(catalog_url: str, tenant_id: str) -> str:
    with psycopg.connect(libpq(catalog_url)) as cat:
        row = cat.execute(
            "SELECT l.dsn FROM tenants t JOIN locations l ON l.id = t.location_id WHERE t.id = %s", (tenant_id,)
        ).fetchone()
    assert row is not None
    return str(row[0])


def _no_tenant_moving(catalog_url: str) -> None:
    """A fleet migration can start: no tenant was left ``moving``."""
    with fleet_migration_lock(catalog_url, timeout_s=5):
        pass


async def _assert_back_in_the_pool(
    admin: httpx.AsyncClient,
    api: httpx.AsyncClient,
    tenant: dict[str, Any],
    pool_url: str,
    before: set[str],
    *,
    catalog_url: str,
) -> None:
    """The source stayed authoritative: active in the pool, same route, same rows, and it serves writes."""
    current = (await admin.get(f"/v1/tenants/{tenant['id']}")).json()
    assert current["status"] == "active" and current["placement"]["kind"] == "pool", current
    assert current["route_epoch"] == tenant["route_epoch"]
    assert _ids(pool_url, tenant["id"]) == before
    assert _next_location(catalog_url, tenant["id"]) is None  # replicas stop connecting to the target
    written = await api.post("/v1/projects", headers=tenant["headers"], json={"name": "after-abort"})
    assert written.status_code == 201, written.text  # unfenced: the pool serves the tenant


def _next_location(catalog_url: str, tenant_id: str) -> Any:
    """The target a move announced in the tenant's route; cleared once the move flips or is undone."""
    with psycopg.connect(libpq(catalog_url)) as cat:
        row = cat.execute("SELECT next_location_id FROM tenants WHERE id = %s", (tenant_id,)).fetchone()
    assert row is not None
    return row[0]


def _ids(dsn: str, tenant_id: str) -> set[str]:
    with psycopg.connect(libpq(dsn)) as conn:
        return {str(r[0]) for r in conn.execute("SELECT id FROM projects WHERE tenant_id = %s", (tenant_id,))}


async def test_promote_then_demote_under_writes(
    wf_admin: httpx.AsyncClient,
    api: httpx.AsyncClient,
    wf_settings: ControlPlaneSettings,
    wf_endpoints: Endpoints,
    pg_servers: PgServers,
    tweak: Any,
) -> None:
    tweak(move_cleanup_grace_seconds=0)
    mover = await _tenant(wf_admin, wf_settings)
    bystander = await _tenant(wf_admin, wf_settings)
    canary = f"canary-{uuid.uuid4().hex}"
    assert (await api.post("/v1/projects", headers=bystander["headers"], json={"name": canary})).status_code == 201
    for i in range(20):
        assert (await api.post("/v1/projects", headers=mover["headers"], json={"name": f"seed-{i}"})).status_code == 201

    acknowledged: list[str] = []
    unexpected: list[str] = []
    stop = asyncio.Event()

    async def writer() -> None:
        while not stop.is_set():
            response = await api.post("/v1/projects", headers=mover["headers"], json={"name": "live"})
            if response.status_code == 201:
                acknowledged.append(response.json()["id"])
            elif response.status_code != 503:
                unexpected.append(response.text)
            await asyncio.sleep(0.01)

    async def reader() -> None:
        while not stop.is_set():
            response = await api.get("/v1/projects", headers=mover["headers"], params={"limit": "200"})
            if response.status_code not in (200, 503) or canary in response.text:
                unexpected.append(response.text)
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(writer()), asyncio.create_task(reader())]
    try:
        promoted = await wf_admin.post(f"/v1/tenants/{mover['id']}/promote")
        assert promoted.status_code == 202, promoted.text
        job = promoted.json()["job"]
        assert job["kind"] == "promotion"
        duplicate = await wf_admin.post(f"/v1/tenants/{mover['id']}/promote")
        assert duplicate.status_code == 409
        finished = await _wait_job(wf_admin, job["id"])
        assert finished["status"] == "succeeded", finished
        await asyncio.sleep(0.3)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert unexpected == []
    assert len(acknowledged) > 10  # the writer really wrote through the move
    tenant = (await wf_admin.get(f"/v1/tenants/{mover['id']}")).json()
    assert tenant["placement"]["kind"] == "silo" and tenant["status"] == "active"
    assert tenant["route_epoch"] == mover["route_epoch"] + 1
    with psycopg.connect(libpq(wf_endpoints.catalog_url)) as cat:
        silo_dsn = cat.execute(
            "SELECT l.dsn FROM tenants t JOIN locations l ON l.id = t.location_id WHERE t.id = %s", (mover["id"],)
        ).fetchone()
    assert silo_dsn is not None
    assert _next_location(wf_endpoints.catalog_url, mover["id"]) is None  # the flip cleared the announcement
    in_silo = _ids(silo_dsn[0], mover["id"])
    assert set(acknowledged) <= in_silo  # I2: every acknowledged write is in the new home
    assert len(in_silo) == 20 + len(acknowledged)  # I3: nothing else
    assert _ids(wf_endpoints.pool_url, mover["id"]) == set()  # cleaned after the (zero) grace period
    assert _ids(silo_dsn[0], bystander["id"]) == set()  # no foreign rows in the silo
    assert len(_ids(wf_endpoints.pool_url, bystander["id"])) == 1  # bystander untouched
    assert _move_leftovers(pg_servers, wf_endpoints.pool_url, silo_dsn[0]) == {}
    me = (await api.get("/v1/me", headers=mover["headers"])).json()
    assert me["placement"]["kind"] == "silo"

    # And back: demotion to the pool, silo deprovisioned.
    demoted = await wf_admin.post(f"/v1/tenants/{mover['id']}/demote", json={"mode": "offline"})
    assert demoted.status_code == 202, demoted.text
    finished = await _wait_job(wf_admin, demoted.json()["job"]["id"])
    assert finished["status"] == "succeeded", finished
    assert _ids(wf_endpoints.pool_url, mover["id"]) == in_silo
    assert (await api.get("/v1/me", headers=mover["headers"])).json()["placement"]["kind"] == "pool"
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(libpq(silo_dsn[0])).close()  # the silo database is gone
    assert _move_leftovers(pg_servers, wf_endpoints.pool_url) == {}


async def test_promote_preconditions_are_409(
    wf_admin: httpx.AsyncClient, wf_settings: ControlPlaneSettings, tweak: Any
) -> None:
    suspended = await _tenant(wf_admin, wf_settings)
    assert (await wf_admin.post(f"/v1/tenants/{suspended['id']}/suspend")).status_code == 200
    refused = await wf_admin.post(f"/v1/tenants/{suspended['id']}/promote")
    assert refused.status_code == 409
    pool_tenant = await _tenant(wf_admin, wf_settings)
    refused = await wf_admin.post(f"/v1/tenants/{pool_tenant['id']}/demote")
    assert refused.status_code == 409  # already in the pool
    invalid = await wf_admin.post(f"/v1/tenants/{pool_tenant['id']}/promote", json={"mode": "teleport"})
    assert invalid.status_code == 422


PRE_FLIP_STEPS = PROMOTION.steps[: PROMOTION.steps.index(PROMOTION.point_of_no_return or "")]


async def _wait_for_step(admin: httpx.AsyncClient, job_id: str, step: str) -> None:
    deadline = time.monotonic() + 60
    while (job := (await admin.get(f"/v1/jobs/{job_id}")).json())["step"] != step:
        assert job["status"] in ("pending", "running"), job
        assert job["step"] is None or PROMOTION.steps.index(job["step"]) < PROMOTION.steps.index(step), job
        assert time.monotonic() < deadline, job
        await asyncio.sleep(0.03)


@pytest.mark.parametrize("step", PRE_FLIP_STEPS)
async def test_cancel_before_the_flip_leaves_the_source_untouched(
    wf_admin: httpx.AsyncClient,
    api: httpx.AsyncClient,
    wf_settings: ControlPlaneSettings,
    wf_endpoints: Endpoints,
    pg_servers: PgServers,
    tweak: Any,
    step: str,
) -> None:
    assert PRE_FLIP_STEPS == ("provision", "migrate", "plan", "prepare", "replicate", "catch_up", "cutover")
    tweak(test_step_delay_seconds=0.6)  # every step pauses at its end: room for the cancel to land in it
    mover = await _tenant(wf_admin, wf_settings)
    for i in range(5):
        await api.post("/v1/projects", headers=mover["headers"], json={"name": f"keep-{i}"})
    before = _ids(wf_endpoints.pool_url, mover["id"])
    job = (await wf_admin.post(f"/v1/tenants/{mover['id']}/promote")).json()["job"]
    await _wait_for_step(wf_admin, job["id"], step)
    if PRE_FLIP_STEPS.index(step) > PRE_FLIP_STEPS.index("plan"):
        assert _next_location(wf_endpoints.catalog_url, mover["id"]) is not None  # the plan announced the target
    cancelled = await wf_admin.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code in (200, 202), cancelled.text
    finished = await _wait_job(wf_admin, job["id"])
    assert (finished["status"], finished["step"]) == ("cancelled", step), finished
    await _assert_back_in_the_pool(
        wf_admin, api, mover, wf_endpoints.pool_url, before, catalog_url=wf_endpoints.catalog_url
    )
    assert _move_leftovers(pg_servers, wf_endpoints.pool_url) == {}
    assert all(status == "deleted" for status in _silo_statuses(wf_endpoints.catalog_url, mover["id"]))
    assert not _silo_exists(pg_servers, mover["slug"])
    _no_tenant_moving(wf_endpoints.catalog_url)


class _FailsAfterCreating:
    """A provisioner whose ``provision`` creates the silo, then fails (e.g. the endpoint never answers)."""

    def __init__(self, real: SiloProvisioner) -> None:
        self.real = real
        self.kind = real.kind

    def provision(self, spec: SiloSpec) -> SiloLocation:
        self.real.provision(spec)
        raise ProvisioningError("injected: the new silo never became reachable")

    def deprovision(self, location: SiloLocation) -> None:
        self.real.deprovision(location)

    def describe(self, location: SiloLocation) -> dict[str, Any]:
        return self.real.describe(location)


def _flip_statements_pending(catalog_url: str) -> bool:
    """Another session holds a row lock from an UPDATE of ``tenants`` (the flip's, not yet committed)."""
    with psycopg.connect(libpq(catalog_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = 'tenants'::regclass "
            "AND mode = 'RowExclusiveLock' AND pid <> pg_backend_pid()"
        ).fetchone()
    return row is not None and int(row[0]) > 0


@pytest.mark.parametrize("failing_step", ["provision", "migrate", "catch_up", "cutover", "final_catch_up"])
async def test_a_failure_before_the_flip_is_compensated(
    wf_admin: httpx.AsyncClient,
    api: httpx.AsyncClient,
    wf_settings: ControlPlaneSettings,
    wf_endpoints: Endpoints,
    pg_servers: PgServers,
    executor: Executor,
    tweak: Any,
    monkeypatch: pytest.MonkeyPatch,
    failing_step: str,
) -> None:
    """Steps outside the copy itself fail too; the tenant must not stay ``moving`` with a slot left behind."""
    if failing_step == "provision":
        tweak(provisioner=_FailsAfterCreating(executor.context.provisioner()))
    elif failing_step == "migrate":

        def fail_migration(*args: Any, **kwargs: Any) -> None:
            raise MigrationFailedError("injected: migrating the new silo failed")

        monkeypatch.setattr(move_workflows, "migrate_target_to", fail_migration)
    elif failing_step == "cutover":
        # The fenced verification finds a difference -- once the flip's
        # statements, run alongside it, are in (uncommitted): they must roll back.
        def mismatch_once_the_flip_waits(*args: Any, **kwargs: Any) -> dict[str, Any]:
            deadline = time.monotonic() + 10
            while not _flip_statements_pending(wf_endpoints.catalog_url):
                assert time.monotonic() < deadline, "the flip's statements never ran during the verification"
                time.sleep(0.01)
            return {"projects": {"injected": "difference"}}

        monkeypatch.setattr(verify_mod, "_mismatches", mismatch_once_the_flip_waits)
    elif failing_step == "final_catch_up":
        # Replication breaks just before the fence: the target already holds a
        # key the source writes now, so its apply worker fails on it, every retry,
        # and the fence's marker never arrives.
        clash, fence = uuid.uuid4(), engine.fence_source

        def clash_then_fence(plan: MovePlan, **kwargs: Any) -> None:
            for dsn, name in ((plan.target.owner(), "in the way"), (plan.source.owner(), "live")):
                with psycopg.connect(libpq(dsn)) as conn:
                    conn.execute(
                        "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, %s)", (plan.tenant_id, clash, name)
                    )
            fence(plan, **kwargs)

        monkeypatch.setattr(engine, "fence_source", clash_then_fence)
    else:
        # The replication slot exists and the subscription runs, but the target never catches up
        # (as seen by the gate); a tiny retry budget makes the step give up quickly.
        monkeypatch.setattr(engine, "replication_lag", lambda plan: 1 << 40)
        tweak(move_catch_up_timeout_seconds=0.2, move_catch_up_backoff_seconds=[0.1, 0.1])
    mover = await _tenant(wf_admin, wf_settings)
    for i in range(5):
        await api.post("/v1/projects", headers=mover["headers"], json={"name": f"keep-{i}"})
    before = _ids(wf_endpoints.pool_url, mover["id"])
    if failing_step == "final_catch_up":
        before.add(str(clash))  # written to the source, which stays authoritative: kept
    job = (await wf_admin.post(f"/v1/tenants/{mover['id']}/promote")).json()["job"]
    finished = await _wait_job(wf_admin, job["id"])
    step = "cutover" if failing_step == "final_catch_up" else failing_step  # the final catch-up is in the cutover
    assert (finished["status"], finished["step"]) == ("failed", step), finished
    expected = {
        "catch_up": "MoveNotReadyError: replication lag",
        "cutover": "verification failed",
        "final_catch_up": "MoveError: replication to the target failed during the final catch-up",
    }.get(failing_step, "injected")
    assert expected in finished["error"] and "compensated" in finished["error"], finished
    await _assert_back_in_the_pool(
        wf_admin, api, mover, wf_endpoints.pool_url, before, catalog_url=wf_endpoints.catalog_url
    )
    assert _move_leftovers(pg_servers, wf_endpoints.pool_url) == {}
    assert all(status == "deleted" for status in _silo_statuses(wf_endpoints.catalog_url, mover["id"]))
    assert not _silo_exists(pg_servers, mover["slug"])
    _no_tenant_moving(wf_endpoints.catalog_url)
    with psycopg.connect(libpq(wf_endpoints.catalog_url)) as cat:
        flips = cat.execute(
            "SELECT count(*) FROM audit_log WHERE tenant_id = %s AND action = 'tenant.finish_move' "
            "AND detail->>'to' = 'silo'",
            (mover["id"],),
        ).fetchone()
    assert flips == (0,)  # no flip's audit entry: it rolled back with the rest of the flip


async def test_a_failure_after_the_activation_does_not_undo_a_committed_flip(
    wf_admin: httpx.AsyncClient,
    api: httpx.AsyncClient,
    wf_settings: ControlPlaneSettings,
    wf_endpoints: Endpoints,
    tweak: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The flip commits once the target is activated; the cutover's thread still closes its reads after that.

    A failure there (here: after everything) comes after the point of no
    return: the move must go forward, not compensate a route already flipped.
    """
    real = move_workflows.verify_incremental

    def fails_after_activating(*args: Any, **kwargs: Any) -> dict[str, Any]:
        real(*args, **kwargs)
        raise OSError("injected: closing the verification's connections failed")

    monkeypatch.setattr(move_workflows, "verify_incremental", fails_after_activating)
    tweak(move_cleanup_grace_seconds=0)
    mover = await _tenant(wf_admin, wf_settings)
    for i in range(3):
        await api.post("/v1/projects", headers=mover["headers"], json={"name": f"keep-{i}"})
    before = _ids(wf_endpoints.pool_url, mover["id"])
    job = (await wf_admin.post(f"/v1/tenants/{mover['id']}/promote")).json()["job"]
    finished = await _wait_job(wf_admin, job["id"])
    assert finished["status"] == "succeeded", finished
    current = (await wf_admin.get(f"/v1/tenants/{mover['id']}")).json()
    assert current["placement"]["kind"] == "silo" and current["route_epoch"] == mover["route_epoch"] + 1, current
    assert _ids(_silo_dsn(wf_endpoints.catalog_url, mover["id"]), mover["id"]) == before
    written = await api.post("/v1/projects", headers=mover["headers"], json={"name": "after-flip"})
    assert written.status_code == 201, written.text


async def _onboard_silo_tenant(
    admin: httpx.AsyncClient, api: httpx.AsyncClient, settings: ControlPlaneSettings
) -> dict[str, Any]:
    slug = f"mv-{uuid.uuid4().hex[:8]}"
    created = await admin.post("/v1/tenants", json={"slug": slug, "name": slug, "tier": "enterprise"})
    assert created.status_code == 201, created.text
    onboarded = await _wait_job(admin, created.headers["X-Tenantctl-Job"])
    assert onboarded["status"] == "succeeded", onboarded
    tenant = (await admin.get(f"/v1/tenants/{created.json()['id']}")).json()
    token = keys.tenant_token(settings, tenant_id=uuid.UUID(tenant["id"]))
    tenant["headers"] = {"Authorization": f"Bearer {token}"}
    for i in range(5):
        assert (await api.post("/v1/projects", headers=tenant["headers"], json={"name": f"s-{i}"})).status_code == 201
    return tenant


def _set_revision(dsn: str, revision: str) -> None:
    with psycopg.connect(libpq(dsn)) as conn:
        conn.execute("UPDATE alembic_version SET version_num = %s", (revision,))


def _revision(dsn: str) -> str:
    with psycopg.connect(libpq(dsn)) as conn:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert row is not None
    return str(row[0])


async def test_demotion_upgrades_a_lagging_silo_first_and_refuses_one_ahead_of_the_pool(
    wf_admin: httpx.AsyncClient,
    api: httpx.AsyncClient,
    wf_settings: ControlPlaneSettings,
    wf_endpoints: Endpoints,
    pg_servers: PgServers,
    tweak: Any,
) -> None:
    tweak(move_cleanup_grace_seconds=0)
    tenant = await _onboard_silo_tenant(wf_admin, api, wf_settings)
    silo = _silo_dsn(wf_endpoints.catalog_url, tenant["id"])
    rows = _ids(silo, tenant["id"])
    pool_revision = _revision(wf_endpoints.pool_url)

    # A silo at a revision newer than the pool's (migrated alone by newer code): never copied down.
    _set_revision(silo, "tenant_9999")
    refused = await _wait_job(wf_admin, (await wf_admin.post(f"/v1/tenants/{tenant['id']}/demote")).json()["job"]["id"])
    assert (refused["status"], refused["step"]) == ("failed", "migrate"), refused
    assert "SchemaRevisionMismatchError" in refused["error"] and "never downgrades" in refused["error"], refused
    current = (await wf_admin.get(f"/v1/tenants/{tenant['id']}")).json()
    assert (current["status"], current["placement"]["kind"]) == ("active", "silo"), current
    assert current["route_epoch"] == tenant["route_epoch"]
    written = await api.post("/v1/projects", headers=tenant["headers"], json={"name": "still-served"})
    assert written.status_code == 201, written.text
    rows.add(written.json()["id"])
    assert _ids(silo, tenant["id"]) == rows and _ids(wf_endpoints.pool_url, tenant["id"]) == set()
    _set_revision(silo, pool_revision)

    # A silo one revision behind (its fleet migration has not reached it): upgraded, then demoted online.
    # Without the upgrade the online copy cannot work: revision 0003 brings the change tracking it needs.
    report = await asyncio.to_thread(
        run_fleet,
        wf_endpoints.catalog_url,
        wf_endpoints.pool_url,
        FleetOptions(action="downgrade", revision="-1"),
        selector=tenant["slug"],
    )
    assert not report.failed and _revision(silo) != pool_revision, report.to_json()
    demoted = await _wait_job(wf_admin, (await wf_admin.post(f"/v1/tenants/{tenant['id']}/demote")).json()["job"]["id"])
    assert demoted["status"] == "succeeded", demoted
    current = (await wf_admin.get(f"/v1/tenants/{tenant['id']}")).json()
    assert current["placement"]["kind"] == "pool" and current["route_epoch"] == tenant["route_epoch"] + 1
    assert _ids(wf_endpoints.pool_url, tenant["id"]) == rows
    assert not _silo_exists(pg_servers, tenant["slug"])
    assert _move_leftovers(pg_servers, wf_endpoints.pool_url) == {}


async def test_demotion_cleanup_deprovisions_only_a_retired_silo(
    executor: Executor,
    wf_admin: httpx.AsyncClient,
    api: httpx.AsyncClient,
    wf_settings: ControlPlaneSettings,
    wf_endpoints: Endpoints,
    pg_servers: PgServers,
) -> None:
    tenant = await _onboard_silo_tenant(wf_admin, api, wf_settings)
    with psycopg.connect(libpq(wf_endpoints.catalog_url)) as cat:
        row = cat.execute(
            "SELECT l.id, l.name, l.provider, l.database, l.dsn, l.app_dsn, l.secret_ref, l.stack_name, l.detail "
            "FROM tenants t JOIN locations l ON l.id = t.location_id WHERE t.id = %s",
            (tenant["id"],),
        ).fetchone()
        pool_id = cat.execute("SELECT id FROM locations WHERE kind = 'pool'").fetchone()
    assert row is not None and pool_id is not None
    keys_ = ("id", "name", "provider", "database", "dsn", "app_dsn", "secret_ref", "stack_name", "detail")
    old = {k: (str(v) if k == "id" else v) for k, v in zip(keys_, row, strict=True)}
    plan = MovePlan(
        move_id=uuid.uuid4(),
        tenant_id=uuid.UUID(tenant["id"]),
        source=Side("silo", old["id"], old["dsn"], old["dsn"], ""),
        target=Side("pool", str(pool_id[0]), wf_endpoints.pool_url, wf_endpoints.pool_url, ""),
        epoch=tenant["route_epoch"],
    )
    # The silo still serves the tenant (e.g. the retire step never ran): refused, nothing dropped.
    with pytest.raises(MoveError, match="not been retired"):
        await move_workflows.deprovision_retired_silo(plan, old)
    assert _silo_exists(pg_servers, tenant["slug"])
    assert _silo_statuses(wf_endpoints.catalog_url, tenant["id"]) == ["ready"]
    assert (await api.get("/v1/projects", headers=tenant["headers"])).status_code == 200

    # Retired (answers "moved"): now it goes.
    with psycopg.connect(libpq(old["dsn"])) as conn:
        conn.execute("SELECT tenantctl.claim_tenant(%s, %s, 'moved')", (tenant["id"], tenant["route_epoch"]))
    await move_workflows.deprovision_retired_silo(plan, old)
    assert not _silo_exists(pg_servers, tenant["slug"])
    assert _silo_statuses(wf_endpoints.catalog_url, tenant["id"]) == ["deleted"]
    await move_workflows.deprovision_retired_silo(plan, old)  # a replay once the database is gone finishes
    await executor.context.release()  # this test's loop ends before the executor's


# -- before any worker runs the job (no executor on this catalog) ----------------------------------


async def _pool_tenant(admin: httpx.AsyncClient) -> dict[str, Any]:
    slug = f"mv-{uuid.uuid4().hex[:8]}"
    created = await admin.post("/v1/tenants", json={"slug": slug, "name": slug, "tier": "standard"})
    assert created.status_code == 201, created.text
    return dict(created.json())


@pytest.mark.parametrize("direction", ["promote", "demote"])
async def test_cancelling_a_pending_move_makes_the_tenant_active_again(
    admin: httpx.AsyncClient, endpoints: Endpoints, direction: str
) -> None:
    tenant = await _pool_tenant(admin)
    if direction == "demote":
        # Only the catalog's placement matters before a worker picks the job up.
        with psycopg.connect(libpq(endpoints.catalog_url)) as cat:
            cat.execute("UPDATE tenants SET placement = 'silo' WHERE id = %s", (tenant["id"],))
    started = await admin.post(f"/v1/tenants/{tenant['id']}/{direction}")
    assert started.status_code == 202, started.text
    job = started.json()["job"]
    assert job["status"] == "pending"
    assert (await admin.get(f"/v1/tenants/{tenant['id']}")).json()["status"] == "moving"
    cancelled = await admin.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code in (200, 202), cancelled.text
    assert cancelled.json()["job"]["status"] == "cancelled"
    current = (await admin.get(f"/v1/tenants/{tenant['id']}")).json()
    assert current["status"] == "active" and current["route_epoch"] == tenant["route_epoch"], current
    _no_tenant_moving(endpoints.catalog_url)
    again = await admin.post(f"/v1/tenants/{tenant['id']}/{direction}")  # and it can be moved again
    assert again.status_code == 202, again.text


async def test_a_move_is_refused_clearly_while_a_fleet_migration_runs(
    admin: httpx.AsyncClient, endpoints: Endpoints
) -> None:
    tenant = await _pool_tenant(admin)
    with fleet_migration_lock(endpoints.catalog_url):
        refused = await admin.post(f"/v1/tenants/{tenant['id']}/promote")
        assert refused.status_code == 409, refused.text
        error = refused.json()["error"]
        assert error["code"] == "migration_in_progress" and "fleet migration" in error["message"], error
        assert (await admin.get(f"/v1/tenants/{tenant['id']}")).json()["status"] == "active"
    with psycopg.connect(libpq(endpoints.catalog_url)) as cat:
        assert cat.execute("SELECT count(*) FROM jobs WHERE tenant_id = %s", (tenant["id"],)).fetchone() == (0,)
    accepted = await admin.post(f"/v1/tenants/{tenant['id']}/promote")  # the runner finished: allowed
    assert accepted.status_code == 202, accepted.text
    assert (await admin.get(f"/v1/tenants/{tenant['id']}")).json()["status"] == "moving"
