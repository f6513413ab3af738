"""Usage metering: counted in memory, flushed to the catalog, read through the admin API."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import psycopg
import pytest

from data_plane import metering
from data_plane.dsn import libpq
from data_plane.metering import APPLICATION_NAME, UsageMeter
from data_plane.session import TenantContext, Transaction
from data_plane.settings import DataPlaneSettings
from tests.conftest import asgi_client
from tests.data_plane.conftest import World
from tests.harness import PgServers
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


async def test_rows_stored_is_counted_at_most_once_per_interval(dp_settings: DataPlaneSettings, world: World) -> None:
    a = world["A"]  # seeded with one project and one task

    async def write_and_flush(client: httpx.AsyncClient, meter: UsageMeter) -> tuple[int, int, int | None]:
        assert (await client.post("/v1/projects", json={"name": "p"}, headers=a.headers)).status_code == 201
        await asyncio.sleep(0.01)
        assert await meter.flush()
        [row] = _usage_rows(world, a.id)
        return row

    app = dp_app(dp_settings, usage_flush_seconds=3600, usage_rows_stored_seconds=3600)
    async for client in asgi_client(app):
        assert await write_and_flush(client, app.state.meter) == (1, 1, 3)
        # Written again within the hour: not counted again (the last count stands).
        assert await write_and_flush(client, app.state.meter) == (2, 2, 3)
    # Control: with a short interval every flush after a write counts again.
    app = dp_app(dp_settings, usage_flush_seconds=3600, usage_rows_stored_seconds=0.001)
    async for client in asgi_client(app):
        assert await write_and_flush(client, app.state.meter) == (3, 3, 5)
        assert await write_and_flush(client, app.state.meter) == (4, 4, 6)


async def _sleeping(tx: Transaction) -> None:
    await tx.execute("SELECT pg_sleep(1)")


def _lock_holders(pool_url: str, tenant_id: uuid.UUID) -> int:
    with psycopg.connect(libpq(pool_url), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM tenantctl.tenant_lock_holders(%s)", (tenant_id,)).fetchone()
    return 0 if row is None else int(row[0])


def _running(admin_dsn: str, text: str) -> bool:
    with psycopg.connect(libpq(admin_dsn), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND strpos(query, %s) > 0 "
            "AND pid <> pg_backend_pid()",
            (text,),
        ).fetchone()
    return row is not None and int(row[0]) > 0


async def _until_running(admin_dsn: str, text: str) -> None:
    for _ in range(200):
        if await asyncio.to_thread(_running, admin_dsn, text):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no active query containing {text!r}")


async def test_the_rows_stored_count_holds_no_share_of_a_fence(
    dp_settings: DataPlaneSettings, world: World, pg_servers: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long count of a big tenant must not be something a move's fence drains (waits for, then kills)."""
    a = world["A"]
    monkeypatch.setattr(metering, "ROWS_STORED", metering.ROWS_STORED + " + (SELECT 0 FROM pg_sleep(1))")
    app = dp_app(dp_settings, usage_flush_seconds=3600)
    async for _client in asgi_client(app):
        meter: UsageMeter = app.state.meter
        sample = asyncio.ensure_future(meter._rows_stored(a.id))
        await _until_running(pg_servers.main_admin, "pg_sleep(1)")
        holders_while_counting = await asyncio.to_thread(_lock_holders, world.endpoints.pool_url, a.id)
        assert await sample == 2  # its project and its task, through RLS
        assert holders_while_counting == 0
        # Control: a tenant transaction holds its share for as long as it runs.
        route = await app.state.routes.lookup(a.id)
        ctx = TenantContext(tenant_id=a.id, route=route, directory=app.state.routes, engines=app.state.engines)
        running = asyncio.ensure_future(ctx.run(_sleeping))
        await _until_running(pg_servers.main_admin, "pg_sleep(1)")
        assert await asyncio.to_thread(_lock_holders, world.endpoints.pool_url, a.id) == 1
        await running


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


