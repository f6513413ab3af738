"""Shared fixtures: real PostgreSQL servers, fresh databases, settings, clients."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from control_plane import keys
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.settings import DataPlaneSettings
from tests.harness import PgServers, asgi_client, fresh_endpoints, prepare_templates, start_servers

pytest_plugins = ["tests.world"]


@pytest.fixture(scope="session")
def pg_servers() -> Iterator[PgServers]:
    # Not under pytest's tmp_path: pytest prunes old basetemp directories when a
    # newer session starts, which would pull a data directory from under a
    # server still running in a concurrent session.
    base = Path(tempfile.mkdtemp(prefix="tenantctl-test-"))
    servers = start_servers(base)
    try:
        prepare_templates(servers)
        yield servers
    finally:
        servers.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def endpoints(pg_servers: PgServers) -> Iterator[Endpoints]:
    with fresh_endpoints(pg_servers) as eps:
        yield eps


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def cp_settings(endpoints: Endpoints, state_dir: Path) -> ControlPlaneSettings:
    settings = ControlPlaneSettings(
        state_dir=state_dir,
        environment="test",
        catalog_url=endpoints.catalog_url,
        pool_url=endpoints.pool_url,
        silo_server_url=endpoints.silo_server_url,
        pool_admin_url=endpoints.pool_admin_url,
    )
    keys.ensure_dev_key(settings)
    return settings


@pytest.fixture
def dp_settings(endpoints: Endpoints, cp_settings: ControlPlaneSettings) -> DataPlaneSettings:
    return DataPlaneSettings(
        state_dir=cp_settings.state_dir,
        environment="test",
        app_catalog_url=endpoints.app_catalog_url,
        app_pool_url=endpoints.app_pool_url,
    )


__all__ = ["asgi_client"]
