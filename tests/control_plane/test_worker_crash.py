"""A job survives the death of its process: kill -9 the worker mid-offboarding, restart it."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from control_plane.api import create_app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.workflows import export
from control_plane.workflows.executor import EXIT_LEASE_LOST
from data_plane.dsn import libpq
from tests.conftest import asgi_client
from tests.control_plane.conftest import admin_headers, audit_entries

pytestmark = pytest.mark.slow


def _worker(env: dict[str, str], log: Path, name: str = "crashy") -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            # The console script's way in (`tenantctl worker`), without relying on PATH.
            [sys.executable, "-c", "from control_plane.cli import main; main()", "worker", "--name", name],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def _worker_env(cp_settings: ControlPlaneSettings, endpoints: Endpoints) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTCTL_")}
    env.update(
        TENANTCTL_STATE_DIR=str(cp_settings.state_dir),
        TENANTCTL_ENVIRONMENT="test",
        TENANTCTL_CATALOG_URL=endpoints.catalog_url,
        TENANTCTL_POOL_URL=endpoints.pool_url,
        TENANTCTL_SILO_SERVER_URL=endpoints.silo_server_url,
        TENANTCTL_OFFBOARD_BATCH_SIZE="4",
        # The test hook: a pause after every batch, so the kill lands mid-delete.
        TENANTCTL_TEST_STEP_DELAY_SECONDS="0.3",
        TENANTCTL_WORKER_ADOPT_INTERVAL_SECONDS="0.5",
        # Short lease timings: an adoption waits out the dead worker's grace.
        TENANTCTL_WORKER_LEASE_CHECK_SECONDS="0.2",
        TENANTCTL_WORKER_LEASE_GRACE_SECONDS="1.0",
    )
    return env


def _pool_rows(pool_url: str, tenant_id: str) -> int:
    with psycopg.connect(libpq(pool_url)) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM projects WHERE tenant_id = %s) + "
            "(SELECT count(*) FROM tasks WHERE tenant_id = %s)",
            (tenant_id, tenant_id),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _doomed_tenant(client: httpx.AsyncClient, endpoints: Endpoints, slug: str) -> dict[str, Any]:
    """A pool tenant with 40 rows: 8 projects of 4 tasks (offboarded 4 rows per batch below)."""
    tenant: dict[str, Any] = (await client.post("/v1/tenants", json={"slug": slug, "name": "D", "tier": "free"})).json()
    with psycopg.connect(libpq(endpoints.pool_url)) as conn:
        for p in range(8):
            project = uuid.uuid4()
            conn.execute(
                "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, %s)",
                (tenant["id"], project, f"p{p}"),
            )
            for t in range(4):
                conn.execute(
                    "INSERT INTO tasks (tenant_id, id, project_id, title) VALUES (%s, %s, %s, %s)",
                    (tenant["id"], uuid.uuid4(), project, f"t{t}"),
                )
    assert _pool_rows(endpoints.pool_url, tenant["id"]) == 40
    return tenant


async def _poll(client: httpx.AsyncClient, job_id: str, done: Any, timeout: float, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"{job}\n--- worker log ---\n{log.read_text()}"
        await asyncio.sleep(0.05)


@dataclass
class _Scene:
    """An admin client, and `tenantctl worker` processes logging to one file."""

    client: httpx.AsyncClient
    endpoints: Endpoints
    env: dict[str, str]
    log: Path
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, name: str) -> subprocess.Popen[bytes]:
        self.workers.append(_worker(self.env, self.log, name))
        return self.workers[-1]

    async def offboard(self, slug: str) -> tuple[dict[str, Any], str]:
        """A 40-row tenant whose offboarding job is running its delete step."""
        tenant = await _doomed_tenant(self.client, self.endpoints, slug)
        job_id = (await self.client.delete(f"/v1/tenants/{tenant['id']}")).json()["job"]["id"]
        await _poll(self.client, job_id, lambda j: j["step"] == "delete", timeout=60, log=self.log)
        return tenant, job_id

    async def finished(self, job_id: str) -> dict[str, Any]:
        return await _poll(self.client, job_id, lambda j: j["status"] not in ("pending", "running"), 60, self.log)


@pytest.fixture
async def scene(cp_settings: ControlPlaneSettings, endpoints: Endpoints, tmp_path: Path) -> AsyncIterator[_Scene]:
    clients = asgi_client(create_app(cp_settings, endpoints))
    client = await anext(clients)
    client.headers.update(admin_headers(cp_settings))
    scene = _Scene(client, endpoints, _worker_env(cp_settings, endpoints), tmp_path / "worker.log")
    try:
        yield scene
    finally:
        await clients.aclose()
        _stop_all(scene.workers)


@pytest.mark.parametrize(
    "successor",
    [
        pytest.param("crashy", id="restarted-under-its-name"),
        pytest.param("rescuer", id="adopted-by-another-worker"),
    ],
)
async def test_killing_the_worker_mid_offboarding_and_restarting_finishes_exactly_once(
    scene: _Scene, cp_settings: ControlPlaneSettings, endpoints: Endpoints, successor: str
) -> None:
    client = scene.client
    tenant = await _doomed_tenant(client, endpoints, "doomed")

    worker = scene.start("crashy")
    job_id = (await client.delete(f"/v1/tenants/{tenant['id']}")).json()["job"]["id"]
    mid = await _poll(
        client,
        job_id,
        lambda j: j["step"] == "delete" and j["detail"].get("rows_deleted", 0) >= 8,
        timeout=60,
        log=scene.log,
    )
    assert mid["status"] == "running"
    manifest_path = export.export_dir_for(cp_settings.export_dir, uuid.UUID(tenant["id"])) / "manifest.json"
    manifest_before = manifest_path.read_text()

    worker.kill()  # SIGKILL: no cleanup, no graceful shutdown
    worker.wait(10)
    left = _pool_rows(endpoints.pool_url, tenant["id"])
    assert 0 < left < 40, "the kill should land in the middle of the delete"
    await asyncio.sleep(0.5)
    assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running"

    scene.env["TENANTCTL_TEST_STEP_DELAY_SECONDS"] = "0"
    scene.start(successor)
    final = await scene.finished(job_id)

    assert final["status"] == "succeeded", final
    assert final["progress"] == 1.0
    assert (await client.get(f"/v1/tenants/{tenant['id']}")).json()["status"] == "deleted"
    # Exactly once: the export was not redone, the tombstone happened once.
    assert manifest_path.read_text() == manifest_before
    manifest = json.loads(manifest_before)
    assert sum(t["rows"] for t in manifest["tables"]) == 40
    _assert_offboarded_once(endpoints, tenant["id"])
    assert await _finished_workflow(endpoints.catalog_url, job_id) == ("SUCCESS", successor)


def _lease_holder(catalog_url: str, name: str) -> int | None:
    """Backend pid holding executor ``name``'s lease (session advisory lock 7303, hashtext(name))."""
    with psycopg.connect(libpq(catalog_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objsubid = 2"
            " AND classid = 7303 AND objid = (hashtext(%s)::bigint & 4294967295)::oid",
            (name,),
        ).fetchone()
    return None if row is None else int(row[0])


def _drop_backend(catalog_url: str, pid: int) -> None:
    """What a catalog failover or a network cut does to one connection."""
    with psycopg.connect(libpq(catalog_url), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s)", (pid,))


async def _new_lease_holder(catalog_url: str, name: str, old: int, timeout: float = 15) -> int:
    deadline = time.monotonic() + timeout
    while True:
        pid = _lease_holder(catalog_url, name)
        if pid is not None and pid != old:
            return pid
        assert time.monotonic() < deadline, f"nobody took {name}'s lease back"
        await asyncio.sleep(0.02)


def _workflow_owner(catalog_url: str, job_id: str) -> tuple[str, str | None]:
    with psycopg.connect(libpq(catalog_url)) as conn:
        row = conn.execute(
            "SELECT status, executor_id FROM dbos.workflow_status WHERE workflow_uuid = %s", (job_id,)
        ).fetchone()
    assert row is not None
    return str(row[0]), row[1]


async def _finished_workflow(catalog_url: str, job_id: str) -> tuple[str, str | None]:
    """The workflow's final status and executor (the job row says "succeeded" a moment before DBOS)."""
    deadline = time.monotonic() + 10
    while (owner := _workflow_owner(catalog_url, job_id))[0] == "PENDING":
        assert time.monotonic() < deadline, owner
        await asyncio.sleep(0.02)
    return owner


def _stop_all(workers: list[subprocess.Popen[bytes]]) -> None:
    for proc in workers:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _assert_offboarded_once(endpoints: Endpoints, tenant_id: str) -> None:
    assert _pool_rows(endpoints.pool_url, tenant_id) == 0
    actions = [action for _, action in audit_entries(endpoints.catalog_url, tenant_id)]
    assert actions.count("tenant.offboard") == 1
    assert actions.count("tenant.tombstone") == 1


async def test_a_worker_whose_lease_connection_drops_takes_it_back_and_keeps_its_job(scene: _Scene) -> None:
    """A catalog failover cuts every connection, the lease's too: a live worker is not a dead one."""
    catalog = scene.endpoints.catalog_url
    worker = scene.start("keeper")
    tenant, job_id = await scene.offboard("dropped-lease")
    old = _lease_holder(catalog, "keeper")
    assert old is not None, "a running worker holds its lease"

    _drop_backend(catalog, old)
    await _new_lease_holder(catalog, "keeper", old)

    final = await scene.finished(job_id)
    assert final["status"] == "succeeded", final
    assert worker.poll() is None, "the worker took its lease back and kept running"
    assert await _finished_workflow(catalog, job_id) == ("SUCCESS", "keeper")
    _assert_offboarded_once(scene.endpoints, tenant["id"])
    assert "executor_lease_restored" in scene.log.read_text()


async def test_a_worker_that_cannot_take_its_lease_back_exits_before_its_job_is_adopted(scene: _Scene) -> None:
    """The lease is lost to an adopter while its holder is frozen (a GC pause, a stopped VM).

    The holder must stop running the job before the adopter starts it: two
    executors of one move would both fence, copy and flip.
    """
    catalog = scene.endpoints.catalog_url
    frozen = scene.start("frozen")
    tenant, job_id = await scene.offboard("lost-lease")
    scene.start("rescuer")
    old = _lease_holder(catalog, "frozen")
    assert old is not None

    frozen.send_signal(signal.SIGSTOP)
    _drop_backend(catalog, old)
    # Only the rescuer's adopter can hold it now: the frozen worker cannot run.
    await _new_lease_holder(catalog, "frozen", old)
    frozen.send_signal(signal.SIGCONT)

    deadline = time.monotonic() + 60
    while _workflow_owner(catalog, job_id) == ("PENDING", "frozen"):
        assert time.monotonic() < deadline, scene.log.read_text()
        await asyncio.sleep(0.01)
    assert frozen.poll() is not None, "the job was re-enqueued while its worker still ran it"
    assert frozen.returncode == EXIT_LEASE_LOST

    final = await scene.finished(job_id)
    assert final["status"] == "succeeded", final
    assert await _finished_workflow(catalog, job_id) == ("SUCCESS", "rescuer")
    _assert_offboarded_once(scene.endpoints, tenant["id"])
    assert "executor_lease_lost" in scene.log.read_text()
