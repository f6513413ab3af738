"""Isolation suite: two pool tenants and one silo tenant with canaries.

Every denied case is paired with an allowed control, and every response body
is scanned for the other tenants' canary strings.
"""

from __future__ import annotations

import asyncio
import base64
import json
import uuid
from collections.abc import AsyncIterator, Callable

import httpx
import psycopg
import pytest
from fastapi import FastAPI
from starlette.types import Message

from data_plane.api import create_app
from data_plane.dsn import database_of, libpq, with_database
from data_plane.routing import EngineRegistry, RouteDirectory
from data_plane.session import TenantContext
from data_plane.settings import DataPlaneSettings
from tests.data_plane.conftest import World
from tests.harness import PgServers, asgi_client

NAMES = ("A", "B", "S")


def assert_no_foreign(world: World, name: str, response: httpx.Response) -> None:
    for canary in world.foreign_canaries(name):
        assert canary not in response.text, f"{name} saw another tenant's canary"


@pytest.mark.parametrize("name", NAMES)
async def test_each_tenant_lists_only_its_own_rows(client: httpx.AsyncClient, world: World, name: str) -> None:
    me = world[name]
    projects = await client.get("/v1/projects", headers=me.headers)
    assert projects.status_code == 200
    assert [p["name"] for p in projects.json()["data"]] == [f"{me.canary}-project"]
    tasks = await client.get(f"/v1/projects/{me.project_id}/tasks", headers=me.headers)
    assert tasks.status_code == 200
    assert [t["title"] for t in tasks.json()["data"]] == [f"{me.canary}-task"]
    for response in (projects, tasks):
        assert_no_foreign(world, name, response)


@pytest.mark.parametrize(("name", "other"), [("A", "B"), ("A", "S"), ("S", "A"), ("B", "A")])
async def test_foreign_ids_are_404_with_the_same_body_as_missing(
    client: httpx.AsyncClient, world: World, name: str, other: str
) -> None:
    me, them = world[name], world[other]
    missing = uuid.uuid4()
    cases = [
        ("GET", "/v1/projects/{}", them.project_id, missing, None),
        ("PATCH", "/v1/projects/{}", them.project_id, missing, {"name": "pwned"}),
        ("GET", "/v1/projects/{}/tasks", them.project_id, missing, None),
        ("POST", "/v1/projects/{}/tasks", them.project_id, missing, {"title": "pwned"}),
        ("GET", "/v1/tasks/{}", them.task_id, missing, None),
        ("PATCH", "/v1/tasks/{}", them.task_id, missing, {"done": True}),
        ("DELETE", "/v1/tasks/{}", them.task_id, missing, None),
        ("DELETE", "/v1/projects/{}", them.project_id, missing, None),
    ]
    for method, path, foreign_id, missing_id, body in cases:
        foreign = await client.request(method, path.format(foreign_id), headers=me.headers, json=body)
        absent = await client.request(method, path.format(missing_id), headers=me.headers, json=body)
        assert foreign.status_code == 404, (method, path, foreign.text)
        assert foreign.json() == absent.json()
        assert foreign.json()["error"]["code"] == "not_found"
        assert_no_foreign(world, name, foreign)
    # Control: the owner still sees its untouched rows.
    own = await client.get(f"/v1/projects/{them.project_id}", headers=them.headers)
    assert own.status_code == 200 and own.json()["name"] == f"{them.canary}-project"
    task = await client.get(f"/v1/tasks/{them.task_id}", headers=them.headers)
    assert task.status_code == 200 and task.json()["done"] is False


async def test_silo_tenant_rows_live_only_in_its_silo(client: httpx.AsyncClient, world: World) -> None:
    silo = world["S"]
    created = await client.post("/v1/projects", headers=silo.headers, json={"name": "silo-made"})
    assert created.status_code == 201
    project_id = created.json()["id"]
    with psycopg.connect(libpq(silo.owner_dsn)) as conn:
        assert conn.execute("SELECT tenant_id FROM projects WHERE id = %s", (project_id,)).fetchone() == (silo.id,)
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        assert conn.execute("SELECT count(*) FROM projects WHERE tenant_id = %s", (silo.id,)).fetchone() == (0,)
        # control: pool tenants' rows are in the pool
        assert conn.execute("SELECT count(*) FROM projects WHERE tenant_id = %s", (world["A"].id,)).fetchone() == (1,)
    me = await client.get("/v1/me", headers=silo.headers)
    assert me.json()["placement"]["kind"] == "silo"
    assert me.json()["tenant_id"] == str(silo.id)


