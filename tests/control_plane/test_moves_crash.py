"""A move survives the death of its worker at any step: kill -9, restart, it finishes exactly once.

Every step of a promotion is killed once. A worker restart costs seconds and a
whole move many more, so one move is killed at each step of a group in turn
(two groups: before the flip, cutover and after). Each step ends with the test
pause (``TENANTCTL_TEST_STEP_DELAY_SECONDS``), so the kill lands while the step
is the current one and the restarted worker must run it again; a later kill
then interrupts a workflow that has already been recovered.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from control_plane.api import create_app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.workflows.kinds import PROMOTION
from data_plane.dsn import libpq
from tests.control_plane.conftest import admin_headers
from tests.harness import PgServers, asgi_client

pytestmark = pytest.mark.slow

STEP_DELAY = "0.25"


def _env(settings: ControlPlaneSettings, endpoints: Endpoints, *, grace: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTCTL_")}
    env.update(
        TENANTCTL_STATE_DIR=str(settings.state_dir),
        TENANTCTL_ENVIRONMENT="test",
        TENANTCTL_CATALOG_URL=endpoints.catalog_url,
        TENANTCTL_POOL_URL=endpoints.pool_url,
        TENANTCTL_POOL_ADMIN_URL=endpoints.pool_admin_url or "",
        TENANTCTL_SILO_SERVER_URL=endpoints.silo_server_url,
        TENANTCTL_TEST_STEP_DELAY_SECONDS=STEP_DELAY,
        TENANTCTL_MOVE_CLEANUP_GRACE_SECONDS=str(grace),
        TENANTCTL_WORKER_ADOPT_INTERVAL_SECONDS="0.5",
    )
    return env


class Workers:
    """``tenantctl worker --name mover`` processes, one alive at a time; a restart resumes its jobs."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.procs = [self._spawn()]

    def _spawn(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as handle:
            return subprocess.Popen(
                [sys.executable, "-c", "from control_plane.cli import main; main()", "worker", "--name", "mover"],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
            )

    def kill_and_restart(self) -> None:
        self.procs[-1].kill()
        self.procs[-1].wait(10)
        self.procs.append(self._spawn())

    def tail(self) -> str:
        return self.log.read_text()[-3000:]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
async def client(cp_settings: ControlPlaneSettings, endpoints: Endpoints) -> AsyncIterator[httpx.AsyncClient]:
    async for admin in asgi_client(create_app(cp_settings, endpoints)):
        admin.headers.update(admin_headers(cp_settings))
        yield admin


async def _promote(client: httpx.AsyncClient, endpoints: Endpoints, slug: str) -> tuple[dict[str, Any], str]:
    tenant = (await client.post("/v1/tenants", json={"slug": slug, "name": "C", "tier": "free"})).json()
    with psycopg.connect(libpq(endpoints.pool_url)) as conn:
        conn.execute(
            "INSERT INTO projects (tenant_id, id, name) SELECT %s, gen_random_uuid(), 'p' || g "
            "FROM generate_series(1, 200) g",
            (tenant["id"],),
        )
    return tenant, (await client.post(f"/v1/tenants/{tenant['id']}/promote")).json()["job"]["id"]


async def _wait_for_step(client: httpx.AsyncClient, job_id: str, step: str, workers: Workers) -> None:
    deadline = time.monotonic() + 90
    while True:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        if job["step"] == step:
            assert job["status"] == "running", job
            return
        assert job["status"] in ("pending", "running"), (job, workers.tail())
        assert job["step"] is None or PROMOTION.steps.index(job["step"]) < PROMOTION.steps.index(step), job
        assert time.monotonic() < deadline, (job, workers.tail())
        await asyncio.sleep(0.02)


async def _assert_promoted_exactly_once(
    client: httpx.AsyncClient,
    endpoints: Endpoints,
    pg_servers: PgServers,
    tenant: dict[str, Any],
    job_id: str,
    workers: Workers,
) -> None:
    deadline = time.monotonic() + 120
    while (job := (await client.get(f"/v1/jobs/{job_id}")).json())["status"] in ("pending", "running"):
        assert time.monotonic() < deadline, (job, workers.tail())
        await asyncio.sleep(0.1)
    assert job["status"] == "succeeded", (job, workers.tail())
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
        assert silo.execute("SELECT count(*) FROM projects WHERE tenant_id = %s", (tenant["id"],)).fetchone() == (200,)
    with psycopg.connect(libpq(endpoints.pool_url)) as pool:
        assert pool.execute("SELECT count(*) FROM projects WHERE tenant_id = %s", (tenant["id"],)).fetchone() == (0,)
        assert pool.execute("SELECT pubname FROM pg_publication").fetchall() == []
        assert pool.execute("SELECT tgname FROM pg_trigger WHERE tgname LIKE 'tc\\_track\\_%'").fetchall() == []
    for admin in {pg_servers.main_admin, pg_servers.silo_admin}:
        with psycopg.connect(libpq(admin), autocommit=True) as conn:
            assert conn.execute("SELECT slot_name FROM pg_replication_slots").fetchall() == []
            assert conn.execute("SELECT subname FROM pg_subscription").fetchall() == []


# Every step of a promotion, killed once: the restarted worker must run the interrupted step again.
IN_TURN = {
    "before-flip": ("provision", "migrate", "plan", "prepare", "replicate", "catch_up"),
    "cutover-and-after": ("cutover", "flip", "retire", "stop_replication", "cleanup"),
}


def test_every_step_is_killed_once() -> None:
    assert [step for steps in IN_TURN.values() for step in steps] == list(PROMOTION.steps)


@pytest.mark.parametrize("group", list(IN_TURN))
async def test_worker_killed_during_a_promotion_resumes_and_finishes(
    client: httpx.AsyncClient,
    cp_settings: ControlPlaneSettings,
    endpoints: Endpoints,
    pg_servers: PgServers,
    tmp_path: Path,
    group: str,
) -> None:
    """One move; its worker is killed at each step of ``group`` in turn and restarted each time."""
    steps = IN_TURN[group]
    # cleanup has no pause of its own; its grace period is the window for the kill.
    workers = Workers(_env(cp_settings, endpoints, grace=1.0 if "cleanup" in steps else 0.0), tmp_path / "w.log")
    try:
        tenant, job_id = await _promote(client, endpoints, f"crash-{group}")
        for step in steps:
            await _wait_for_step(client, job_id, step, workers)
            workers.kill_and_restart()
        await _assert_promoted_exactly_once(client, endpoints, pg_servers, tenant, job_id, workers)
    finally:
        workers.stop()


def _target_state(endpoints: Endpoints, tenant_id: str) -> tuple[str, int] | None:
    with psycopg.connect(libpq(endpoints.catalog_url)) as cat:
        row = cat.execute("SELECT dsn FROM locations WHERE tenant_id = %s AND kind = 'silo'", (tenant_id,)).fetchone()
    if row is None or not row[0]:
        return None
    with psycopg.connect(libpq(row[0])) as silo:
        owned = silo.execute(
            "SELECT state, epoch FROM tenantctl.tenant_ownership WHERE tenant_id = %s", (tenant_id,)
        ).fetchone()
    return None if owned is None else (str(owned[0]), int(owned[1]))


async def test_worker_killed_between_the_activation_and_the_flip_resumes_and_finishes(
    client: httpx.AsyncClient,
    cp_settings: ControlPlaneSettings,
    endpoints: Endpoints,
    pg_servers: PgServers,
    tmp_path: Path,
) -> None:
    """The replayed cutover takes the activated target back, fences again and verifies it again.

    Killed while the target serves the tenant and the flip is not committed:
    the activation deleted the target's copy of the fence marker, so the
    replayed fence must write one that reaches it (it used to wait 30 s for a
    marker that never came, then abort the move).
    """
    workers = Workers(_env(cp_settings, endpoints, grace=0.0), tmp_path / "w.log")
    try:
        tenant, job_id = await _promote(client, endpoints, "crash-activated")
        await _wait_for_step(client, job_id, "cutover", workers)
        deadline = time.monotonic() + 60
        while _target_state(endpoints, tenant["id"]) != ("active", tenant["route_epoch"] + 1):
            assert time.monotonic() < deadline, workers.tail()
            await asyncio.sleep(0.01)
        # The flip waits out the test pause after the activation: the route still names the pool.
        assert (await client.get(f"/v1/tenants/{tenant['id']}")).json()["route_epoch"] == tenant["route_epoch"]
        workers.kill_and_restart()
        await _assert_promoted_exactly_once(client, endpoints, pg_servers, tenant, job_id, workers)
    finally:
        workers.stop()
