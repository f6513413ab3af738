"""Routes follow the catalog: NOTIFY invalidation, stale routes, fences, reconnects."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import httpx
import psycopg
import pytest
from sqlalchemy.engine import url as sa_url

from data_plane.api import create_app
from data_plane.dsn import database_of, libpq, with_database
from data_plane.exceptions import TenantFencedError, TenantUnknownError
from data_plane.ownership import BEGIN_TENANT, FUSED_STATEMENTS
from data_plane.resources.projects.service import LIST_FIRST, TENANT
from data_plane.routing import LISTENER_PROBE_TIMEOUT_SECONDS, EngineRegistry, RouteDirectory
from data_plane.session import TENANT_GUARD, TenantContext, fused
from data_plane.settings import DataPlaneSettings
from tests.conftest import asgi_client
from tests.data_plane.conftest import World, add_pool_tenant
from tests.harness import PgServers


async def _eventually(check, timeout: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    """Poll an async check; return the seconds it took (fails after ``timeout``)."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.02)


async def test_suspend_and_resume_take_effect_within_a_second(client: httpx.AsyncClient, world: World) -> None:
    a, b = world["A"], world["B"]
    assert (await client.get("/v1/projects", headers=a.headers)).status_code == 200  # cached now
    with world.catalog() as cat:
        cat.execute("UPDATE tenants SET status = 'suspended' WHERE id = %s", (a.id,))

    async def suspended() -> bool:
        response = await client.get("/v1/projects", headers=a.headers)
        return response.status_code == 403 and response.json()["error"]["code"] == "tenant_suspended"

    await _eventually(suspended)
    assert (await client.get("/v1/projects", headers=b.headers)).status_code == 200  # control
    with world.catalog() as cat:
        cat.execute("UPDATE tenants SET status = 'active' WHERE id = %s", (a.id,))

    async def resumed() -> bool:
        return (await client.get("/v1/projects", headers=a.headers)).status_code == 200

    await _eventually(resumed)


def _move_to_silo_silently(world: World, servers: PgServers, name: str, silo_location_of: str) -> None:
    """Move tenant ``name`` into another tenant's silo database *without* NOTIFY.

    session_replication_role=replica disables the catalog trigger, so every
    replica's cache is now stale: exactly the race a real move has with a
    replica that missed (or has not yet processed) the notification.
    """
    tenant, host = world[name], world[silo_location_of]
    with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
        rows = pool.execute(
            "SELECT id, name, status, created_at, updated_at FROM projects WHERE tenant_id = %s", (tenant.id,)
        ).fetchall()
        pool.execute("UPDATE tenantctl.tenant_ownership SET state = 'moved' WHERE tenant_id = %s", (tenant.id,))
    with psycopg.connect(libpq(host.owner_dsn)) as silo:
        for row in rows:
            silo.execute(
                "INSERT INTO projects (tenant_id, id, name, status, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s, %s, %s)",
                (tenant.id, *row),
            )
        silo.execute("SELECT tenantctl.claim_tenant(%s, 2)", (tenant.id,))
    admin = with_database(servers.main_admin, database_of(world.endpoints.catalog_url))
    with psycopg.connect(libpq(admin), autocommit=True) as cat:
        cat.execute("SET session_replication_role = replica")
        cat.execute(
            "UPDATE tenants SET placement = 'silo', route_epoch = 2, "
            "location_id = (SELECT location_id FROM tenants WHERE id = %s) WHERE id = %s",
            (host.id, tenant.id),
        )


async def test_stale_route_is_retried_on_the_new_location(
    client: httpx.AsyncClient, world: World, pg_servers: PgServers
) -> None:
    a = world["A"]
    before = await client.get("/v1/me", headers=a.headers)
    assert before.json()["placement"]["kind"] == "pool"  # route cached
    _move_to_silo_silently(world, pg_servers, "A", "S")

    # The cache still says pool; the pool refuses (TC001); the request is
    # retried once on the fresh route and served from the silo.
    created = await client.post("/v1/projects", headers=a.headers, json={"name": "after-move"})
    assert created.status_code == 201, created.text
    with psycopg.connect(libpq(world["S"].owner_dsn)) as silo:
        assert silo.execute("SELECT tenant_id FROM projects WHERE id = %s", (created.json()["id"],)).fetchone() == (
            a.id,
        )
    with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
        assert pool.execute("SELECT count(*) FROM projects WHERE name = 'after-move'").fetchone() == (0,)
    names = [p["name"] for p in (await client.get("/v1/projects", headers=a.headers)).json()["data"]]
    assert sorted(names) == sorted([f"{a.canary}-project", "after-move"])
    assert (await client.get("/v1/me", headers=a.headers)).json()["placement"]["kind"] == "silo"