@pytest.mark.parametrize(
    "body",
    [
        {"name": "x", "tenant_id": "00000000-0000-0000-0000-000000000001"},
        {"name": "x", "id": "00000000-0000-0000-0000-000000000001"},
    ],
)
async def test_mass_assignment_is_refused(client: httpx.AsyncClient, world: World, body: dict[str, str]) -> None:
    refused = await client.post("/v1/projects", headers=world["A"].headers, json=body)
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "invalid_input"
    allowed = await client.post("/v1/projects", headers=world["A"].headers, json={"name": "x"})
    assert allowed.status_code == 201
    assert allowed.json()["id"] != body.get("id")


async def test_crud_round_trip_and_pagination(client: httpx.AsyncClient, world: World) -> None:
    me = world["B"]
    ids = []
    for i in range(5):
        response = await client.post("/v1/projects", headers=me.headers, json={"name": f"p{i}"})
        assert response.status_code == 201
        ids.append(response.json()["id"])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "2"} | ({"cursor": cursor} if cursor else {})
        page = await client.get("/v1/projects", headers=me.headers, params=params)
        assert page.status_code == 200
        seen += [p["id"] for p in page.json()["data"]]
        assert len(page.json()["data"]) <= 2
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted([str(me.project_id), *ids])
    assert len(seen) == len(set(seen))

    patched = await client.patch(f"/v1/projects/{ids[0]}", headers=me.headers, json={"status": "archived"})
    assert patched.status_code == 200 and patched.json()["status"] == "archived" and patched.json()["name"] == "p0"
    task = await client.post(f"/v1/projects/{ids[0]}/tasks", headers=me.headers, json={"title": "t"})
    assert task.status_code == 201 and task.json()["project_id"] == ids[0]
    done = await client.patch(f"/v1/tasks/{task.json()['id']}", headers=me.headers, json={"done": True})
    assert done.json()["done"] is True
    assert (await client.delete(f"/v1/projects/{ids[0]}", headers=me.headers)).status_code == 204
    # the task went with its project (ON DELETE CASCADE within the tenant)
    assert (await client.get(f"/v1/tasks/{task.json()['id']}", headers=me.headers)).status_code == 404


@pytest.mark.parametrize(
    ("method", "path", "body", "params"),
    [
        ("POST", "/v1/projects", {"name": ""}, None),
        ("POST", "/v1/projects", {"name": "x" * 201}, None),
        ("POST", "/v1/projects", {"name": "nul\x00byte"}, None),
        ("POST", "/v1/projects", {"name": "x", "status": "deleted"}, None),
        ("GET", "/v1/projects", None, {"limit": "0"}),
        ("GET", "/v1/projects", None, {"limit": "1000"}),
        ("GET", "/v1/projects", None, {"cursor": "not-a-cursor"}),
        ("GET", "/v1/projects/not-a-uuid", None, None),
    ],
)
async def test_invalid_input_is_422(
    client: httpx.AsyncClient,
    world: World,
    method: str,
    path: str,
    body: object,
    params: dict[str, str] | None,
) -> None:
    response = await client.request(method, path, headers=world["A"].headers, json=body, params=params)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] in ("invalid_input", "invalid_cursor")


def _cursor_of(value: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "forged",
    [
        ["2020-01-01T00:00:00+00:00", 5],  # not a string id: uuid.UUID(5) raised AttributeError
        ["2020-01-01T00:00:00+00:00", ["x"]],
        ["0001-01-01T00:00:00+05:00", "2f1b2a0e-0000-4000-8000-000000000000"],  # before year 1 in UTC
        ["9999-12-31T23:59:59-05:00", "2f1b2a0e-0000-4000-8000-000000000000"],  # after year 9999 in UTC
        ["2020-01-01T00:00:00", "2f1b2a0e-0000-4000-8000-000000000000"],  # no offset
        {"created_at": "2020-01-01T00:00:00+00:00", "id": "x"},
    ],
)
@pytest.mark.parametrize("listing", ["projects", "tasks"])
async def test_forged_cursor_is_422(client: httpx.AsyncClient, world: World, forged: object, listing: str) -> None:
    me = world["A"]
    path = "/v1/projects" if listing == "projects" else f"/v1/projects/{me.project_id}/tasks"
    refused = await client.get(path, headers=me.headers, params={"cursor": _cursor_of(forged)})
    assert refused.status_code == 422, refused.text
    assert refused.json()["error"]["code"] == "invalid_cursor"
    # Control: a cursor of the same shape that the API writes continues the listing.
    valid = _cursor_of(["2000-01-01T00:00:00+05:00", "2f1b2a0e-0000-4000-8000-000000000000"])
    allowed = await client.get(path, headers=me.headers, params={"cursor": valid})
    assert allowed.status_code == 200, allowed.text
    assert len(allowed.json()["data"]) >= 1  # every row of the world is newer than 2000


