"""Metrics with bounded labels on both APIs; structured logs without secrets or row contents."""

from __future__ import annotations

import asyncio
import io
import json
import re
import secrets
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import asyncpg
import httpx
import psycopg
import pytest
import sqlalchemy
import structlog
from sqlalchemy.ext.asyncio import create_async_engine

from control_plane.stack import Endpoints
from data_plane.dsn import async_url, libpq
from data_plane.logs import configure_logging, describe_exception, format_exception_safely
from data_plane.settings import DataPlaneSettings, LogFormat
from tests.conftest import asgi_client
from tests.data_plane.conftest import World
from tests.ops.conftest import dp_app


async def test_tenant_api_metrics_are_labelled_by_template_tier_and_placement(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    a, s = world["A"], world["S"]
    async for client in asgi_client(dp_app(dp_settings)):
        assert (await client.get(f"/v1/projects/{a.project_id}", headers=a.headers)).status_code == 200
        assert (await client.get(f"/v1/projects/{s.project_id}", headers=s.headers)).status_code == 200
        assert (await client.get("/v1/projects", headers=a.headers)).status_code == 200
        assert (await client.get("/v1/me", headers={"Authorization": "Bearer nope"})).status_code == 401
        text = (await client.get("/metrics")).text
    count = 'tenantctl_api_request_seconds_count{{method="GET",placement="{p}",route="{r}",status="{c}",tier="{t}"}}'
    assert count.format(p="pool", r="/v1/projects/{project_id}", c="200", t="standard") + " 1.0" in text
    assert count.format(p="silo", r="/v1/projects/{project_id}", c="200", t="enterprise") + " 1.0" in text
    assert count.format(p="none", r="/v1/me", c="401", t="none") + " 1.0" in text
    # A histogram: cumulative buckets whose "+Inf" is the count, and a sum of latencies.
    series = 'method="GET",placement="pool",route="/v1/projects/{project_id}",status="200",tier="standard"'
    buckets = re.findall(
        rf'^tenantctl_api_request_seconds_bucket{{le="([^"]+)",{re.escape(series)}}} (\S+)$', text, re.M
    )
    assert [le for le, _ in buckets][-1] == "+Inf" and len(buckets) == 13
    assert [float(v) for _, v in buckets] == sorted(float(v) for _, v in buckets) and float(buckets[-1][1]) == 1.0
    total = re.search(rf"^tenantctl_api_request_seconds_sum{{{re.escape(series)}}} (\S+)$", text, re.M)
    assert total is not None and 0 < float(total.group(1)) < 10
    assert re.search(r"^tenantctl_route_cache_refreshes_total [1-9]", text, re.M)
    assert re.search(r"^tenantctl_route_cache_hits_total [1-9]", text, re.M)
    assert "tenantctl_api_fenced_responses_total 0.0" in text
    # Bounded labels: no tenant id, object id or slug ever becomes a series.
    for tenant in world.tenants.values():
        for value in (str(tenant.id), str(tenant.project_id), tenant.slug):
            assert value not in text


async def test_admin_metrics_include_jobs_from_the_catalog(admin: httpx.AsyncClient, world: World) -> None:
    with world.catalog() as cat:
        cat.execute(
            "INSERT INTO jobs (id, kind, tenant_id, status, step, progress, created_by) VALUES "
            "(gen_random_uuid(), 'promotion', %s, 'running', 'copy', 0.5, 'test'), "
            "(gen_random_uuid(), 'offboarding', NULL, 'failed', NULL, 0.2, 'test')",
            (world["A"].id,),
        )
    text = (await admin.get("/metrics")).text
    assert 'tenantctl_jobs{kind="promotion",status="running"} 1.0' in text
    assert 'tenantctl_jobs{kind="offboarding",status="failed"} 1.0' in text
    assert 'tenantctl_job_progress{kind="promotion",step="copy"} 0.5' in text
    assert "tenantctl_moves_in_progress 1.0" in text
    assert 'tenantctl_tenants{placement="pool",status="active",tier="standard"} 2.0' in text
    assert 'tenantctl_tenants{placement="silo",status="active",tier="enterprise"} 1.0' in text
    assert str(world["A"].id) not in text


async def test_logs_carry_request_context_and_never_tokens_or_rows(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    a = world["A"]
    secret_name = f"row-canary-{secrets.token_hex(6)}"
    app = dp_app(dp_settings, log_format=LogFormat.JSON)
    stream = io.StringIO()
    configure_logging(app.state.settings, stream=stream)
    async for client in asgi_client(app):
        created = await client.post(
            "/v1/projects", json={"name": secret_name}, headers={**a.headers, "X-Request-ID": "req-42"}
        )
        assert created.status_code == 201 and created.headers["x-request-id"] == "req-42"
        got = await client.get(f"/v1/projects/{a.project_id}", headers=a.headers)
        assert got.status_code == 200 and a.canary in got.text  # the canary was served...
        generated = got.headers["x-request-id"]
        forged = await client.get("/v1/me", headers={**a.headers, "X-Request-ID": "x\nforged"})
        assert forged.headers["x-request-id"] != "x\nforged"
        assert (await client.get("/v1/me", headers={"Authorization": f"Bearer {a.token}x"})).status_code == 401
    structlog.reset_defaults()  # the stream above is this test's only
    output = stream.getvalue()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    access = [line for line in lines if line["event"] == "request"]
    assert len(access) == 4
    first = access[0]
    assert first["request_id"] == "req-42" and first["tenant_id"] == str(a.id)
    assert first["placement"] == "pool" and first["route_epoch"] == 1 and first["status"] == 201
    assert first["route"] == "/v1/projects" and first["tier"] == "standard"
    assert access[1]["request_id"] == generated
    # Access lines carry the same timestamp form as every other structlog line
    # (ISO 8601, UTC, microseconds), and the current time.
    for line in access:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", line["timestamp"]), line["timestamp"]
        stamped = datetime.strptime(line["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        assert abs((datetime.now(UTC) - stamped).total_seconds()) < 60
    # ...but never logged: no token, no header, no row content.
    assert a.token not in output and secret_name not in output and a.canary not in output
    assert "authorization" not in output.lower() and "bearer" not in output.lower()


async def test_an_unexpected_database_error_is_a_500_whose_log_names_the_constraint_not_the_row(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    """A constraint the service does not expect: a 500, and a log line that names it without the failing row."""
    a, pool = world["A"], world.endpoints.pool_url
    canary = f"row-canary-{secrets.token_hex(6)}"
    add = "ALTER TABLE projects ADD CONSTRAINT no_canaries CHECK (name NOT LIKE 'row-canary-%') NOT VALID"
    with psycopg.connect(libpq(pool), autocommit=True) as conn:
        conn.execute(add)
    try:
        # Control: each driver's own message quotes the row (so a plain traceback would log it).
        for raw in await _driver_errors(pool, a.id, canary):
            described = describe_exception(raw)
            assert canary in str(raw) and canary not in format_exception_safely(raw), type(raw)
            assert (
                described.startswith("[message withheld] (sqlstate=23514")
                and "constraint_name=no_canaries" in described
            )
        app = dp_app(dp_settings, log_format=LogFormat.JSON)
        stream = io.StringIO()
        configure_logging(app.state.settings, stream=stream)
        async for client in asgi_client(app):
            refused = await client.post("/v1/projects", json={"name": canary}, headers=a.headers)
            allowed = await client.post("/v1/projects", json={"name": "plain"}, headers=a.headers)
    finally:
        structlog.reset_defaults()
        with psycopg.connect(libpq(pool), autocommit=True) as conn:
            conn.execute("ALTER TABLE projects DROP CONSTRAINT no_canaries")
    assert refused.status_code == 500
    assert refused.json() == {"error": {"code": "internal_error", "message": "internal error"}}
    assert allowed.status_code == 201
    output = stream.getvalue()
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    [error] = [line for line in lines if line["event"] == "unhandled_error"]
    assert error["error_type"] == "CheckViolationError" and error["tenant_id"] == str(a.id)
    rendered = error["exception"]
    assert "Traceback (most recent call last)" in rendered and "data_plane/session.py" in rendered
    for name in ("sqlstate=23514", "table_name=projects", "constraint_name=no_canaries"):
        assert name in rendered
    assert [line["status"] for line in lines if line["event"] == "request"] == [500, 201]
    assert canary not in output


async def _driver_errors(dsn: str, tenant: uuid.UUID, name: str) -> list[BaseException]:
    """The same failing insert through asyncpg, psycopg and SQLAlchemy (asyncpg underneath)."""
    insert = "INSERT INTO projects (tenant_id, id, name) VALUES ({}, gen_random_uuid(), {})"
    errors: list[BaseException] = []
    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.CheckViolationError) as raw:
            await conn.execute(insert.format("$1", "$2"), tenant, name)
        errors.append(raw.value)
    finally:
        await conn.close()
    with psycopg.connect(libpq(dsn)) as sync, pytest.raises(psycopg.errors.CheckViolation) as raised:
        sync.execute(insert.format("%s", "%s"), (tenant, name))
    errors.append(raised.value)
    engine = create_async_engine(async_url(dsn))
    try:
        async with engine.connect() as session:
            with pytest.raises(sqlalchemy.exc.IntegrityError) as wrapped:
                await session.execute(sqlalchemy.text(insert.format(":t", ":n")), {"t": tenant, "n": name})
        errors.append(wrapped.value)
    finally:
        await engine.dispose()
    return errors


async def test_a_database_error_that_quotes_nothing_keeps_its_message(endpoints: Endpoints) -> None:
    conn = await asyncpg.connect(endpoints.pool_url)
    try:
        with pytest.raises(asyncpg.UndefinedTableError) as raw:
            await conn.execute("SELECT * FROM no_such_table")
    finally:
        await conn.close()
    assert describe_exception(raw.value) == 'relation "no_such_table" does not exist (sqlstate=42P01)'


def test_messages_are_kept_for_errors_that_do_not_quote_data() -> None:
    try:
        try:
            raise KeyError("some_setting")
        except KeyError as inner:
            raise RuntimeError("configuration incomplete") from inner
    except RuntimeError as exc:
        rendered = format_exception_safely(exc)
    assert "builtins.KeyError: 'some_setting'" in rendered
    assert "The above exception was the direct cause of the following exception:" in rendered
    assert rendered.endswith("builtins.RuntimeError: configuration incomplete")
    assert describe_exception(ValueError("x")) == "x"


async def test_a_task_a_request_starts_does_not_log_as_that_request(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    """A moving tenant's request starts the opening of the move's target (prewarm) in a task of its own.

    Tasks copy the context they are created in: without care, that task's log
    lines would carry the id of whichever request happened to start it.
    """
    a = world["A"]
    app = dp_app(dp_settings, log_format=LogFormat.JSON)
    stream = io.StringIO()
    configure_logging(app.state.settings, stream=stream)
    nowhere = "postgresql://nobody@127.0.0.1:1/nothing"  # refused at once: the prewarm fails and says so
    with world.catalog() as cat:
        target = cat.execute(
            "INSERT INTO locations (name, kind, provider, dsn, app_dsn) VALUES (%s, 'silo', 'local', %s, %s) "
            "RETURNING id",
            (f"silo-unreachable-{secrets.token_hex(4)}", nowhere, nowhere),
        ).fetchone()
        assert target is not None
        cat.execute("UPDATE tenants SET status = 'moving', next_location_id = %s WHERE id = %s", (target[0], a.id))
    try:
        async for client in asgi_client(app):
            got = await client.get("/v1/projects", headers={**a.headers, "X-Request-ID": "req-moving"})
            assert got.status_code == 200 and a.canary in got.text  # still served by the pool
            for _ in range(100):
                if "silo_prewarm_failed" in stream.getvalue():
                    break
                await asyncio.sleep(0.05)
    finally:
        structlog.reset_defaults()
        with world.catalog() as cat:
            cat.execute("UPDATE tenants SET status = 'active', next_location_id = NULL WHERE id = %s", (a.id,))
            cat.execute("DELETE FROM locations WHERE id = %s", (target[0],))
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    prewarm = [line for line in lines if line["event"] == "silo_prewarm_failed"]
    assert len(prewarm) == 1
    assert "request_id" not in prewarm[0] and "tenant_id" not in prewarm[0]
    # Control: the request's own line carries its id and tenant.
    (access,) = [line for line in lines if line["event"] == "request"]
    assert access["request_id"] == "req-moving" and access["tenant_id"] == str(a.id)


def test_redaction_of_secret_shaped_values() -> None:
    from data_plane.logs import REDACTED, redact_secrets

    event = redact_secrets(
        None,
        "info",
        {
            "event": "x",
            "authorization": "Bearer abc",
            "detail": "token eyJhbGciOi.eyJzdWIiOi.c2lnbmF0dXJl here",
            "url": "postgresql://app:hunter2@db/x",
        },
    )
    assert event["authorization"] == REDACTED
    assert "eyJ" not in event["detail"] and "hunter2" not in event["url"]


async def test_fenced_responses_count_fences_only_not_other_503s(dp_settings: DataPlaneSettings, world: World) -> None:
    import psycopg

    from data_plane.dsn import libpq

    a, b = world["A"], world["B"]
    fenced_total = re.compile(r"^tenantctl_api_fenced_responses_total (\S+)$", re.M)
    app = dp_app(dp_settings)
    async for client in asgi_client(app):
        with psycopg.connect(libpq(world.endpoints.pool_url)) as pool:
            pool.execute("SELECT tenantctl.fence_tenant(%s)", (a.id,))
        fenced = await client.get("/v1/projects", headers=a.headers)
        assert fenced.status_code == 503 and fenced.json()["error"]["code"] == "tenant_fenced"
        match = fenced_total.search((await client.get("/metrics")).text)
        assert match is not None and float(match.group(1)) == 1.0

        # The route catalog becomes unusable (its connection pool is gone): B's
        # uncached route cannot be read -- a 503 too, but no fence.
        await app.state.routes._pool.close()
        unavailable = await client.get("/v1/projects", headers=b.headers)
        assert unavailable.status_code == 503
        assert unavailable.json()["error"]["code"] == "unavailable"
        text = (await client.get("/metrics")).text
        match = fenced_total.search(text)
        assert match is not None and float(match.group(1)) == 1.0
        assert 'route="/v1/projects",status="503",tier="none"} 1.0' in text  # it was counted as a request


# Run in a child process: OpenTelemetry's global tracer provider can be set
# once per process, and this test must not leave one behind for the others.
_SPANS_OF_ONE_REQUEST = """
import asyncio, sys
import httpx
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

plane, enabled = sys.argv[1], sys.argv[2] == "on"
exporter = InMemorySpanExporter()
provider = TracerProvider()
provider.add_span_processor(SimpleSpanProcessor(exporter))
trace.set_tracer_provider(provider)  # what an application's OpenTelemetry SDK setup does
common = dict(state_dir="/nonexistent", jwt_hs256_secret="k" * 40, opentelemetry=enabled)
if plane == "tenant":
    from data_plane.api import create_app
    from data_plane.settings import DataPlaneSettings
    app = create_app(DataPlaneSettings(app_catalog_url="postgresql://u@127.0.0.1:1/c",
                                       app_pool_url="postgresql://u@127.0.0.1:1/p", **common))
else:
    from control_plane.api import create_app
    from control_plane.settings import ControlPlaneSettings
    from control_plane.stack import Endpoints
    app = create_app(ControlPlaneSettings(**common), Endpoints(*["postgresql://u@127.0.0.1:1/x"] * 6))

async def main() -> None:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/v1/no-such-route")  # served without the lifespan's databases
    assert response.status_code == 404, response.status_code
    print(len(exporter.get_finished_spans()))

asyncio.run(main())
"""


@pytest.mark.parametrize("plane", ["tenant", "admin"])
def test_fastapi_opentelemetry_is_off_unless_enabled(plane: str) -> None:
    """TENANTCTL_OPENTELEMETRY turns on FastAPI's native spans; off, a configured SDK gets none.

    Off by default because FastAPI, enabled, asks OpenTelemetry on every request
    whether a provider has been configured (a per-request cost with none).
    """

    def spans(enabled: str) -> int:
        done = subprocess.run(
            [sys.executable, "-c", _SPANS_OF_ONE_REQUEST, plane, enabled],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().splitlines()[-1])

    assert DataPlaneSettings.model_fields["opentelemetry"].default is False  # the default, whatever this shell sets
    assert spans("off") == 0
    assert spans("on") >= 1  # control: the same SDK setup receives the request's span