async def test_stale_router_cannot_write_to_the_old_location(world: World, dp_settings: DataPlaneSettings) -> None:
    """A replica holding the old route object writes nowhere but the new owner."""
    directory = RouteDirectory(world.endpoints.app_catalog_url)
    engines = EngineRegistry(world.endpoints.app_pool_url)
    await directory.start()
    await engines.start()
    try:
        a = world["A"]
        stale = await directory.lookup(a.id)
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
            pool.execute("UPDATE tenantctl.tenant_ownership SET state = 'moved' WHERE tenant_id = %s", (a.id,))

        async def insert(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO projects (tenant_id, id, name) VALUES ($1, $2, 'stale-write')",
                a.id,
                uuid.uuid4(),
            )

        ctx = TenantContext(tenant_id=a.id, route=stale, directory=directory, engines=engines)
        # The catalog still routes A to the pool, so the retry also lands on a
        # database that refuses: the write fails instead of landing anywhere.
        with pytest.raises(Exception) as info:
            await ctx.run(insert)
        assert "route changed" in str(info.value)
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
            assert pool.execute("SELECT count(*) FROM projects WHERE name = 'stale-write'").fetchone() == (0,)
    finally:
        await engines.close()
        await directory.close()


async def test_fenced_tenant_is_held_briefly_then_503(client: httpx.AsyncClient, world: World) -> None:
    a, b = world["A"], world["B"]
    with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
        pool.execute("SELECT tenantctl.fence_tenant(%s)", (a.id,))
    start = time.monotonic()
    response = await client.get("/v1/projects", headers=a.headers)
    held = time.monotonic() - start
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "tenant_fenced"
    assert int(response.headers["Retry-After"]) >= 1
    assert held < 5
    assert (await client.get("/v1/projects", headers=b.headers)).status_code == 200  # control

    # Unfenced while a request is being held: it completes instead of failing.
    async def unfence_soon() -> None:
        await asyncio.sleep(0.3)
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
            pool.execute("SELECT tenantctl.claim_tenant(%s, 1)", (a.id,))

    with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
        pool.execute("SELECT tenantctl.fence_tenant(%s)", (a.id,))
    held_request, _ = await asyncio.gather(client.get("/v1/projects", headers=a.headers), unfence_soon())
    assert held_request.status_code == 200


async def test_requests_held_by_a_fence_follow_the_flip_with_one_catalog_read(
    world: World, dp_settings: DataPlaneSettings, pg_servers: PgServers
) -> None:
    """A fence holds A's requests; the flip's NOTIFY sends them all to the new location.

    The source stays *fenced* (never retired) throughout, so a 200 can only come
    from the silo the route now names; the burst of held requests costs one
    shared catalog read, not one each.
    """
    a = world["A"]
    app = create_app(dp_settings)
    async for client in asgi_client(app):
        assert (await client.get("/v1/me", headers=a.headers)).json()["placement"]["kind"] == "pool"  # cached
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
            pool.execute("SELECT tenantctl.fence_tenant(%s)", (a.id,))
        held = [asyncio.create_task(client.get("/v1/projects", headers=a.headers)) for _ in range(8)]
        await asyncio.sleep(0.1)  # all of them are now waiting on the fence
        assert not any(task.done() for task in held)
        _move_to_silo_silently(world, pg_servers, "A", "S")
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:  # undo the retire: still only fenced
            pool.execute("UPDATE tenantctl.tenant_ownership SET state = 'fenced' WHERE tenant_id = %s", (a.id,))
        routes = app.state.routes
        reads_before = routes.refreshes
        with psycopg.connect(libpq(world.endpoints.catalog_url), autocommit=True) as cat:
            cat.execute("SELECT pg_notify('tenant_routes', %s)", (str(a.id),))
        responses = await asyncio.gather(*held)
        for response in responses:
            assert response.status_code == 200, response.text
            assert [p["name"] for p in response.json()["data"]] == [f"{a.canary}-project"]
            for canary in world.foreign_canaries("A"):
                assert canary not in response.text
        assert routes.refreshes - reads_before == 1
        assert (await client.get("/v1/me", headers=a.headers)).json()["placement"]["kind"] == "silo"
        # Control: B, in the same pool, was never held.
        assert (await client.get("/v1/projects", headers=world["B"].headers)).status_code == 200


