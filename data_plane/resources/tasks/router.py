"""``/v1/projects/{id}/tasks`` and ``/v1/tasks/{id}``."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from data_plane.dependencies import Tenant, TenantRoute
from data_plane.exceptions import ERROR_RESPONSES
from data_plane.pagination import DEFAULT_LIMIT, Cursor, Limit, Page, decode_cursor, page_of
from data_plane.resources.tasks import service
from data_plane.resources.tasks.schemas import Task, TaskCreate, TaskUpdate

router = APIRouter(tags=["tasks"], responses=ERROR_RESPONSES, route_class=TenantRoute)


@router.get("/v1/projects/{project_id}/tasks")
async def list_tasks(
    tenant: Tenant, project_id: uuid.UUID, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Page[Task]:
    after = decode_cursor(cursor)
    rows = await tenant.run(service.list_tasks, project_id=project_id, limit=limit, after=after)
    return page_of(rows, limit=limit, model=Task)


@router.post("/v1/projects/{project_id}/tasks", status_code=status.HTTP_201_CREATED)
async def create_task(tenant: Tenant, project_id: uuid.UUID, body: TaskCreate) -> Task:
    row = await service.create_task(tenant.writes, project_id=project_id, data=body)
    return Task.model_validate(dict(row))


@router.get("/v1/tasks/{task_id}")
async def get_task(tenant: Tenant, task_id: uuid.UUID) -> Task:
    row = await service.get_task(tenant.reads, task_id=task_id)
    return Task.model_validate(dict(row))


@router.patch("/v1/tasks/{task_id}")
async def update_task(tenant: Tenant, task_id: uuid.UUID, body: TaskUpdate) -> Task:
    row = await tenant.run(service.update_task, task_id=task_id, data=body)
    return Task.model_validate(dict(row))


@router.delete("/v1/tasks/{task_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_task(tenant: Tenant, task_id: uuid.UUID) -> Response:
    await tenant.run(service.delete_task, task_id=task_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
