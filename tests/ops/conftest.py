"""Fixtures for operability tests: data-plane apps with chosen limits, the admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from control_plane import keys
from control_plane.api import create_app as create_admin_app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.api import create_app
from data_plane.settings import DataPlaneSettings
from tests.conftest import asgi_client


def dp_app(settings: DataPlaneSettings, **overrides: Any) -> Any:
    return create_app(settings.model_copy(update=overrides))


@pytest.fixture
async def admin(cp_settings: ControlPlaneSettings, endpoints: Endpoints) -> AsyncIterator[httpx.AsyncClient]:
    async for client in asgi_client(create_admin_app(cp_settings, endpoints)):
        client.headers["Authorization"] = f"Bearer {keys.admin_token(cp_settings)}"
        yield client
