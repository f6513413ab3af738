"""Scale-out: two data-plane processes and one worker process against one catalog.

* a suspend, and a route flip made by a promotion that the worker process runs,
  are seen by both replicas within one second (LISTEN/NOTIFY, no polling);
* with Redis configured, a tenant's rate limit holds across both replicas.

``redis-server`` is a test dependency installed by ``make install`` (Debian
package); without it this test fails rather than skips.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from control_plane import keys
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# The installed entry point, as operators run it (`python -m control_plane.cli`
# would make the fleet's fork server re-import the CLI as __main__).
TENANTCTL = str(Path(sys.executable).with_name("tenantctl"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def process(args: list[str], *, env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    assert binary is not None, "redis-server is missing: run `make install` (installs the Debian package as root)"
    port = free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with process(args, env={}, log=tmp_path / "redis.log"):
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
            assert time.monotonic() < deadline, (tmp_path / "redis.log").read_text()
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"


async def wait_healthy(url: str, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as client:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(f"{url}/healthz", timeout=2)
                if response.status_code == 200 and response.json().get("route_listener"):
                    return
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} not healthy:\n{log.read_text()[-4000:]}")


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> float:
    start = time.monotonic()
    while not await check():
        elapsed = time.monotonic() - start
        assert elapsed < seconds, f"not seen within {seconds}s"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
async def stack(
    cp_settings: ControlPlaneSettings, endpoints: Endpoints, redis_url: str, tmp_path: Path
) -> AsyncIterator[dict[str, Any]]:
    common = {"TENANTCTL_STATE_DIR": str(cp_settings.state_dir), "TENANTCTL_ENVIRONMENT": "test"}
    data_plane_env = {
        **common,
        "TENANTCTL_APP_CATALOG_URL": endpoints.app_catalog_url,
        "TENANTCTL_APP_POOL_URL": endpoints.app_pool_url,
        "TENANTCTL_REDIS_URL": redis_url,
        "TENANTCTL_RATE_LIMITS": json.dumps({"free": "6/minute", "standard": "1000/second"}),
        "TENANTCTL_LOG_FORMAT": "json",
    }
    worker_env = {
        **common,
        "TENANTCTL_CATALOG_URL": endpoints.catalog_url,
        "TENANTCTL_POOL_URL": endpoints.pool_url,
        "TENANTCTL_SILO_SERVER_URL": endpoints.silo_server_url,
        "TENANTCTL_POOL_ADMIN_URL": endpoints.pool_admin_url or endpoints.pool_url,
        "TENANTCTL_MOVE_CLEANUP_GRACE_SECONDS": "0",
    }
    ports = [free_port(), free_port()]
    logs = [tmp_path / "dp1.log", tmp_path / "dp2.log", tmp_path / "worker.log"]
    uvicorn = [sys.executable, "-m", "uvicorn", "--factory", "data_plane.api:create_app", "--host", "127.0.0.1"]
    with (
        process([*uvicorn, "--port", str(ports[0])], env=data_plane_env, log=logs[0]),
        process([*uvicorn, "--port", str(ports[1])], env=data_plane_env, log=logs[1]),
        process([TENANTCTL, "worker", "--name", "scale-out"], env=worker_env, log=logs[2]) as worker,
    ):
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        await asyncio.gather(*(wait_healthy(url, log) for url, log in zip(urls, logs, strict=False)))
        yield {"urls": urls, "worker": worker, "logs": logs}


async def _tenant(admin: httpx.AsyncClient, settings: ControlPlaneSettings, tier: str) -> dict[str, Any]:
    slug = f"so-{uuid.uuid4().hex[:8]}"
    created = await admin.post("/v1/tenants", json={"slug": slug, "name": slug, "tier": tier})
    assert created.status_code == 201, created.text
    tenant: dict[str, Any] = created.json()
    assert tenant["status"] == "active"
    token = keys.tenant_token(settings, tenant_id=uuid.UUID(tenant["id"]))
    return {**tenant, "headers": {"Authorization": f"Bearer {token}"}}


async def test_two_replicas_and_a_worker_share_routes_and_limits(
    stack: dict[str, Any], admin: httpx.AsyncClient, cp_settings: ControlPlaneSettings
) -> None:
    urls: list[str] = stack["urls"]
    free = await _tenant(admin, cp_settings, "free")
    suspended = await _tenant(admin, cp_settings, "standard")
    mover = await _tenant(admin, cp_settings, "standard")
    async with httpx.AsyncClient(timeout=10) as http:

        async def status(url: str, tenant: dict[str, Any], path: str = "/v1/me") -> int:
            return (await http.get(f"{url}{path}", headers=tenant["headers"])).status_code

        # Rate limit shared through Redis: 6 per minute in total, alternating replicas.
        assert [await status(urls[i % 2], free) for i in range(6)] == [200] * 6
        for url in urls:
            refused = await http.get(f"{url}/v1/me", headers=free["headers"])
            assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
        assert [await status(url, suspended) for url in urls] == [200, 200]  # control: other tenants unaffected

        # Suspend: both replicas refuse within a second; the others keep being served.
        assert [await status(url, mover) for url in urls] == [200, 200]  # cached on both now
        assert (await admin.post(f"/v1/tenants/{suspended['id']}/suspend")).status_code == 200

        async def both_refuse() -> bool:
            return [await status(url, suspended) for url in urls] == [403, 403]

        await within(1.0, both_refuse)
        assert [await status(url, mover) for url in urls] == [200, 200]
        assert (await admin.post(f"/v1/tenants/{suspended['id']}/resume")).status_code == 200

        async def both_serve() -> bool:
            return [await status(url, suspended) for url in urls] == [200, 200]

        await within(1.0, both_serve)

        # Route flip by a promotion run on the worker process.
        created = await http.post(f"{urls[0]}/v1/projects", json={"name": "moving"}, headers=mover["headers"])
        assert created.status_code == 201
        promoted = await admin.post(f"/v1/tenants/{mover['id']}/promote")
        assert promoted.status_code == 202, promoted.text
        job_id = promoted.json()["job"]["id"]
        deadline = time.monotonic() + 180
        while True:
            tenant = (await admin.get(f"/v1/tenants/{mover['id']}")).json()
            if tenant["route_epoch"] > mover["route_epoch"]:
                break  # the catalog flipped the route just now
            job = (await admin.get(f"/v1/jobs/{job_id}")).json()
            assert job["status"] in ("pending", "running"), f"{job}\n{stack['logs'][2].read_text()[-6000:]}"
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.02)

        async def both_on_silo() -> bool:
            placements = [
                (await http.get(f"{url}/v1/me", headers=mover["headers"])).json()["placement"]["kind"] for url in urls
            ]
            return placements == ["silo", "silo"]

        await within(1.0, both_on_silo)
        for url in urls:  # and both serve the tenant's rows from the silo
            listed = await http.get(f"{url}/v1/projects", headers=mover["headers"])
            assert listed.status_code == 200 and [p["name"] for p in listed.json()["data"]] == ["moving"]
        # The worker finishes the move (cleanup included) before the processes stop:
        # a subscription left behind would keep the pool's replication slot busy.
        while (job := (await admin.get(f"/v1/jobs/{job_id}")).json())["status"] in ("pending", "running"):
            assert time.monotonic() < deadline, job
            await asyncio.sleep(0.1)
        assert job["status"] == "succeeded", job
        assert stack["worker"].poll() is None  # the worker process ran it and is still up
