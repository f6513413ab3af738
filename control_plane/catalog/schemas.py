"""Request and response models of the admin API (DESIGN §5 shapes)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Slug = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$")]
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True)]
Tier = Annotated[str, StringConstraints(min_length=1, max_length=50)]

TenantStatus = Literal["provisioning", "active", "suspended", "moving", "offboarding", "deleted"]
PlacementKind = Literal["pool", "silo"]
JobStatus = Literal["pending", "running", "succeeded", "failed", "cancelled"]


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slug: Slug
    name: Name
    tier: Tier


class TenantUpdate(BaseModel):
    """PATCH body. ``version`` (or an ``If-Match`` header) makes the update conditional."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    tier: Tier | None = None
    version: int | None = Field(default=None, ge=1)


class PlacementOut(BaseModel):
    kind: PlacementKind
    location: str | None = Field(description="Location name (``pool``, ``silo-<slug>``), if placed.")


class TenantOut(BaseModel):
    id: uuid.UUID
    slug: str
    name: str
    tier: str
    status: TenantStatus
    placement: PlacementOut
    route_epoch: int
    version: int = Field(description="Optimistic-concurrency version (also the ETag).")


class TenantPage(BaseModel):
    data: list[TenantOut]
    next_cursor: str | None


class JobOut(BaseModel):
    id: uuid.UUID
    kind: str
    tenant_id: uuid.UUID | None
    status: JobStatus
    step: str | None
    progress: float = Field(ge=0, le=1, description="Fraction done, 0..1.")
    error: str | None
    detail: dict[str, Any] = Field(default_factory=dict, description="Counters of the current step.")
    created_at: datetime
    updated_at: datetime


class JobEnvelope(BaseModel):
    """The body of a 202: ``{"job": {...}}``."""

    job: JobOut


class JobPage(BaseModel):
    data: list[JobOut]
    next_cursor: str | None = None
