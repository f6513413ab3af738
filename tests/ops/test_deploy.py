"""Container entry points and the rate limiter's storage choices."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from control_plane import deploy
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.exceptions import RateLimitedError
from data_plane.limits import TenantRateLimiter
from tests.conftest import asgi_client
from tests.ops.test_scale_out import free_port


async def test_admin_app_factory_reads_the_environment(
    cp_settings: ControlPlaneSettings, endpoints: Endpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "TENANTCTL_STATE_DIR": str(cp_settings.state_dir),
        "TENANTCTL_ENVIRONMENT": "test",
        "TENANTCTL_CATALOG_URL": endpoints.catalog_url,
        "TENANTCTL_POOL_URL": endpoints.pool_url,
        "TENANTCTL_SILO_SERVER_URL": endpoints.silo_server_url,
    }.items():
        monkeypatch.setenv(name, value)
    async for client in asgi_client(deploy.admin_app()):
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/v1/tenants")).status_code == 401  # control: still authenticated
        assert "tenantctl_moves_in_progress 0.0" in (await client.get("/metrics")).text


def test_deploy_main_needs_a_command() -> None:
    assert deploy.main([]) == 2


def test_bootstrap_refuses_missing_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TENANTCTL_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("TENANTCTL_MAIN_ADMIN_URL", raising=False)
    with pytest.raises(SystemExit, match="TENANTCTL_MAIN_ADMIN_URL"):
        deploy.run_bootstrap()


async def test_redis_outage_lets_requests_through() -> None:
    # Nothing listens on this port: the limiter must fail open, not fail every request.
    limiter = TenantRateLimiter(
        {"free": "1/minute"}, default="1/minute", redis_url=f"redis://127.0.0.1:{free_port()}/0"
    )
    tenant = uuid.uuid4()
    for _ in range(3):
        await limiter.check(tenant, "free")


async def test_in_memory_limiter_refuses_over_the_limit() -> None:
    limiter = TenantRateLimiter({"free": "2/minute"}, default="100/minute")
    tenant, other = uuid.uuid4(), uuid.uuid4()
    await limiter.check(tenant, "free")
    await limiter.check(tenant, "free")
    with pytest.raises(RateLimitedError) as refused:
        await limiter.check(tenant, "free")
    assert 1 <= refused.value.retry_after <= 60
    await limiter.check(other, "free")  # control: per tenant
    assert limiter.refused == 1
