"""The silo engine registry stays bounded, never closes an engine in use, and resolves locations."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from data_plane.api import create_app
from data_plane.dsn import database_of
from data_plane.routing import EngineRegistry, PlainDsnResolver, Route, RouteDirectory
from data_plane.settings import DataPlaneSettings
from tests.data_plane.conftest import TenantFixture, World, add_silo_tenant
from tests.harness import SILO_TEMPLATE, PgServers, app_dsn, asgi_client, fresh_database


@pytest.fixture
def three_silos(world: World, pg_servers: PgServers) -> Iterator[World]:
    with (
        fresh_database(pg_servers.silo_admin, pg_servers.roles, template=SILO_TEMPLATE, prefix="t_silo") as d1,
        fresh_database(pg_servers.silo_admin, pg_servers.roles, template=SILO_TEMPLATE, prefix="t_silo") as d2,
    ):
        add_silo_tenant(world, "T", d1, pg_servers)
        add_silo_tenant(world, "U", d2, pg_servers)
        yield world


@pytest.fixture
async def registry(world: World) -> AsyncIterator[tuple[RouteDirectory, EngineRegistry]]:
    directory = RouteDirectory(world.endpoints.app_catalog_url)
    engines = EngineRegistry(world.endpoints.app_pool_url, max_silos=1, idle_seconds=60)
    await directory.start()
    await engines.start()
    try:
        yield directory, engines
    finally:
        await engines.close()
        await directory.close()


async def test_lru_bound_and_idle_eviction_spare_borrowed_engines(three_silos: World) -> None:
    world = three_silos
    directory = RouteDirectory(world.endpoints.app_catalog_url)
    engines = EngineRegistry(world.endpoints.app_pool_url, max_silos=2, idle_seconds=60)
    await directory.start()
    await engines.start()
    try:
        routes = [await directory.lookup(world[n].id) for n in ("S", "T", "U")]
        async with engines.connection(routes[0]) as held:
            for route in routes[1:]:
                async with engines.connection(route) as conn:
                    assert await conn.fetchval("SELECT 1") == 1
            # S is least recently used but borrowed: it survived, T was evicted.
            assert engines.silo_count == 2
            assert await held.fetchval("SELECT 1") == 1
            assert await engines.evict_idle(now=time.monotonic() + 3600) == 1  # U only: S is borrowed
            assert await held.fetchval("SELECT 1") == 1
        assert await engines.evict_idle(now=time.monotonic() + 3600) == 1  # S, now returned
        assert engines.silo_count == 0
        async with engines.connection(routes[2]) as conn:  # re-created on demand (control)
            assert await conn.fetchval("SELECT 1") == 1
    finally:
        await engines.close()
        await directory.close()


async def test_a_new_engine_is_never_evicted_when_every_older_one_is_busy(
    three_silos: World, registry: tuple[RouteDirectory, EngineRegistry]
) -> None:
    world = three_silos
    directory, engines = registry  # max_silos=1
    s, t, u = [await directory.lookup(world[n].id) for n in ("S", "T", "U")]
    async with engines.connection(s) as held_s:
        # The bound is full and its only engine is busy: T's new engine is the
        # only idle candidate, and it is the one being returned.
        async with engines.connection(t) as conn_t:
            assert await conn_t.fetchval("SELECT current_database()") == database_of(world["T"].owner_dsn)
            async with engines.connection(u) as conn_u:  # two busy engines, a third new one
                assert await conn_u.fetchval("SELECT 1") == 1
                assert engines.silo_count == 3  # a temporary overflow rather than a closed engine
            assert await conn_t.fetchval("SELECT 1") == 1
        assert await held_s.fetchval("SELECT 1") == 1
        assert await engines.evict_idle() == 2  # T and U are idle now; S is still borrowed
        assert engines.silo_count == 1
        assert await held_s.fetchval("SELECT 1") == 1
    # Back within the bound with S returned; a new engine then evicts the idle S (control).
    async with engines.connection(t) as conn_t:
        assert await conn_t.fetchval("SELECT 1") == 1
        assert engines.silo_count == 1


class MappingResolver:
    """A custom resolver: a location's ``secret_ref`` names a DSN it knows."""

    def __init__(self, secrets: dict[str, str]) -> None:
        self.secrets = secrets
        self.calls: list[str | None] = []

    async def dsn_for(self, route: Route) -> str:
        self.calls.append(route.secret_ref)
        if route.secret_ref is not None:
            return self.secrets[route.secret_ref]
        return await PlainDsnResolver().dsn_for(route)


@pytest.fixture
def secret_silo(world: World, pg_servers: PgServers) -> Iterator[tuple[TenantFixture, str, str]]:
    """A silo tenant whose location has only a ``secret_ref`` (as in production).

    Yields the tenant, the reference and the application-role DSN it stands for.
    """
    with fresh_database(pg_servers.silo_admin, pg_servers.roles, template=SILO_TEMPLATE, prefix="t_silo") as db:
        tenant = add_silo_tenant(world, "V", db, pg_servers)
        ref = f"arn:aws:secretsmanager:eu-west-1:000000000000:secret:tenantctl/{tenant.slug}"
        with world.catalog() as cat:
            cat.execute("UPDATE locations SET app_dsn = NULL, secret_ref = %s WHERE tenant_id = %s", (ref, tenant.id))
        yield tenant, ref, app_dsn(pg_servers.silo_admin, db, pg_servers.roles)


def _assert_own_rows(world: World, name: str, response: httpx.Response) -> None:
    assert response.status_code == 200, response.text
    assert [p["name"] for p in response.json()["data"]] == [f"{world[name].canary}-project"]
    for canary in world.foreign_canaries(name):
        assert canary not in response.text


async def test_custom_resolver_is_used_for_a_secret_ref_location(
    world: World, dp_settings: DataPlaneSettings, secret_silo: tuple[TenantFixture, str, str]
) -> None:
    tenant, ref, dsn = secret_silo
    resolver = MappingResolver({ref: dsn})
    async for client in asgi_client(create_app(dp_settings, resolver=resolver)):
        for _ in range(2):
            _assert_own_rows(world, "V", await client.get("/v1/projects", headers=tenant.headers))
        assert resolver.calls == [ref]  # resolved once; the engine is then reused
        _assert_own_rows(world, "S", await client.get("/v1/projects", headers=world["S"].headers))
        _assert_own_rows(world, "A", await client.get("/v1/projects", headers=world["A"].headers))
        assert resolver.calls == [ref, None]  # S's plain-DSN location went through it too; the pool does not


async def test_secret_ref_without_a_resolver_is_a_clear_503(
    world: World, dp_settings: DataPlaneSettings, secret_silo: tuple[TenantFixture, str, str]
) -> None:
    tenant, _, _ = secret_silo
    async for client in asgi_client(create_app(dp_settings)):
        refused = await client.get("/v1/projects", headers=tenant.headers)
        assert refused.status_code == 503, refused.text
        error = refused.json()["error"]
        assert error["code"] == "unavailable"
        assert "secret" in error["message"] and "resolver" in error["message"]
        assert "Retry-After" in refused.headers
        # Controls: a plain-DSN silo and a pool tenant are served by the same app.
        _assert_own_rows(world, "S", await client.get("/v1/projects", headers=world["S"].headers))
        _assert_own_rows(world, "A", await client.get("/v1/projects", headers=world["A"].headers))