def _catalog_admin(world: World, servers: PgServers) -> str:
    """A superuser DSN of the catalog database (not subject to its connection limit)."""
    return libpq(with_database(servers.main_admin, database_of(world.endpoints.catalog_url)))


async def test_change_made_while_the_listener_was_down_is_seen_after_reconnect(
    world: World, pg_servers: PgServers
) -> None:
    # A TTL far beyond the test: only invalidation can make a change visible.
    directory = RouteDirectory(world.endpoints.app_catalog_url, ttl=3600)
    await directory.start()
    catalog_db = database_of(world.endpoints.catalog_url)
    admin = _catalog_admin(world, pg_servers)
    try:
        a, b = world["A"], world["B"]
        assert (await directory.lookup(b.id)).status == "active"
        with psycopg.connect(admin, autocommit=True) as conn:
            # The outage: the listener is cut off and cannot come back until
            # the limit is lifted (the directory's pool keeps its connection).
            conn.execute(f'ALTER DATABASE "{catalog_db}" CONNECTION LIMIT 0')
            killed = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = %s AND usename = %s AND (query ILIKE 'LISTEN%%' OR query = 'SELECT 1')",
                (catalog_db, pg_servers.roles.app),
            ).fetchall()
        assert killed == [(True,)], "exactly the listener connection should have been cut"

        async def down() -> bool:
            return not directory.listening

        await _eventually(down, timeout=10)
        # Cached while nobody listens: read before the change below.
        assert (await directory.lookup(a.id)).status == "active"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("UPDATE tenants SET status = 'suspended' WHERE id = %s", (a.id,))  # its NOTIFY is lost
            assert not directory.listening  # the change really happened during the outage
            conn.execute(f'ALTER DATABASE "{catalog_db}" CONNECTION LIMIT -1')

        async def relistening() -> bool:
            return directory.listening

        await _eventually(relistening, timeout=15)
        assert (await directory.lookup(a.id)).status == "suspended"
        assert (await directory.lookup(b.id)).status == "active"  # control
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{catalog_db}" CONNECTION LIMIT -1')
        await directory.close()


class _FreezableProxy:
    """A TCP proxy to a PostgreSQL server that can stop forwarding, sockets left open: a half-open connection."""

    def __init__(self, dsn: str) -> None:
        url = sa_url.make_url(dsn)
        host, port = str(url.query.get("host") or url.host), int(url.query.get("port") or url.port or 5432)  # type: ignore[arg-type]
        self._upstream = (host, port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, port = self._upstream
        if host.startswith("/"):
            up_reader, up_writer = await asyncio.open_unix_connection(f"{host}/.s.PGSQL.{port}")
        else:
            up_reader, up_writer = await asyncio.open_connection(host, port)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True)
        for w in (writer, up_writer):
            w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            await self._flowing.wait()
            writer.write(data)
            await writer.drain()
        writer.close()


