"""Project queries. Every function runs inside a tenant transaction.

Each statement names ``tenant_id = current setting`` explicitly as well as
relying on RLS: defence in depth, and it keeps a cached generic plan on the
tenant index for every tenant (PITFALLS: cached-plan trap).
"""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from data_plane.exceptions import NotFoundError, QuotaExceededError
from data_plane.resources.projects.schemas import ProjectCreate, ProjectUpdate
from data_plane.session import TENANT_GUARD, TenantQueries

TENANT = "(SELECT nullif(current_setting('app.current_tenant_id', true), ''))::uuid"
COLUMNS = "id, name, status, created_at, updated_at"

# One fused statement (TenantContext.writes): the row comes from the tenant guard.
INSERT = f"""
INSERT INTO projects (tenant_id, id, name, status)
SELECT {TENANT}, $1, $2, $3 FROM {TENANT_GUARD} RETURNING {COLUMNS}
"""
# A quota'd insert: the tenant's project-creating transactions are serialized
# by a transaction-scoped advisory lock (taken in a statement of its own, so
# that the INSERT's snapshot, taken after it, sees every committed project);
# then the row is inserted only while the count is under the quota.
QUOTA_LOCK = (
    "SELECT pg_advisory_xact_lock(hashtext('tenantctl.quota.projects'), "
    "hashtext(current_setting('app.current_tenant_id', true)))"
)
INSERT_UNDER_QUOTA = f"""
INSERT INTO projects (tenant_id, id, name, status)
SELECT {TENANT}, $1, $2, $3
 WHERE (SELECT count(*) FROM projects WHERE tenant_id = {TENANT}) < $4
RETURNING {COLUMNS}
"""
GET = f"SELECT {COLUMNS} FROM projects WHERE tenant_id = {TENANT} AND id = $1"
LIST_FIRST = f"""
SELECT {COLUMNS} FROM projects WHERE tenant_id = {TENANT}
ORDER BY created_at, id LIMIT $1
"""
LIST_AFTER = f"""
SELECT {COLUMNS} FROM projects WHERE tenant_id = {TENANT} AND (created_at, id) > ($2, $3)
ORDER BY created_at, id LIMIT $1
"""
UPDATE = f"""
UPDATE projects SET name = coalesce($2, name), status = coalesce($3, status), updated_at = now()
 WHERE tenant_id = {TENANT} AND id = $1 RETURNING {COLUMNS}
"""
DELETE = f"DELETE FROM projects WHERE tenant_id = {TENANT} AND id = $1 RETURNING id"

NOT_FOUND = "project not found"


async def create_project(db: TenantQueries, *, data: ProjectCreate) -> asyncpg.Record:
    """Insert a project, in one statement: ``db`` is :attr:`TenantContext.writes`."""
    row = await db.fetchrow(INSERT, uuid.uuid4(), data.name, data.status.value)
    assert row is not None
    return row


async def create_project_under_quota(db: TenantQueries, *, data: ProjectCreate, quota: int) -> asyncpg.Record:
    """Insert a project in a transaction (:meth:`TenantContext.run`); refuse (422 quota_exceeded) at ``quota``."""
    await db.fetchval(QUOTA_LOCK)
    row = await db.fetchrow(INSERT_UNDER_QUOTA, uuid.uuid4(), data.name, data.status.value, quota)
    if row is None:
        raise QuotaExceededError(f"the tier's quota of {quota} projects is used up")
    return row


async def get_project(db: TenantQueries, *, project_id: uuid.UUID) -> asyncpg.Record:
    row = await db.fetchrow(GET, project_id)
    if row is None:
        raise NotFoundError(NOT_FOUND)
    return row


async def list_projects(
    db: TenantQueries, *, limit: int, after: tuple[datetime, uuid.UUID] | None
) -> list[asyncpg.Record]:
    # One row more than asked tells whether a next page exists.
    if after is None:
        return list(await db.fetch(LIST_FIRST, limit + 1))
    return list(await db.fetch(LIST_AFTER, limit + 1, *after))


async def update_project(db: TenantQueries, *, project_id: uuid.UUID, data: ProjectUpdate) -> asyncpg.Record:
    status = data.status.value if data.status is not None else None
    row = await db.fetchrow(UPDATE, project_id, data.name, status)
    if row is None:
        raise NotFoundError(NOT_FOUND)
    return row


async def delete_project(db: TenantQueries, *, project_id: uuid.UUID) -> None:
    if await db.fetchval(DELETE, project_id) is None:
        raise NotFoundError(NOT_FOUND)
