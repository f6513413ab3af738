"""Rate limits (429 + Retry-After) and quotas (422 quota_exceeded) per tier."""

from __future__ import annotations

import asyncio

import httpx
import psycopg
from limits import parse
from limits.aio.strategies import FixedWindowRateLimiter

from data_plane.dsn import libpq
from data_plane.limits import LocalWindowStorage
from data_plane.settings import DataPlaneSettings
from tests.conftest import asgi_client
from tests.data_plane.conftest import World, add_pool_tenant
from tests.ops.conftest import dp_app


async def test_rate_limit_per_tier_answers_429_with_retry_after(dp_settings: DataPlaneSettings, world: World) -> None:
    free = add_pool_tenant(world, "F", tier="free")
    standard = world["A"]
    app = dp_app(dp_settings, rate_limits={"free": "5/minute", "standard": "1000/minute"})
    async for client in asgi_client(app):
        for _ in range(5):
            assert (await client.get("/v1/me", headers=free.headers)).status_code == 200
        refused = await client.get("/v1/me", headers=free.headers)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        # Control: another tenant (another tier) is not starved by the noisy one.
        for _ in range(10):
            assert (await client.get("/v1/me", headers=standard.headers)).status_code == 200
        metrics = (await client.get("/metrics")).text
        assert 'tenantctl_api_rate_limited_responses_total{tier="free"} 1.0' in metrics


async def test_rate_limit_is_per_tenant_not_per_tier(dp_settings: DataPlaneSettings, world: World) -> None:
    one, two = add_pool_tenant(world, "F1", tier="free"), add_pool_tenant(world, "F2", tier="free")
    app = dp_app(dp_settings, rate_limits={"free": "3/minute"})
    async for client in asgi_client(app):
        for _ in range(3):
            assert (await client.get("/v1/me", headers=one.headers)).status_code == 200
        assert (await client.get("/v1/me", headers=one.headers)).status_code == 429
        assert (await client.get("/v1/me", headers=two.headers)).status_code == 200


async def test_unknown_tier_gets_the_default_limit(dp_settings: DataPlaneSettings, world: World) -> None:
    odd = add_pool_tenant(world, "O", tier="platinum")
    app = dp_app(dp_settings, rate_limits={}, default_rate_limit="2/minute")
    async for client in asgi_client(app):
        assert [(await client.get("/v1/me", headers=odd.headers)).status_code for _ in range(3)] == [200, 200, 429]


def _count_projects(world: World, tenant_id: object) -> int:
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        row = conn.execute("SELECT count(*) FROM projects WHERE tenant_id = %s", (tenant_id,)).fetchone()
    assert row is not None
    return int(row[0])


async def test_project_quota_per_tier(dp_settings: DataPlaneSettings, world: World) -> None:
    free = add_pool_tenant(world, "Q", tier="free")  # seeded with one project
    app = dp_app(dp_settings, project_quotas={"free": 3})
    async for client in asgi_client(app):
        for i in range(2):
            created = await client.post("/v1/projects", json={"name": f"p{i}"}, headers=free.headers)
            assert created.status_code == 201, created.text
        refused = await client.post("/v1/projects", json={"name": "one too many"}, headers=free.headers)
        assert refused.status_code == 422
        assert refused.json()["error"]["code"] == "quota_exceeded"
        assert _count_projects(world, free.id) == 3
        # Control: a tier without a quota keeps creating.
        for i in range(4):
            assert (
                await client.post("/v1/projects", json={"name": f"s{i}"}, headers=world["A"].headers)
            ).status_code == 201
        # Deleting one frees room again.
        assert (await client.delete(f"/v1/projects/{free.project_id}", headers=free.headers)).status_code == 204
        assert (await client.post("/v1/projects", json={"name": "again"}, headers=free.headers)).status_code == 201


async def test_project_quota_holds_under_concurrent_creates(dp_settings: DataPlaneSettings, world: World) -> None:
    free = add_pool_tenant(world, "R", tier="free")  # seeded with one project
    other = add_pool_tenant(world, "R2", tier="free")
    app = dp_app(dp_settings, project_quotas={"free": 4}, pool_size=10, rate_limits={"free": "1000/second"})
    async for client in asgi_client(app):

        async def create(c: httpx.AsyncClient, headers: dict[str, str], i: int) -> httpx.Response:
            return await c.post("/v1/projects", json={"name": f"c{i}"}, headers=headers)

        responses = await asyncio.gather(
            *(create(client, free.headers, i) for i in range(12)), *(create(client, other.headers, i) for i in range(2))
        )
    mine = [r.status_code for r in responses[:12]]
    assert mine.count(201) == 3 and mine.count(422) == 9, mine
    assert _count_projects(world, free.id) == 4
    # Control: the other tenant's creates were not counted against this one's quota.
    assert [r.status_code for r in responses[12:]] == [201, 201]
    assert _count_projects(world, other.id) == 3


async def test_local_counters_count_per_window_and_forget_old_windows() -> None:
    storage = LocalWindowStorage(sweep_seconds=0.0)
    limiter = FixedWindowRateLimiter(storage)
    item = parse("2/second")
    assert [await limiter.hit(item, "a") for _ in range(3)] == [True, True, False]
    assert await limiter.hit(item, "b")  # control: another key has its own window
    stats = await limiter.get_window_stats(item, "a")
    assert stats.remaining == 0 and stats.reset_time > 0
    await asyncio.sleep(1.05)
    assert await limiter.hit(item, "a")  # a new window
    # Sweeping keeps only keys whose window is still open: memory is bounded
    # by the tenants seen in the last window, not by every tenant ever seen.
    assert len(storage) == 1
    await limiter.clear(item, "a")
    assert len(storage) == 0
