"""Operations on a tenant store (the pool or a silo) through ``tenantctl.*`` functions.

All run as the owner role (``location.dsn`` / the pool's owner DSN), each in
its own short transaction, and all are idempotent.
"""

from __future__ import annotations

import uuid

import asyncpg

from data_plane.dsn import libpq

FENCE_LOCK_TIMEOUT = "10s"


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(libpq(dsn))


async def claim_tenant(dsn: str, tenant_id: uuid.UUID, epoch: int, state: str = "active") -> None:
    """Make this store serve ``tenant_id`` at ``epoch`` (upsert of its ownership row)."""
    conn = await _connect(dsn)
    try:
        await conn.execute("SELECT tenantctl.claim_tenant($1, $2, $3)", tenant_id, epoch, state)
    finally:
        await conn.close()


async def fence_tenant(dsn: str, tenant_id: uuid.UUID) -> None:
    """Drain in-flight tenant transactions and refuse new ones (tenant_fenced)."""
    conn = await _connect(dsn)
    try:
        async with conn.transaction():
            # Bounded wait for the drain; transaction-local, never a session SET.
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", FENCE_LOCK_TIMEOUT)
            await conn.execute("SELECT tenantctl.fence_tenant($1)", tenant_id)
    finally:
        await conn.close()


async def ownership_state(dsn: str, tenant_id: uuid.UUID) -> str | None:
    conn = await _connect(dsn)
    try:
        value = await conn.fetchval("SELECT state FROM tenantctl.tenant_ownership WHERE tenant_id = $1", tenant_id)
    finally:
        await conn.close()
    return None if value is None else str(value)


async def release_tenant(dsn: str, tenant_id: uuid.UUID) -> None:
    """Forget the tenant in this store (after its rows are gone)."""
    conn = await _connect(dsn)
    try:
        await conn.execute("DELETE FROM tenantctl.tenant_ownership WHERE tenant_id = $1", tenant_id)
    finally:
        await conn.close()
