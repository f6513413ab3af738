"""``GET /v1/tenants/{tenant}/usage?from=&to=`` on the admin API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from control_plane.catalog.dependencies import AdminPrincipal, CatalogSession
from control_plane.usage import service
from control_plane.usage.schemas import TenantUsage
from data_plane.exceptions import ERROR_RESPONSES

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)


@router.get("/tenants/{tenant}/usage", tags=["usage"])
async def get_usage(
    tenant: str,
    session: CatalogSession,
    _: AdminPrincipal,
    start: Annotated[datetime | None, Query(alias="from", description="Start (inclusive, hour-aligned down).")] = None,
    end: Annotated[datetime | None, Query(alias="to", description="End (exclusive); default now.")] = None,
) -> TenantUsage:
    """A tenant's (id or slug) metered usage per hour in ``[from, to)``; default the last 24 hours."""
    return await service.tenant_usage(session, ref=tenant, start=start, end=end)
