"""A job survives the death of its process: kill -9 the worker mid-offboarding, restart it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from control_plane.api import create_app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.workflows import export
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


def _pool_rows(pool_url: str, tenant_id: str) -> int:
    with psycopg.connect(libpq(pool_url)) as conn:
        row = conn.execute(
            "SELECT (SELECT count(*) FROM projects WHERE tenant_id = %s) + "
            "(SELECT count(*) FROM tasks WHERE tenant_id = %s)",
            (tenant_id, tenant_id),
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _poll(client: httpx.AsyncClient, job_id: str, done: Any, timeout: float, log: Path) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if done(job):
            return job
        assert time.monotonic() < deadline, f"{job}\n--- worker log ---\n{log.read_text()}"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize(
    "successor",
    [
        pytest.param("crashy", id="restarted-under-its-name"),
        pytest.param("rescuer", id="adopted-by-another-worker"),
    ],
)
async def test_killing_the_worker_mid_offboarding_and_restarting_finishes_exactly_once(
    cp_settings: ControlPlaneSettings, endpoints: Endpoints, tmp_path: Path, successor: str
) -> None:
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
    )
    log = tmp_path / "worker.log"
    workers: list[subprocess.Popen[bytes]] = []
    clients = asgi_client(create_app(cp_settings, endpoints))
    client = await anext(clients)
    client.headers.update(admin_headers(cp_settings))
    try:
        tenant = (await client.post("/v1/tenants", json={"slug": "doomed", "name": "D", "tier": "free"})).json()
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

        workers.append(_worker(env, log))
        job_id = (await client.delete(f"/v1/tenants/{tenant['id']}")).json()["job"]["id"]
        mid = await _poll(
            client,
            job_id,
            lambda j: j["step"] == "delete" and j["detail"].get("rows_deleted", 0) >= 8,
            timeout=60,
            log=log,
        )
        assert mid["status"] == "running"
        manifest_path = export.export_dir_for(cp_settings.export_dir, uuid.UUID(tenant["id"])) / "manifest.json"
        manifest_before = manifest_path.read_text()

        workers[0].kill()  # SIGKILL: no cleanup, no graceful shutdown
        workers[0].wait(10)
        left = _pool_rows(endpoints.pool_url, tenant["id"])
        assert 0 < left < 40, "the kill should land in the middle of the delete"
        await asyncio.sleep(0.5)
        assert (await client.get(f"/v1/jobs/{job_id}")).json()["status"] == "running"

        env["TENANTCTL_TEST_STEP_DELAY_SECONDS"] = "0"
        workers.append(_worker(env, log, successor))
        final = await _poll(client, job_id, lambda j: j["status"] not in ("pending", "running"), 60, log)

        assert final["status"] == "succeeded", final
        assert final["progress"] == 1.0
        assert _pool_rows(endpoints.pool_url, tenant["id"]) == 0
        assert (await client.get(f"/v1/tenants/{tenant['id']}")).json()["status"] == "deleted"
        # Exactly once: the export was not redone, the tombstone happened once.
        assert manifest_path.read_text() == manifest_before
        manifest = json.loads(manifest_before)
        assert sum(t["rows"] for t in manifest["tables"]) == 40
        actions = [action for _, action in audit_entries(endpoints.catalog_url, tenant["id"])]
        assert actions.count("tenant.offboard") == 1
        assert actions.count("tenant.tombstone") == 1
        with psycopg.connect(libpq(endpoints.catalog_url)) as conn:
            row = conn.execute(
                "SELECT status, executor_id, recovery_attempts FROM dbos.workflow_status WHERE workflow_uuid = %s",
                (job_id,),
            ).fetchone()
        assert row is not None
        assert row[0] == "SUCCESS"
        assert row[1] == successor
    finally:
        await clients.aclose()
        for proc in workers:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
