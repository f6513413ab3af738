"""Fixtures for the control plane: the admin app on a fresh catalog, tokens, helpers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import psycopg
import pytest

from control_plane import keys
from control_plane.api import create_app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.dsn import libpq
from tests.conftest import asgi_client


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
