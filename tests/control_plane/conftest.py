"""Fixtures for the control plane: the admin app on a fresh catalog, tokens, helpers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import psycopg
import pytest

from control_plane import keys
from control_plane.api import create_app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.workflows.executor import Executor
from data_plane.dsn import libpq
from tests.conftest import asgi_client
from tests.harness import PgServers, fresh_endpoints


def admin_headers(settings: ControlPlaneSettings, subject: str = "alice") -> dict[str, str]:
    return {"Authorization": f"Bearer {keys.admin_token(settings, subject=subject)}"}


@pytest.fixture
async def admin(cp_settings: ControlPlaneSettings, endpoints: Endpoints) -> AsyncIterator[httpx.AsyncClient]:
    """An admin-API client authenticated as admin ``alice``."""
    app = create_app(cp_settings, endpoints)
    async for client in asgi_client(app):
        client.headers.update(admin_headers(cp_settings))
        yield client


def audit_entries(catalog_url: str, tenant_id: str | uuid.UUID | None = None) -> list[tuple[str, str]]:
    """(actor, action) of the audit log, oldest first."""
    with psycopg.connect(libpq(catalog_url)) as conn:
        if tenant_id is None:
            rows = conn.execute("SELECT actor, action FROM audit_log ORDER BY id").fetchall()
        else:
            rows = conn.execute(
                "SELECT actor, action FROM audit_log WHERE tenant_id = %s ORDER BY id", (str(tenant_id),)
            ).fetchall()
    return [(str(actor), str(action)) for actor, action in rows]


def ownership(dsn: str, tenant_id: str | uuid.UUID) -> tuple[str, int] | None:
    with psycopg.connect(libpq(dsn)) as conn:
        row = conn.execute(
            "SELECT state, epoch FROM tenantctl.tenant_ownership WHERE tenant_id = %s", (str(tenant_id),)
        ).fetchone()
    return None if row is None else (str(row[0]), int(row[1]))


# -- one workflow executor for the whole session (DBOS is a process-wide singleton) --


@pytest.fixture(scope="session")
def wf_endpoints(pg_servers: PgServers) -> Iterator[Endpoints]:
    with fresh_endpoints(pg_servers) as endpoints:
        yield endpoints


@pytest.fixture(scope="session")
def wf_settings(wf_endpoints: Endpoints, tmp_path_factory: pytest.TempPathFactory) -> ControlPlaneSettings:
    settings = ControlPlaneSettings(
        state_dir=tmp_path_factory.mktemp("wf-state"),
        environment="test",
        catalog_url=wf_endpoints.catalog_url,
        pool_url=wf_endpoints.pool_url,
        silo_server_url=wf_endpoints.silo_server_url,
        offboard_batch_size=3,
    )
    keys.ensure_dev_key(settings)
    return settings


@pytest.fixture(scope="session")
def executor(wf_settings: ControlPlaneSettings, wf_endpoints: Endpoints) -> Iterator[Executor]:
    with Executor(wf_settings, wf_endpoints, name=f"test-{uuid.uuid4().hex[:8]}") as running:
        yield running


@pytest.fixture
async def wf_admin(
    executor: Executor, wf_settings: ControlPlaneSettings, wf_endpoints: Endpoints
) -> AsyncIterator[httpx.AsyncClient]:
    async for client in asgi_client(create_app(wf_settings, wf_endpoints)):
        client.headers.update(admin_headers(wf_settings))
        yield client


@pytest.fixture
def tweak(executor: Executor) -> Iterator[Any]:
    """Change the running executor's settings or provisioner for one test."""
    context = executor.context
    settings, factory = context.settings, context.provisioner_factory

    def apply(*, provisioner: Any = None, **updates: Any) -> None:
        context.settings = settings.model_copy(update=updates)
        if provisioner is not None:
            context.provisioner_factory = lambda _settings, _endpoints: provisioner

    yield apply
    context.settings, context.provisioner_factory = settings, factory
