"""The silo engine registry stays bounded and never closes an engine in use."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from data_plane.routing import EngineRegistry, RouteDirectory
from tests.data_plane.conftest import World, add_silo_tenant
from tests.harness import SILO_TEMPLATE, PgServers, fresh_database


@pytest.fixture
def three_silos(world: World, pg_servers: PgServers) -> Iterator[World]:
    with (
        fresh_database(pg_servers.silo_admin, pg_servers.roles, template=SILO_TEMPLATE, prefix="t_silo") as d1,
        fresh_database(pg_servers.silo_admin, pg_servers.roles, template=SILO_TEMPLATE, prefix="t_silo") as d2,
    ):
        add_silo_tenant(world, "T", d1, pg_servers)
        add_silo_tenant(world, "U", d2, pg_servers)
        yield world


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
