"""Task queries. Every function runs as, or inside, a tenant transaction."""

from __future__ import annotations

import uuid
from datetime import datetime

import asyncpg

from data_plane.exceptions import NotFoundError
from data_plane.resources.projects import service as projects
from data_plane.resources.projects.service import TENANT
from data_plane.resources.tasks.schemas import TaskCreate, TaskUpdate
from data_plane.session import TENANT_GUARD, TenantQueries

COLUMNS = "id, project_id, title, done, created_at, updated_at"

# One fused statement (TenantContext.writes): the row comes from the tenant guard.
INSERT = f"""
INSERT INTO tasks (tenant_id, id, project_id, title, done)
SELECT {TENANT}, $1, $2, $3, $4 FROM {TENANT_GUARD} RETURNING {COLUMNS}
"""
GET = f"SELECT {COLUMNS} FROM tasks WHERE tenant_id = {TENANT} AND id = $1"
LIST_FIRST = f"""
SELECT {COLUMNS} FROM tasks WHERE tenant_id = {TENANT} AND project_id = $1
ORDER BY created_at, id LIMIT $2
"""
LIST_AFTER = f"""
SELECT {COLUMNS} FROM tasks WHERE tenant_id = {TENANT} AND project_id = $1 AND (created_at, id) > ($3, $4)
ORDER BY created_at, id LIMIT $2
"""
UPDATE = f"""
UPDATE tasks SET title = coalesce($2, title), done = coalesce($3, done), updated_at = now()
 WHERE tenant_id = {TENANT} AND id = $1 RETURNING {COLUMNS}
"""
DELETE = f"DELETE FROM tasks WHERE tenant_id = {TENANT} AND id = $1 RETURNING id"

NOT_FOUND = "task not found"


async def create_task(db: TenantQueries, *, project_id: uuid.UUID, data: TaskCreate) -> asyncpg.Record:
    """Insert a task, in one statement: ``db`` is :attr:`TenantContext.writes`."""
    try:
        row = await db.fetchrow(INSERT, uuid.uuid4(), project_id, data.title, data.done)
    except asyncpg.ForeignKeyViolationError as exc:
        # The key is (tenant_id, project_id): the only way to fail is that this
        # tenant has no such project -- same answer as for a foreign one.
        raise NotFoundError(projects.NOT_FOUND) from exc
    assert row is not None
    return row


async def list_tasks(
    db: TenantQueries, *, project_id: uuid.UUID, limit: int, after: tuple[datetime, uuid.UUID] | None
) -> list[asyncpg.Record]:
    await projects.get_project(db, project_id=project_id)
    if after is None:
        return list(await db.fetch(LIST_FIRST, project_id, limit + 1))
    return list(await db.fetch(LIST_AFTER, project_id, limit + 1, *after))


async def get_task(db: TenantQueries, *, task_id: uuid.UUID) -> asyncpg.Record:
    row = await db.fetchrow(GET, task_id)
    if row is None:
        raise NotFoundError(NOT_FOUND)
    return row


async def update_task(db: TenantQueries, *, task_id: uuid.UUID, data: TaskUpdate) -> asyncpg.Record:
    row = await db.fetchrow(UPDATE, task_id, data.title, data.done)
    if row is None:
        raise NotFoundError(NOT_FOUND)
    return row


async def delete_task(db: TenantQueries, *, task_id: uuid.UUID) -> None:
    if await db.fetchval(DELETE, task_id) is None:
        raise NotFoundError(NOT_FOUND)
