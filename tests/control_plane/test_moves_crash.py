"""A move survives the death of its worker at any step: kill -9, restart, it finishes exactly once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from control_plane.api import create_app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.dsn import libpq
from tests.control_plane.conftest import admin_headers
from tests.harness import PgServers, asgi_client

pytestmark = pytest.mark.slow


def _worker(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", "from control_plane.cli import main; main()", "worker", "--name", "mover"],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


@pytest.mark.parametrize("kill_at", ["migrate", "replicate", "catch_up", "cutover", "flip", "cleanup"])
async def test_worker_killed_during_a_promotion_resumes_and_finishes(
    cp_settings: ControlPlaneSettings, endpoints: Endpoints, pg_servers: PgServers, tmp_path: Path, kill_at: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTCTL_")}
    env.update(
        TENANTCTL_STATE_DIR=str(cp_settings.state_dir),
        TENANTCTL_ENVIRONMENT="test",
        TENANTCTL_CATALOG_URL=endpoints.catalog_url,
        TENANTCTL_POOL_URL=endpoints.pool_url,
        TENANTCTL_POOL_ADMIN_URL=endpoints.pool_admin_url or "",
        TENANTCTL_SILO_SERVER_URL=endpoints.silo_server_url,
        TENANTCTL_TEST_STEP_DELAY_SECONDS="0.5",
        TENANTCTL_MOVE_CLEANUP_GRACE_SECONDS="1",
        TENANTCTL_WORKER_ADOPT_INTERVAL_SECONDS="0.5",
    )
    log = tmp_path / "worker.log"
    workers = [_worker(env, log)]
    clients = asgi_client(create_app(cp_settings, endpoints))
    client = await anext(clients)
    client.headers.update(admin_headers(cp_settings))
    try:
        tenant = (
            await client.post(
                "/v1/tenants", json={"slug": f"crash-{kill_at.replace('_', '-')}", "name": "C", "tier": "free"}
            )
        ).json()
        with psycopg.connect(libpq(endpoints.pool_url)) as conn:
            conn.execute(
                "INSERT INTO projects (tenant_id, id, name) SELECT %s, gen_random_uuid(), 'p' || g "
                "FROM generate_series(1, 200) g",
                (tenant["id"],),
            )
        job_id = (await client.post(f"/v1/tenants/{tenant['id']}/promote")).json()["job"]["id"]
        deadline = time.monotonic() + 90
        while True:
            job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
            if job["step"] == kill_at or job["status"] not in ("pending", "running"):
                break
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.02)
        assert job["status"] == "running", job
        workers[0].kill()
        workers[0].wait(10)
        workers.append(_worker(env, log))
        while job["status"] in ("pending", "running"):
            assert time.monotonic() < deadline + 90, log.read_text()
            await asyncio.sleep(0.1)
            job = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert job["status"] == "succeeded", (job, log.read_text()[-3000:])
        moved = (await client.get(f"/v1/tenants/{tenant['id']}")).json()
        assert moved["placement"]["kind"] == "silo" and moved["route_epoch"] == tenant["route_epoch"] + 1
        with psycopg.connect(libpq(endpoints.catalog_url)) as cat:
            row = cat.execute(
                "SELECT l.dsn FROM tenants t JOIN locations l ON l.id = t.location_id WHERE t.id = %s", (tenant["id"],)
            ).fetchone()
            flips = cat.execute(
                "SELECT count(*) FROM audit_log WHERE tenant_id = %s AND action = 'tenant.finish_move'", (tenant["id"],)
            ).fetchone()
        assert flips == (1,)  # the route flipped exactly once
        assert row is not None
        with psycopg.connect(libpq(row[0])) as silo:
            assert silo.execute("SELECT count(*) FROM projects WHERE tenant_id = %s", (tenant["id"],)).fetchone() == (
                200,
            )
        with psycopg.connect(libpq(endpoints.pool_url)) as pool:
            assert pool.execute("SELECT count(*) FROM projects WHERE tenant_id = %s", (tenant["id"],)).fetchone() == (
                0,
            )
        for admin in {pg_servers.main_admin, pg_servers.silo_admin}:
            with psycopg.connect(libpq(admin), autocommit=True) as conn:
                assert conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall() == []
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
