"""``tenantctl token tenant|admin``: dev tokens with the right audience and claims, accepted by both APIs."""

from __future__ import annotations

import time
from typing import Any

import jwt
from typer.testing import CliRunner

from control_plane.api import create_app as create_admin_app
from control_plane.cli import app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.api import create_app
from data_plane.settings import DataPlaneSettings
from tests.conftest import asgi_client
from tests.world import World


def _token(settings: ControlPlaneSettings, endpoints: Endpoints, *args: str) -> str:
    env = {
        "TENANTCTL_ENVIRONMENT": "test",
        "TENANTCTL_STATE_DIR": str(settings.state_dir),
        "TENANTCTL_CATALOG_URL": endpoints.catalog_url,
        "TENANTCTL_POOL_URL": endpoints.pool_url,
        "TENANTCTL_SILO_SERVER_URL": endpoints.silo_server_url,
    }
    result = CliRunner().invoke(app, ["token", *args], env=env)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


async def test_tenant_token_for_a_slug_is_accepted_by_the_tenant_api_only(
    world: World, cp_settings: ControlPlaneSettings, dp_settings: DataPlaneSettings, endpoints: Endpoints
) -> None:
    a, s = world["A"], world["S"]
    token = _token(cp_settings, endpoints, "tenant", "--tenant", a.slug, "--ttl", "120", "--sub", "ops-user")
    claims = _claims(token)
    assert claims["aud"] == "tenantctl-api" and claims["iss"] == cp_settings.jwt_issuer
    assert claims["tenant_id"] == str(a.id) and claims["sub"] == "ops-user"
    assert 110 <= claims["exp"] - int(time.time()) <= 120
    by_id = _claims(_token(cp_settings, endpoints, "tenant", "--tenant", str(s.id)))
    assert by_id["tenant_id"] == str(s.id)

    async for client in asgi_client(create_app(dp_settings)):
        me = await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})
        assert me.status_code == 200, me.text
        assert me.json()["tenant_id"] == str(a.id)
        projects = (await client.get("/v1/projects", headers={"Authorization": f"Bearer {token}"})).json()["data"]
        assert [p["id"] for p in projects] == [str(a.project_id)]  # A's rows, nobody else's
    async for admin in asgi_client(create_admin_app(cp_settings, endpoints)):
        refused = await admin.get("/v1/tenants", headers={"Authorization": f"Bearer {token}"})
        assert refused.status_code == 401  # a tenant token is no admin token


async def test_admin_token_is_accepted_by_the_admin_api_only(
    world: World, cp_settings: ControlPlaneSettings, dp_settings: DataPlaneSettings, endpoints: Endpoints
) -> None:
    token = _token(cp_settings, endpoints, "admin", "--ttl", "60")
    claims = _claims(token)
    assert claims["aud"] == "tenantctl-admin" and claims["scope"] == "tenantctl:admin"
    assert "tenant_id" not in claims
    async for admin in asgi_client(create_admin_app(cp_settings, endpoints)):
        listed = await admin.get("/v1/tenants", headers={"Authorization": f"Bearer {token}"})
        assert listed.status_code == 200
        assert world["A"].slug in [t["slug"] for t in listed.json()["data"]]
    async for client in asgi_client(create_app(dp_settings)):
        assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {token}"})).status_code == 401


def test_token_for_an_unknown_slug_is_a_one_line_error(cp_settings: ControlPlaneSettings, endpoints: Endpoints) -> None:
    env = {
        "TENANTCTL_ENVIRONMENT": "test",
        "TENANTCTL_STATE_DIR": str(cp_settings.state_dir),
        "TENANTCTL_CATALOG_URL": endpoints.catalog_url,
        "TENANTCTL_POOL_URL": endpoints.pool_url,
        "TENANTCTL_SILO_SERVER_URL": endpoints.silo_server_url,
    }
    result = CliRunner().invoke(app, ["token", "tenant", "--tenant", "no-such-tenant"], env=env)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "no tenant with slug" in result.stderr and result.stdout == ""
