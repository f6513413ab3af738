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
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
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


def _replication_leftovers(servers: PgServers) -> list[tuple[Any, ...]]:
    leftovers: list[tuple[Any, ...]] = []
    for admin in {servers.main_admin, servers.silo_admin}:
        with psycopg.connect(libpq(admin), autocommit=True) as conn:
            leftovers += conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall()
            leftovers += conn.execute("SELECT subname FROM pg_subscription").fetchall()
    return leftovers


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
    in_silo = _ids(silo_dsn[0], mover["id"])
    assert set(acknowledged) <= in_silo  # I2: every acknowledged write is in the new home
    assert len(in_silo) == 20 + len(acknowledged)  # I3: nothing else
    assert _ids(wf_endpoints.pool_url, mover["id"]) == set()  # cleaned after the (zero) grace period
    assert _ids(silo_dsn[0], bystander["id"]) == set()  # no foreign rows in the silo
    assert len(_ids(wf_endpoints.pool_url, bystander["id"])) == 1  # bystander untouched
    assert _replication_leftovers(pg_servers) == []
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
    assert _replication_leftovers(pg_servers) == []


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


async def test_cancel_before_the_flip_leaves_the_source_untouched(
    wf_admin: httpx.AsyncClient,
    api: httpx.AsyncClient,
    wf_settings: ControlPlaneSettings,
    wf_endpoints: Endpoints,
    pg_servers: PgServers,
    tweak: Any,
) -> None:
    tweak(test_step_delay_seconds=1.5)
    mover = await _tenant(wf_admin, wf_settings)
    for i in range(5):
        await api.post("/v1/projects", headers=mover["headers"], json={"name": f"keep-{i}"})
    before = _ids(wf_endpoints.pool_url, mover["id"])
    job = (await wf_admin.post(f"/v1/tenants/{mover['id']}/promote")).json()["job"]
    deadline = time.monotonic() + 60
    while (await wf_admin.get(f"/v1/jobs/{job['id']}")).json()["step"] not in ("replicate", "catch_up"):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    cancelled = await wf_admin.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code in (200, 202), cancelled.text
    finished = await _wait_job(wf_admin, job["id"])
    assert finished["status"] == "cancelled", finished
    tenant = (await wf_admin.get(f"/v1/tenants/{mover['id']}")).json()
    assert tenant["status"] == "active" and tenant["placement"]["kind"] == "pool"
    assert tenant["route_epoch"] == mover["route_epoch"]
    assert _ids(wf_endpoints.pool_url, mover["id"]) == before
    written = await api.post("/v1/projects", headers=mover["headers"], json={"name": "after-cancel"})
    assert written.status_code == 201  # the source serves (unfenced)
    assert _replication_leftovers(pg_servers) == []
    with psycopg.connect(libpq(wf_endpoints.catalog_url)) as cat:
        statuses = cat.execute(
            "SELECT status FROM locations WHERE tenant_id = %s AND kind = 'silo'", (mover["id"],)
        ).fetchall()
    assert all(s[0] == "deleted" for s in statuses)
