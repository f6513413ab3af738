"""Usage metering: counted in memory, flushed to the catalog, read through the admin API."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from data_plane.dsn import libpq
from data_plane.metering import UsageMeter
from data_plane.settings import DataPlaneSettings
from tests.conftest import asgi_client
from tests.data_plane.conftest import World
from tests.ops.conftest import dp_app


def _usage_rows(world: World, tenant_id: object) -> list[tuple[int, int, int | None]]:
    with world.catalog() as cat:
        rows = cat.execute(
            "SELECT requests, rows_written, rows_stored FROM tenant_usage WHERE tenant_id = %s", (tenant_id,)
        ).fetchall()
    return [(int(r[0]), int(r[1]), None if r[2] is None else int(r[2])) for r in rows]


async def test_usage_is_flushed_per_tenant_and_on_shutdown(
    dp_settings: DataPlaneSettings, world: World, admin: httpx.AsyncClient
) -> None:
    a, b, s = world["A"], world["B"], world["S"]
    app = dp_app(dp_settings, usage_flush_seconds=3600)  # only explicit and shutdown flushes
    async for client in asgi_client(app):
        for _ in range(3):
            assert (await client.get("/v1/projects", headers=a.headers)).status_code == 200
        assert (await client.post("/v1/projects", json={"name": "x"}, headers=a.headers)).status_code == 201
        assert (await client.post("/v1/projects", json={"name": "y"}, headers=s.headers)).status_code == 201
        assert (await client.get("/v1/me", headers=b.headers)).status_code == 200
        assert _usage_rows(world, a.id) == []  # nothing written on the request path
        meter: UsageMeter = app.state.meter
        assert await meter.flush()
        # A: 4 requests, 1 row written; it stores its seeded project + task + the new project.
        assert _usage_rows(world, a.id) == [(4, 1, 3)]
        assert _usage_rows(world, s.id) == [(1, 1, 3)]  # the silo tenant, sampled on its silo
        assert _usage_rows(world, b.id) == [(1, 0, None)]  # read only: rows stored not sampled
        assert (await client.get("/v1/me", headers=b.headers)).status_code == 200
    # Shutdown flushed the last request, adding to the same hour bucket.
    assert _usage_rows(world, b.id) == [(2, 0, None)]

    now = datetime.now(UTC)
    response = await admin.get(
        f"/v1/tenants/{a.slug}/usage",
        params={"from": (now - timedelta(hours=2)).isoformat(), "to": (now + timedelta(hours=1)).isoformat()},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tenant_id"] == str(a.id) and body["totals"] == {"requests": 4, "rows_written": 1, "rows_stored": 3}
    assert len(body["buckets"]) == 1 and "from" in body and "to" in body
    # Control: a range before any traffic is empty; B's usage is its own.
    earlier = await admin.get(
        f"/v1/tenants/{a.id}/usage",
        params={"from": (now - timedelta(days=3)).isoformat(), "to": (now - timedelta(days=2)).isoformat()},
    )
    assert earlier.json()["totals"] == {"requests": 0, "rows_written": 0, "rows_stored": None}
    assert (await admin.get(f"/v1/tenants/{b.id}/usage")).json()["totals"]["requests"] == 2


async def test_usage_api_validates_and_requires_admin(admin: httpx.AsyncClient, world: World) -> None:
    a = world["A"]
    bad = await admin.get(
        f"/v1/tenants/{a.id}/usage", params={"from": "2026-11-23T10:00:00Z", "to": "2026-11-23T09:00:00Z"}
    )
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"
    assert (await admin.get("/v1/tenants/no-such-tenant/usage")).status_code == 404
    assert (await admin.get(f"/v1/tenants/{a.id}/usage")).status_code == 200  # control
    tenant_token = await admin.get(f"/v1/tenants/{a.id}/usage", headers=a.headers)
    assert tenant_token.status_code == 401


async def test_failed_flush_keeps_counts(dp_settings: DataPlaneSettings, world: World) -> None:
    a = world["A"]
    meter = UsageMeter("postgresql://nobody@127.0.0.1:1/none", interval=3600)
    meter.record(a.id, 2)
    meter.record(a.id, 0)
    assert not await meter.flush()
    assert meter.flush_failures == 1 and list(meter.pending()) == [a.id]
    good = UsageMeter(dp_settings.app_catalog_url or "", interval=3600)
    good._counts = meter._counts  # the same counts, now to a reachable catalog
    assert await good.flush()
    assert _usage_rows(world, a.id) == [(2, 2, None)]


def test_application_role_cannot_read_other_catalog_tables(world: World, dp_settings: DataPlaneSettings) -> None:
    assert dp_settings.app_catalog_url is not None
    with psycopg.connect(libpq(dp_settings.app_catalog_url), autocommit=True) as conn:
        conn.execute("SELECT requests FROM tenant_usage LIMIT 1")  # allowed: what its upsert reads back
        conn.execute("SELECT tenant_id FROM tenant_routes LIMIT 1")  # allowed: the route contract
        for denied in ("SELECT * FROM tenant_usage", "DELETE FROM tenant_usage", "SELECT * FROM tenants"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(denied)