async def test_a_half_open_listener_connection_is_noticed_and_replaced(world: World) -> None:
    """The catalog stops answering on the listener's open socket: the listener goes down and comes back.

    Its liveness probe waited for ever on such a socket, so the directory kept
    "listening" (and caching) while no NOTIFY could arrive.
    """
    proxy = _FreezableProxy(world.endpoints.app_catalog_url)
    await proxy.start()
    url = sa_url.make_url(world.endpoints.app_catalog_url)
    through_proxy = libpq(url.set(host="127.0.0.1", port=proxy.port, query={}))
    directory = RouteDirectory(through_proxy, ttl=3600)
    try:
        await directory.start()
        assert directory.listening

        async def down() -> bool:
            return not directory.listening

        async def up() -> bool:
            return directory.listening

        proxy.freeze()
        await _eventually(down, timeout=LISTENER_PROBE_TIMEOUT_SECONDS + 10)
        proxy.thaw()
        await _eventually(up, timeout=15)
        assert (await directory.lookup(world["A"].id)).status == "active"  # the control: it reads again
    finally:
        proxy.thaw()
        await directory.close()
        await proxy.close()


class _HookedDirectory(RouteDirectory):
    """Runs ``hook`` between reading a route from the catalog and caching it."""

    hook: Callable[[], Awaitable[None]] | None = None

    async def _read(self, tenant_id: uuid.UUID) -> asyncpg.Record | None:
        record = await super()._read(tenant_id)
        if self.hook is not None:
            await self.hook()
        return record


async def test_notify_during_a_catalog_read_is_not_overwritten_by_the_old_record(world: World) -> None:
    directory = _HookedDirectory(world.endpoints.app_catalog_url, ttl=3600)
    await directory.start()
    try:
        a, b = world["A"], world["B"]
        fired: list[int] = []

        async def suspend_a_and_wait_for_its_notify() -> None:
            if fired:
                return
            fired.append(directory.invalidations)
            with world.catalog() as cat:
                cat.execute("UPDATE tenants SET status = 'suspended' WHERE id = %s", (a.id,))

            async def heard() -> bool:
                return directory.invalidations > fired[0]

            await _eventually(heard, timeout=10)

        # The record read below says 'active'; the suspension commits and its
        # NOTIFY is processed before that record would be cached.
        directory.hook = suspend_a_and_wait_for_its_notify
        assert (await directory.lookup(a.id)).status == "suspended"  # read again, not the raced record
        assert fired, "the hook ran between read and store"
        directory.hook = None
        hits = directory.hits
        assert (await directory.lookup(a.id)).status == "suspended"  # and the cache holds the suspension
        assert directory.hits == hits + 1

        # Invalidations on every read: the last read is returned but never cached.
        async def invalidate_someone_else() -> None:
            directory.invalidate(b.id)

        directory.hook = invalidate_someone_else
        refreshes = directory.refreshes
        assert (await directory.lookup(b.id)).status == "active"
        directory.hook = None
        assert directory.refreshes > refreshes + 1
        refreshes, hits = directory.refreshes, directory.hits
        assert (await directory.lookup(b.id)).status == "active"
        assert (directory.refreshes, directory.hits) == (refreshes + 1, hits)  # not cached: read again
        # Control: with nothing racing, a route is cached by the first lookup.
        assert (await directory.lookup(b.id)).status == "active"
        assert directory.hits == hits + 1
    finally:
        await directory.close()


@pytest.fixture
async def single_connection_client(dp_settings: DataPlaneSettings, world: World) -> AsyncIterator[httpx.AsyncClient]:
    settings = DataPlaneSettings(**{**dp_settings.model_dump(), "pool_size": 1})
    async for c in asgi_client(create_app(settings)):
        yield c


async def test_one_connection_interleaved_tenants(single_connection_client: httpx.AsyncClient, world: World) -> None:
    for _ in range(10):
        for name in ("A", "B"):
            response = await single_connection_client.get("/v1/projects", headers=world[name].headers)
            assert [p["name"] for p in response.json()["data"]] == [f"{world[name].canary}-project"]
            for canary in world.foreign_canaries(name):
                assert canary not in response.text


async def test_many_concurrent_tenants_on_one_replica(client: httpx.AsyncClient, world: World) -> None:
    for i in range(12):
        add_pool_tenant(world, f"C{i}")
    names = [n for n in world.tenants for _ in range(3)]

    async def call(name: str) -> tuple[str, httpx.Response]:
        return name, await client.get("/v1/projects", headers=world[name].headers)

    results = await asyncio.gather(*(call(n) for n in names))
    for name, response in results:
        assert response.status_code == 200
        assert [p["name"] for p in response.json()["data"]] == [f"{world[name].canary}-project"]