async def test_oversized_body_is_413(client: httpx.AsyncClient, world: World) -> None:
    huge = {"name": "x" * 100_000}
    response = await client.post("/v1/projects", headers=world["A"].headers, json=huge)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"

    async def chunks():  # no Content-Length: the streamed size is what counts
        for _ in range(100):
            yield b"x" * 1024

    streamed = await client.post(
        "/v1/projects", headers=world["A"].headers | {"content-type": "application/json"}, content=chunks()
    )
    assert streamed.status_code == 413
    small = await client.post("/v1/projects", headers=world["A"].headers, json={"name": "ok"})
    assert small.status_code == 201


async def test_an_http2_body_without_length_headers_is_counted_too(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    """HTTP/1.x frames every body with Content-Length or Transfer-Encoding; HTTP/2 needs neither.

    The limit skips counting only a request that, by its protocol, has no body.
    """
    app = create_app(dp_settings)
    token = world["A"].headers["Authorization"].encode()

    async def status_of(http_version: str, body: bytes) -> int:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": http_version,
            "method": "POST",
            "scheme": "http",
            "path": "/v1/projects",
            "raw_path": b"/v1/projects",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"test"), (b"authorization", token), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 50000),
            "server": ("127.0.0.1", 8000),
        }
        parts = [body]
        sent: list[Message] = []

        async def receive() -> Message:
            return {"type": "http.request", "body": parts.pop() if parts else b"", "more_body": False}

        async def send(message: Message) -> None:
            sent.append(message)

        await app(scope, receive, send)
        return int(sent[0]["status"])

    async for _ in asgi_client(app):  # the app started (lifespan)
        assert await status_of("2", b'{"name": "' + b"x" * 100_000 + b'"}') == 413
        assert await status_of("2", b'{"name": "ok"}') == 201  # the control: a small body is served


