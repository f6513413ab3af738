"""Request and response models of the admin API (DESIGN §5 shapes)."""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from data_plane.resources.projects.schemas import no_nul

SLUG_PATTERN = r"^[a-z0-9][a-z0-9-]{1,62}$"
SLUG = re.compile(SLUG_PATTERN)


def parse_tenant_id(ref: str) -> uuid.UUID | None:
    """``ref`` as a tenant id, or None when it is not one (then it can only be a slug).

    The one rule for telling ids from slugs in a ``{id or slug}`` reference: any
    string :class:`uuid.UUID` accepts -- 32 hex digits with or without dashes,
    wherever they are -- is an id.
    """
    try:
        return uuid.UUID(ref)
    except ValueError:
        return None


def _not_an_id(slug: str) -> str:
    # A slug that read as an id would be resolved as one: tenant A's slug spelling
    # tenant B's id would send every action on A to B, and otherwise A could not
    # be found by its slug at all.
    if parse_tenant_id(slug) is not None:
        raise ValueError("a slug must not have the form of a UUID (32 hex digits, dashes or not): that is an id")
    return slug


Slug = Annotated[str, StringConstraints(pattern=SLUG_PATTERN), AfterValidator(_not_an_id)]
# Strings stored as PostgreSQL text refuse NUL (422), as the tenant API's do.
Name = Annotated[str, StringConstraints(min_length=1, max_length=200, strip_whitespace=True), AfterValidator(no_nul)]
Tier = Annotated[str, StringConstraints(min_length=1, max_length=50), AfterValidator(no_nul)]
JobKindName = Annotated[str, StringConstraints(min_length=1, max_length=100), AfterValidator(no_nul)]

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