async def test_cancelled_transaction_never_leaks_into_the_next_tenant(world: World) -> None:
    directory = RouteDirectory(world.endpoints.app_catalog_url)
    engines = EngineRegistry(world.endpoints.app_pool_url, pool_size=1)
    await directory.start()
    await engines.start()
    try:
        a, b = world["A"], world["B"]
        inserted = asyncio.Event()

        async def slow_insert(conn: asyncpg.Connection) -> None:
            await conn.execute(
                "INSERT INTO projects (tenant_id, id, name) VALUES ($1, $2, 'cancelled-write')",
                a.id,
                uuid.uuid4(),
            )
            inserted.set()
            await asyncio.sleep(30)

        ctx_a = TenantContext(tenant_id=a.id, route=await directory.lookup(a.id), directory=directory, engines=engines)
        task = asyncio.create_task(ctx_a.run(slow_insert))
        await inserted.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async def read_all(conn: asyncpg.Connection) -> tuple[list[str], str, bool]:
            names = [r["name"] for r in await conn.fetch("SELECT name FROM projects")]
            setting = await conn.fetchval("SELECT current_setting('app.current_tenant_id', true)")
            return names, setting, True

        ctx_b = TenantContext(tenant_id=b.id, route=await directory.lookup(b.id), directory=directory, engines=engines)
        names, setting, _ = await ctx_b.run(read_all)  # same (only) connection
        assert names == [f"{b.canary}-project"]
        assert setting == str(b.id)

        async def outside(conn: asyncpg.Connection) -> int:
            return int(await conn.fetchval("SELECT count(*) FROM projects"))

        # Outside any tenant transaction the connection carries no context.
        async with engines.connection(ctx_b.route) as conn:
            assert not conn.is_in_transaction()
            assert await outside(conn) == 0
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
            assert pool.execute("SELECT count(*) FROM projects WHERE name = 'cancelled-write'").fetchone() == (0,)
    finally:
        await engines.close()
        await directory.close()


async def test_fenced_error_surfaces_from_run(world: World) -> None:
    directory = RouteDirectory(world.endpoints.app_catalog_url)
    engines = EngineRegistry(world.endpoints.app_pool_url)
    await directory.start()
    await engines.start()
    try:
        a = world["A"]
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
            pool.execute("SELECT tenantctl.fence_tenant(%s)", (a.id,))

        async def noop(conn: asyncpg.Connection) -> int:
            return 1

        ctx = TenantContext(
            tenant_id=a.id,
            route=await directory.lookup(a.id),
            directory=directory,
            engines=engines,
            fence_hold_seconds=0.1,
        )
        with pytest.raises(TenantFencedError):
            await ctx.run(noop)
    finally:
        await engines.close()
        await directory.close()


async def test_fused_read_binds_only_for_its_statement(world: World) -> None:
    directory = RouteDirectory(world.endpoints.app_catalog_url)
    engines = EngineRegistry(world.endpoints.app_pool_url, pool_size=1)
    await directory.start()
    await engines.start()
    try:
        a, b = world["A"], world["B"]
        ctx_a = TenantContext(tenant_id=a.id, route=await directory.lookup(a.id), directory=directory, engines=engines)
        rows = await ctx_a.reads.fetch("SELECT name FROM projects ORDER BY name")
        assert [r["name"] for r in rows] == [f"{a.canary}-project"]
        assert await ctx_a.reads.fetchval("SELECT count(*) FROM projects WHERE tenant_id = $1", b.id) == 0
        async with engines.connection(ctx_a.route) as conn:  # same single connection, afterwards
            assert await conn.fetchval("SELECT count(*) FROM projects") == 0
            assert await conn.fetchval("SELECT current_setting('app.current_tenant_id', true)") == ""
        with pytest.raises(ValueError, match="single SELECT"):
            await ctx_a.reads.fetch("DELETE FROM projects RETURNING id")
    finally:
        await engines.close()
        await directory.close()


