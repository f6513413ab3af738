"""``/v1/projects``: the example resource a new one is modelled on."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status

from data_plane.dependencies import Tenant, TenantRoute, TierQuotas
from data_plane.exceptions import ERROR_RESPONSES
from data_plane.pagination import DEFAULT_LIMIT, Cursor, Limit, Page, decode_cursor, page_of
from data_plane.resources.projects import service
from data_plane.resources.projects.schemas import Project, ProjectCreate, ProjectUpdate

router = APIRouter(prefix="/v1/projects", tags=["projects"], responses=ERROR_RESPONSES, route_class=TenantRoute)


@router.get("")
async def list_projects(tenant: Tenant, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None) -> Page[Project]:
    after = decode_cursor(cursor)
    rows = await service.list_projects(tenant.reads, limit=limit, after=after)
    return page_of(rows, limit=limit, model=Project)


@router.post("", status_code=status.HTTP_201_CREATED)
async def create_project(tenant: Tenant, quotas: TierQuotas, body: ProjectCreate) -> Project:
    quota = quotas.projects(tenant.route.tier)
    if quota is None:
        row = await service.create_project(tenant.writes, data=body)
    else:
        row = await tenant.run(service.create_project_under_quota, data=body, quota=quota)
    return Project.model_validate(dict(row))


@router.get("/{project_id}")
async def get_project(tenant: Tenant, project_id: uuid.UUID) -> Project:
    row = await service.get_project(tenant.reads, project_id=project_id)
    return Project.model_validate(dict(row))


@router.patch("/{project_id}")
async def update_project(tenant: Tenant, project_id: uuid.UUID, body: ProjectUpdate) -> Project:
    row = await tenant.run(service.update_project, project_id=project_id, data=body)
    return Project.model_validate(dict(row))


@router.delete("/{project_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_project(tenant: Tenant, project_id: uuid.UUID) -> Response:
    await tenant.run(service.delete_project, project_id=project_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