async def test_openapi_documents_error_responses(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    responses = spec["paths"]["/v1/projects/{project_id}"]["get"]["responses"]
    assert {"401", "403", "404", "422"} <= set(responses)
    assert "ErrorResponse" in spec["components"]["schemas"]
    # The docs pages are served too (they are routed after the API's own routes).
    for page in ("/docs", "/redoc"):
        docs = await client.get(page)
        assert docs.status_code == 200 and "/openapi.json" in docs.text


@pytest.fixture
async def one_connection_app(
    dp_settings: DataPlaneSettings, world: World
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The tenant API with a pool of exactly one connection: every tenant reuses it."""
    app = create_app(DataPlaneSettings(**{**dp_settings.model_dump(), "pool_size": 1}))
    async for client in asgi_client(app):
        yield app, client


async def _until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        await asyncio.sleep(0.02)


def _tenant_lock_holders(world: World, tenant_id: uuid.UUID) -> list[int]:
    """Backends inside a tenant transaction of ``tenant_id`` (begin_tenant's shared lock)."""
    with psycopg.connect(libpq(world.endpoints.pool_url), autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT tenantctl.tenant_lock_holders(%s)", (tenant_id,)).fetchall()]


def _running(world: World, fragment: str) -> list[int]:
    """Backends of the pool now running a statement that contains ``fragment``."""
    # As the server's admin: other roles' query texts are hidden from the owner.
    assert world.endpoints.pool_admin_url is not None
    with psycopg.connect(libpq(world.endpoints.pool_admin_url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND pid <> pg_backend_pid()"
            " AND strpos(query, %s) > 0",
            (fragment,),
        ).fetchall()
        return [r[0] for r in rows]


async def _assert_connection_is_clean(app: FastAPI, world: World) -> None:
    """The single pooled connection carries no transaction and no tenant context."""
    route = await app.state.routes.lookup(world["B"].id)
    async with app.state.engines.connection(route) as conn:
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT current_setting('app.current_tenant_id', true)") in (None, "")
        assert await conn.fetchval("SELECT count(*) FROM projects") == 0  # no context: RLS shows nothing


async def test_http_request_cancelled_mid_transaction_leaks_nothing(
    one_connection_app: tuple[FastAPI, httpx.AsyncClient], world: World
) -> None:
    app, client = one_connection_app
    a, b = world["A"], world["B"]
    for name in ("A", "B"):  # warm: routes cached, the one connection opened
        assert (await client.get("/v1/projects", headers=world[name].headers)).status_code == 200
    with psycopg.connect(libpq(world.endpoints.pool_url)) as locker:
        # INSERT waits for this lock *after* BEGIN and begin_tenant: the
        # request is parked inside A's tenant transaction.
        locker.execute("LOCK TABLE projects IN EXCLUSIVE MODE")
        request = asyncio.create_task(
            client.post("/v1/projects", headers=a.headers, json={"name": "cancelled-http-write"})
        )
        await _until(lambda: bool(_tenant_lock_holders(world, a.id)), "A's request inside its transaction")
        request.cancel()  # the client goes away
        with pytest.raises(asyncio.CancelledError):
            await request
    # The lock is gone; B's request gets the same (only) connection next.
    after = await client.get("/v1/projects", headers=b.headers)
    assert [p["name"] for p in after.json()["data"]] == [f"{b.canary}-project"]
    assert_no_foreign(world, "B", after)
    written = await client.post("/v1/projects", headers=b.headers, json={"name": "b-after-cancel"})
    assert written.status_code == 201
    assert _tenant_lock_holders(world, a.id) == []
    await _assert_connection_is_clean(app, world)
    own = await client.get("/v1/projects", headers=a.headers)  # control: A is served, without the cancelled row
    assert [p["name"] for p in own.json()["data"]] == [f"{a.canary}-project"]
    with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
        assert pool.execute("SELECT count(*) FROM projects WHERE name = 'cancelled-http-write'").fetchone() == (0,)
        assert pool.execute("SELECT tenant_id FROM projects WHERE name = 'b-after-cancel'").fetchall() == [(b.id,)]


async def test_fused_read_cancelled_mid_statement_leaks_nothing(
    one_connection_app: tuple[FastAPI, httpx.AsyncClient], world: World
) -> None:
    app, client = one_connection_app
    a, b = world["A"], world["B"]
    directory: RouteDirectory = app.state.routes
    engines: EngineRegistry = app.state.engines
    ctx_a = TenantContext(tenant_id=a.id, route=await directory.lookup(a.id), directory=directory, engines=engines)
    # The fused statement binds A, then sleeps inside its implicit transaction.
    read = asyncio.create_task(ctx_a.reads.fetch("SELECT name FROM projects CROSS JOIN pg_sleep(60)"))
    await _until(lambda: bool(_running(world, "pg_sleep(60)")), "A's fused read running")
    read.cancel()
    with pytest.raises(asyncio.CancelledError):
        await read
    ctx_b = TenantContext(tenant_id=b.id, route=await directory.lookup(b.id), directory=directory, engines=engines)
    rows = await ctx_b.reads.fetch("SELECT name FROM projects")  # the same single connection
    assert [r["name"] for r in rows] == [f"{b.canary}-project"]
    response = await client.get("/v1/projects", headers=b.headers)
    assert [p["name"] for p in response.json()["data"]] == [f"{b.canary}-project"]
    assert_no_foreign(world, "B", response)
    assert _running(world, "pg_sleep(60)") == []
    await _assert_connection_is_clean(app, world)
    control = await ctx_a.reads.fetch("SELECT name FROM projects")  # A is served again afterwards
    assert [r["name"] for r in control] == [f"{a.canary}-project"]


async def test_one_connection_interleaved_writes_and_reads(
    one_connection_app: tuple[FastAPI, httpx.AsyncClient], world: World, pg_servers: PgServers
) -> None:
    _, client = one_connection_app
    seen: dict[str, list[httpx.Response]] = {"A": [], "B": []}
    created: dict[str, set[str]] = {"A": set(), "B": set()}

    async def call(name: str, method: str, path: str, status: int, body: object = None) -> httpx.Response:
        response = await client.request(method, path, headers=world[name].headers, json=body)
        assert response.status_code == status, (name, method, path, response.text)
        seen[name].append(response)
        return response

    async def session(name: str) -> None:
        canary = world[name].canary
        for i in range(4):
            project = (await call(name, "POST", "/v1/projects", 201, {"name": f"{canary}-p{i}"})).json()
            await call(name, "GET", "/v1/projects", 200)
            renamed = f"{canary}-p{i}-renamed"
            await call(name, "PATCH", f"/v1/projects/{project['id']}", 200, {"name": renamed, "status": "archived"})
            created[name].add(renamed)
            task = (
                await call(name, "POST", f"/v1/projects/{project['id']}/tasks", 201, {"title": f"{canary}-t{i}"})
            ).json()
            await call(name, "GET", f"/v1/projects/{project['id']}", 200)
            await call(name, "PATCH", f"/v1/tasks/{task['id']}", 200, {"done": True})
            await call(name, "GET", f"/v1/projects/{project['id']}/tasks", 200)
            await call(name, "GET", f"/v1/tasks/{task['id']}", 200)
            await call(name, "GET", "/v1/me", 200)

    # Both tenants' requests alternate on the one pooled connection.
    await asyncio.gather(session("A"), session("B"))
    for name in ("A", "B"):
        assert len(seen[name]) == 4 * 9
        for response in seen[name]:
            assert_no_foreign(world, name, response)
        listing = await client.get("/v1/projects", headers=world[name].headers, params={"limit": "100"})
        names = {p["name"] for p in listing.json()["data"]}
        assert names == created[name] | {f"{world[name].canary}-project"}
    with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
        for name in ("A", "B"):
            owners = pool.execute(
                "SELECT DISTINCT tenant_id FROM projects WHERE name LIKE %s", (f"{world[name].canary}%",)
            ).fetchall()
            assert owners == [(world[name].id,)]
            tasks = pool.execute(
                "SELECT DISTINCT tenant_id FROM tasks WHERE title LIKE %s", (f"{world[name].canary}-t%",)
            ).fetchall()
            assert tasks == [(world[name].id,)]
    with psycopg.connect(libpq(pg_servers.main_admin), autocommit=True) as admin:
        connections = admin.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = %s",
            (database_of(world.endpoints.pool_url), pg_servers.roles.app),
        ).fetchone()
    assert connections == (1,)  # really one connection for everything


async def test_a_silo_outage_is_503_on_a_replica_that_already_has_its_pool(
    dp_settings: DataPlaneSettings, world: World, pg_servers: PgServers, silo_database: str
) -> None:
    """The same outage answers the same 503 whether or not the replica had connected to the silo before.

    A pool that already existed used to surface it raw: a 500 for each pooled
    connection whose backend was terminated, then one per refused reconnect.
    """
    silo, pool_tenant = world["S"], world["A"]
    admin = libpq(with_database(pg_servers.silo_admin, "postgres"))
    async for client in asgi_client(create_app(dp_settings)):
        served = await client.get(f"/v1/projects/{silo.project_id}", headers=silo.headers)
        assert served.status_code == 200  # the replica now holds a pool of the silo
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'ALTER DATABASE "{silo_database}" ALLOW_CONNECTIONS false')
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (silo_database,))
        try:
            # The first finds its pooled backend gone, the next ones are refused a new one.
            down = [await client.get(f"/v1/projects/{silo.project_id}", headers=silo.headers) for _ in range(3)]
            # Control: the pool database is not down, and its tenants are served meanwhile.
            other = await client.get(f"/v1/projects/{pool_tenant.project_id}", headers=pool_tenant.headers)
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'ALTER DATABASE "{silo_database}" ALLOW_CONNECTIONS true')
        assert [r.status_code for r in down] == [503, 503, 503], [r.text for r in down]
        assert all(r.json()["error"]["code"] == "unavailable" and r.headers["retry-after"] for r in down)
        assert all(str(silo.id) not in r.text and silo.canary not in r.text for r in down)
        assert other.status_code == 200
        # And the replica recovers by itself once the silo is back.
        back = await client.get(f"/v1/projects/{silo.project_id}", headers=silo.headers)
        assert back.status_code == 200