def _lock_holders(world: World, tenant_id: uuid.UUID) -> int:
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        row = conn.execute("SELECT count(*) FROM tenantctl.tenant_lock_holders(%s)", (tenant_id,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_a_fused_insert_is_drained_by_the_fence_and_refused_after_it(world: World) -> None:
    """One statement, one transaction: it holds the tenant's share of the fence's lock until it commits."""
    directory = RouteDirectory(world.endpoints.app_catalog_url)
    engines = EngineRegistry(world.endpoints.app_pool_url)
    await directory.start()
    await engines.start()
    try:
        a, b = world["A"], world["B"]
        ctx_a = TenantContext(
            tenant_id=a.id,
            route=await directory.lookup(a.id),
            directory=directory,
            engines=engines,
            fence_hold_seconds=0.1,
        )
        # The sleep is an InitPlan of the values: evaluated after the guard has bound the tenant.
        slow = (
            f"INSERT INTO projects (tenant_id, id, name) SELECT {TENANT}, $1, (SELECT $2::text FROM pg_sleep(0.6)) "
            f"FROM {TENANT_GUARD} RETURNING id, tenant_id"
        )
        assert _lock_holders(world, a.id) == 0
        written = uuid.uuid4()
        insert = asyncio.create_task(ctx_a.writes.fetchrow(slow, written, "drained"))

        async def holds_share() -> bool:
            return _lock_holders(world, a.id) == 1

        await _eventually(holds_share)  # the statement holds its share
        started = time.monotonic()
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
            pool.execute("SELECT tenantctl.fence_tenant(%s)", (a.id,))  # the drain waits for the insert
            waited = time.monotonic() - started
            pool.commit()
            assert pool.execute("SELECT tenant_id FROM projects WHERE id = %s", (written,)).fetchone() == (a.id,)
        row = await insert
        assert row is not None and (row["id"], row["tenant_id"]) == (written, a.id)
        assert waited > 0.2
        # Denied after the fence: held, then 503; nothing written.
        refused = uuid.uuid4()
        with pytest.raises(TenantFencedError):
            await ctx_a.writes.fetchrow(slow.replace("0.6", "0"), refused, "after the fence")
        # Allowed: another tenant's fused insert on the same database.
        ctx_b = TenantContext(tenant_id=b.id, route=await directory.lookup(b.id), directory=directory, engines=engines)
        other = await ctx_b.writes.fetchrow(slow.replace("0.6", "0"), uuid.uuid4(), "other tenant")
        assert other is not None and other["tenant_id"] == b.id
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
            assert pool.execute("SELECT count(*) FROM projects WHERE id = %s", (refused,)).fetchone() == (0,)
        with pytest.raises(ValueError, match="one INSERT"):
            await ctx_b.writes.fetchrow("INSERT INTO projects (tenant_id, id, name) VALUES ($1, $2, 'x')", b.id, b.id)
        with pytest.raises(ValueError, match="one INSERT"):
            await ctx_b.writes.fetch(f"DELETE FROM projects USING {TENANT_GUARD} RETURNING id")
    finally:
        await engines.close()
        await directory.close()


async def test_a_silo_location_change_drops_only_its_tenants_routes(world: World, pg_servers: PgServers) -> None:
    """A promotion's flip marks its silo ready: that must not empty every replica's route cache."""
    directory = RouteDirectory(world.endpoints.app_catalog_url, ttl=3600)  # only a NOTIFY evicts
    await directory.start()
    admin = _catalog_admin(world, pg_servers)
    a, s = world["A"], world["S"]
    try:
        for tenant in (a, s):
            await directory.lookup(tenant.id)
        seen = directory.invalidations

        async def notified(count: int) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return directory.invalidations >= seen + count

            return check

        with psycopg.connect(admin, autocommit=True) as conn:
            silo = "SELECT location_id FROM tenants WHERE id = %s"
            conn.execute(f"UPDATE locations SET status = 'ready' WHERE id = ({silo})", (s.id,))  # not in the view
            conn.execute(f"UPDATE locations SET app_dsn = app_dsn WHERE id = ({silo})", (s.id,))  # unchanged
            conn.execute(f"UPDATE locations SET app_dsn = app_dsn || '' WHERE id = ({silo})", (s.id,))  # still same
            # Control: a real change to the silo's DSN evicts the silo's tenant, and only it.
            conn.execute(f"UPDATE locations SET secret_ref = 'arn:example' WHERE id = ({silo})", (s.id,))
        await _eventually(await notified(1), timeout=5)
        reads = directory.refreshes
        assert (await directory.lookup(a.id)).status == "active"
        assert directory.refreshes == reads  # A still cached: nothing told it to go
        await directory.lookup(s.id)
        assert directory.refreshes == reads + 1  # S was evicted and read again
        assert directory.invalidations == seen + 1  # the status and no-op updates sent nothing
        # Control: the shared pool's location still evicts everyone.
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("UPDATE locations SET secret_ref = 'arn:pool' WHERE kind = 'pool'")
        await _eventually(await notified(2), timeout=5)
        await directory.lookup(a.id)
        assert directory.refreshes == reads + 2
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute("UPDATE locations SET secret_ref = NULL WHERE secret_ref IN ('arn:example', 'arn:pool')")
        await directory.close()


async def test_a_moving_tenant_connects_to_its_target_before_the_flip(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    """The route of a moving tenant names its target; the replica opens a pool there, routes nothing there."""
    a, b, s = world["A"], world["B"], world["S"]
    app = create_app(dp_settings)
    with world.catalog() as cat:
        target = cat.execute("SELECT location_id FROM tenants WHERE id = %s", (s.id,)).fetchone()
    assert target is not None
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client,
    ):
        engines: EngineRegistry = app.state.engines
        routes: RouteDirectory = app.state.routes
        assert (await client.get("/v1/projects", headers=a.headers)).status_code == 200
        assert (await routes.lookup(a.id)).upcoming is None
        assert not engines.has_engine(target[0])  # control: no move, no pool to anywhere else
        with world.catalog() as cat:
            cat.execute("UPDATE tenants SET status = 'moving', next_location_id = %s WHERE id = %s", (target[0], a.id))

        async def announced() -> bool:
            return (await routes.lookup(a.id)).upcoming is not None

        await _eventually(announced, timeout=5)  # the NOTIFY evicted A's cached route
        upcoming = (await routes.lookup(a.id)).upcoming
        assert upcoming is not None
        assert (upcoming.placement, upcoming.location_id, upcoming.epoch) == ("silo", target[0], 2)
        response = await client.get("/v1/projects", headers=a.headers)
        assert response.status_code == 200
        assert a.canary in response.text and s.canary not in response.text  # still served by the pool

        async def warmed() -> bool:
            # Every connection of the pool, not only its first: the held requests come at once.
            return engines.open_connections(target[0]) == dp_settings.silo_pool_size

        await _eventually(warmed, timeout=5)
        assert dp_settings.silo_pool_size > 1  # else "every connection" would be the first one

        listing = fused(LIST_FIRST, 1)  # what GET /v1/projects ran, before the move was announced

        async def prepared(statements: list[str]) -> list[int]:
            # Both connections at once: each is one the prewarm opened (and warmed).
            async with engines.connection(upcoming) as one, engines.connection(upcoming) as two:
                counts = []
                for conn in (one, two):
                    assert not conn.is_in_transaction()
                    counts.append(
                        await conn.fetchval(
                            "SELECT count(*) FROM pg_prepared_statements WHERE statement = ANY($1::text[])", statements
                        )
                    )
                return counts

        # Each backend has run the tenant transaction's first statement (refused: A is not served there),
        # and every fused statement of this process (refused by its guard), so the first ones after the
        # flip neither prepare nor plan cold inside the write pause.
        assert await prepared([BEGIN_TENANT]) == [1, 1]
        assert await prepared([listing]) == [1, 1]
        assert await prepared(list(FUSED_STATEMENTS)) == [len(FUSED_STATEMENTS)] * 2
        # Control: the unfused statement (never sent there) was not prepared there.
        assert await prepared([LIST_FIRST]) == [0, 0]
        # Nothing was written there: the target holds no row of A's.
        with psycopg.connect(libpq(s.owner_dsn)) as conn:
            for table in ("projects", "tasks"):
                count = conn.execute(f"SELECT count(*) FROM {table} WHERE tenant_id = %s", (a.id,)).fetchone()
                assert count == (0,)
        # Still nothing of the target reaches A; B (not moving) is untouched.
        response = await client.get("/v1/projects", headers=a.headers)
        assert a.canary in response.text and s.canary not in response.text
        assert (await routes.lookup(b.id)).upcoming is None
        with world.catalog() as cat:
            cat.execute("UPDATE tenants SET status = 'active', next_location_id = NULL WHERE id = %s", (a.id,))

        async def cleared() -> bool:
            return (await routes.lookup(a.id)).upcoming is None

        await _eventually(cleared, timeout=5)


async def test_a_flip_to_the_announced_target_is_taken_from_its_notify_without_a_catalog_read(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    """The flip's NOTIFY carries the new route: held requests need no catalog read inside the write pause.

    Allowed: the flip to the target the cached route announced is installed
    from the message, and equals what the catalog says. Denied: a change to
    any other location (here: back to the pool) is an eviction and a read.
    """
    a = world["A"]
    routes = RouteDirectory(world.endpoints.app_catalog_url, ttl=3600)
    await routes.start()
    with world.catalog() as cat:
        before = cat.execute("SELECT location_id, route_epoch FROM tenants WHERE id = %s", (a.id,)).fetchone()
        target = cat.execute("SELECT location_id FROM tenants WHERE id = %s", (world["S"].id,)).fetchone()
    assert before is not None and target is not None
    try:
        with world.catalog() as cat:
            cat.execute("UPDATE tenants SET status = 'moving', next_location_id = %s WHERE id = %s", (target[0], a.id))

        async def announced() -> bool:
            return (await routes.lookup(a.id)).upcoming is not None

        await _eventually(announced, timeout=5)
        reads = routes.refreshes
        with world.catalog() as cat:  # the flip, as the workflow writes it
            cat.execute(
                "UPDATE tenants SET status = 'active', placement = 'silo', location_id = %s, "
                "route_epoch = route_epoch + 1, next_location_id = NULL WHERE id = %s",
                (target[0], a.id),
            )

        async def arrived() -> bool:
            return routes.arrivals == 1

        await _eventually(arrived, timeout=5)
        route = await routes.lookup(a.id)
        assert (route.placement, route.location_id, route.epoch, route.status) == (
            "silo",
            target[0],
            before[1] + 1,
            "active",
        )
        assert route.upcoming is None
        assert routes.refreshes == reads  # taken from the message: no catalog read
        assert await routes.lookup(a.id, fresh=True) == route  # and the same route the catalog gives

        # Denied: back to the pool -- no announced target, so an eviction and a catalog read.
        with world.catalog() as cat:
            cat.execute(
                "UPDATE tenants SET placement = 'pool', location_id = %s, route_epoch = route_epoch + 1 WHERE id = %s",
                (before[0], a.id),
            )

        async def back() -> bool:
            return (await routes.lookup(a.id)).placement == "pool"

        await _eventually(back, timeout=5)
        assert routes.arrivals == 1 and routes.refreshes > reads + 1
    finally:
        with world.catalog() as cat:
            cat.execute(
                "UPDATE tenants SET status = 'active', placement = 'pool', location_id = %s, route_epoch = %s, "
                "next_location_id = NULL WHERE id = %s",
                (before[0], before[1], a.id),
            )
        await routes.close()


async def test_a_status_the_router_does_not_know_is_refused(world: World) -> None:
    """Serving is an allow-list: a status a newer catalog might add is refused (fail closed), not served."""
    directory = RouteDirectory(world.endpoints.app_catalog_url)
    await directory.start()
    try:
        route = await directory.lookup(world["A"].id)
    finally:
        await directory.close()
    assert route.require_servable() is route  # control: active
    assert dataclasses.replace(route, status="moving").require_servable().status == "moving"
    for status in ("archived", "", "Active"):
        with pytest.raises(TenantUnknownError):
            dataclasses.replace(route, status=status).require_servable()