async def test_a_shutdown_during_a_flush_loses_no_count(dp_settings: DataPlaneSettings, world: World) -> None:
    """The replica stops while a periodic flush is sampling rows stored: the counts are still written.

    The flush takes the counts out of memory before it samples (a count that
    may take seconds), so cancelling it there lost them.
    """
    a = world["A"]
    app = dp_app(dp_settings, usage_flush_seconds=0.2)
    with psycopg.connect(libpq(world.endpoints.pool_url)) as locker:
        # The sample counts tasks too; a lock on them holds it up to its timeout.
        locker.execute("LOCK TABLE tasks IN ACCESS EXCLUSIVE MODE")
        async for client in asgi_client(app):
            meter: UsageMeter = app.state.meter
            for name in ("x", "y"):
                assert (await client.post("/v1/projects", json={"name": name}, headers=a.headers)).status_code == 201
            assert (await client.get("/v1/projects", headers=a.headers)).status_code == 200
            for _ in range(250):  # until the periodic flush's sample waits for the lock
                if _waiting_for_a_lock(world):
                    break
                await asyncio.sleep(0.02)
            assert _waiting_for_a_lock(world), "the periodic flush did not start sampling"
            assert meter.pending() == []  # the counts are in the flush's hands
        # Shut down mid-flush (the sample gave up at its timeout).
    assert _usage_rows(world, a.id) == [(3, 2, None)]


def _waiting_for_a_lock(world: World) -> bool:
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'tasks'::regclass"
        ).fetchone()
    return row is not None and int(row[0]) > 0


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
    await meter.close()
    await good.close()


async def test_flushes_share_one_catalog_connection(
    dp_settings: DataPlaneSettings, world: World, pg_servers: PgServers
) -> None:
    """A flush reuses the last one's connection; one that broke is replaced, and no count is lost."""
    a = world["A"]
    meter = UsageMeter(dp_settings.app_catalog_url or "", interval=3600)
    try:
        meter.record(a.id, 1)
        assert await meter.flush()
        first = _catalog_backends(world)
        assert len(first) == 1
        meter.record(a.id, 1)
        assert await meter.flush()
        assert _catalog_backends(world) == first, "the second flush used the first one's connection"
        # The connection breaks (a catalog restart, a proxy's idle timeout).
        with psycopg.connect(libpq(pg_servers.main_admin), autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = ANY(%s)", (first,))
        meter.record(a.id, 1)
        flushed = await meter.flush() or await meter.flush()  # a failed flush keeps its counts for the next
        assert flushed
        assert _usage_rows(world, a.id) == [(3, 3, None)]
        assert len(await _settled_backends(world, expect=1)) == 1
    finally:
        await meter.close()
    assert await _settled_backends(world, expect=0) == [], "close() closes the connection"


async def _settled_backends(world: World, *, expect: int) -> list[int]:
    """:func:`_catalog_backends`, given a closed or terminated backend up to 5 s to exit (it does so asynchronously)."""
    for _ in range(50):
        backends = _catalog_backends(world)
        if len(backends) == expect:
            break
        await asyncio.sleep(0.1)
    return backends


def _catalog_backends(world: World) -> list[int]:
    """Backends of the meter's catalog connection."""
    with world.catalog() as catalog:
        rows = catalog.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s"
            " ORDER BY pid",
            (APPLICATION_NAME,),
        ).fetchall()
    return [pid for (pid,) in rows]


def test_application_role_cannot_read_other_catalog_tables(world: World, dp_settings: DataPlaneSettings) -> None:
    assert dp_settings.app_catalog_url is not None
    with psycopg.connect(libpq(dp_settings.app_catalog_url), autocommit=True) as conn:
        conn.execute("SELECT requests FROM tenant_usage LIMIT 1")  # allowed: what its upsert reads back
        conn.execute("SELECT tenant_id FROM tenant_routes LIMIT 1")  # allowed: the route contract
        for denied in ("SELECT * FROM tenant_usage", "DELETE FROM tenant_usage", "SELECT * FROM tenants"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(denied)
