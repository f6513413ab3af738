"""A small world for data-plane tests: two pool tenants and one silo tenant.

Loaded as a plugin by ``tests/conftest.py`` so that any test package can use it.

Catalog rows are written with SQL here (not through the admin API) so these
tests exercise the data plane alone. Each tenant owns canary strings that no
other tenant's response may ever contain.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
import psycopg
import pytest

from control_plane import keys
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.api import create_app
from data_plane.dsn import libpq
from data_plane.settings import DataPlaneSettings
from tests.harness import SILO_TEMPLATE, PgServers, app_dsn, asgi_client, fresh_database, owner_dsn


@dataclass
class TenantFixture:
    id: uuid.UUID
    slug: str
    token: str
    canary: str
    project_id: uuid.UUID
    task_id: uuid.UUID
    owner_dsn: str  # the database that holds its rows

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@dataclass
class World:
    endpoints: Endpoints
    settings: ControlPlaneSettings
    tenants: dict[str, TenantFixture] = field(default_factory=dict)

    def __getitem__(self, name: str) -> TenantFixture:
        return self.tenants[name]

    def foreign_canaries(self, name: str) -> list[str]:
        return [t.canary for n, t in self.tenants.items() if n != name]

    def catalog(self) -> psycopg.Connection:
        return psycopg.connect(libpq(self.endpoints.catalog_url), autocommit=True)


def seed_rows(dsn: str, tenant_id: uuid.UUID, canary: str) -> tuple[uuid.UUID, uuid.UUID]:
    project_id, task_id = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(libpq(dsn)) as conn:
        conn.execute(
            "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, %s)",
            (tenant_id, project_id, f"{canary}-project"),
        )
        conn.execute(
            "INSERT INTO tasks (tenant_id, id, project_id, title) VALUES (%s, %s, %s, %s)",
            (tenant_id, task_id, project_id, f"{canary}-task"),
        )
    return project_id, task_id


def add_pool_tenant(world: World, name: str, *, tier: str = "standard") -> TenantFixture:
    tenant_id = uuid.uuid4()
    slug = f"{name.lower()}-{secrets.token_hex(3)}"
    with world.catalog() as cat:
        cat.execute(
            "INSERT INTO tenants (id, slug, name, tier, status, placement, location_id, route_epoch) "
            "SELECT %s, %s, %s, %s, 'active', 'pool', id, 1 FROM locations WHERE name = 'pool'",
            (tenant_id, slug, name, tier),
        )
    with psycopg.connect(libpq(world.endpoints.pool_url)) as conn:
        conn.execute("SELECT tenantctl.claim_tenant(%s, 1)", (tenant_id,))
    canary = f"canary-{name}-{secrets.token_hex(6)}"
    project_id, task_id = seed_rows(world.endpoints.pool_url, tenant_id, canary)
    token = keys.tenant_token(world.settings, tenant_id=tenant_id)
    fixture = TenantFixture(tenant_id, slug, token, canary, project_id, task_id, world.endpoints.pool_url)
    world.tenants[name] = fixture
    return fixture


def add_silo_tenant(world: World, name: str, database: str, servers: PgServers) -> TenantFixture:
    tenant_id = uuid.uuid4()
    slug = f"{name.lower()}-{secrets.token_hex(3)}"
    silo_owner = owner_dsn(servers.silo_admin, database, servers.roles)
    with world.catalog() as cat:
        location = cat.execute(
            "INSERT INTO locations (name, kind, provider, database, dsn, app_dsn, tenant_id) "
            "VALUES (%s, 'silo', 'local', %s, %s, %s, %s) RETURNING id",
            (
                f"silo-{slug}",
                database,
                silo_owner,
                app_dsn(servers.silo_admin, database, servers.roles),
                tenant_id,
            ),
        ).fetchone()
        assert location is not None
        cat.execute(
            "INSERT INTO tenants (id, slug, name, tier, status, placement, location_id, route_epoch) "
            "VALUES (%s, %s, %s, 'enterprise', 'active', 'silo', %s, 1)",
            (tenant_id, slug, name, location[0]),
        )
    with psycopg.connect(libpq(silo_owner)) as conn:
        conn.execute("SELECT tenantctl.claim_tenant(%s, 1)", (tenant_id,))
    canary = f"canary-{name}-{secrets.token_hex(6)}"
    project_id, task_id = seed_rows(silo_owner, tenant_id, canary)
    token = keys.tenant_token(world.settings, tenant_id=tenant_id)
    fixture = TenantFixture(tenant_id, slug, token, canary, project_id, task_id, silo_owner)
    world.tenants[name] = fixture
    return fixture


@pytest.fixture
def silo_database(pg_servers: PgServers) -> Iterator[str]:
    with fresh_database(pg_servers.silo_admin, pg_servers.roles, template=SILO_TEMPLATE, prefix="t_silo") as db:
        yield db


@pytest.fixture
def world(endpoints: Endpoints, cp_settings: ControlPlaneSettings, pg_servers: PgServers, silo_database: str) -> World:
    world = World(endpoints=endpoints, settings=cp_settings)
    add_pool_tenant(world, "A")
    add_pool_tenant(world, "B")
    add_silo_tenant(world, "S", silo_database, pg_servers)
    return world


@pytest.fixture
async def client(dp_settings: DataPlaneSettings, world: World) -> AsyncIterator[httpx.AsyncClient]:
    async for c in asgi_client(create_app(dp_settings)):
        yield c
