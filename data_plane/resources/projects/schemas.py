"""Request and response models of projects."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints


def no_nul(value: str) -> str:
    # PostgreSQL text cannot hold NUL; rejecting it here gives a 422, not a 500.
    if "\x00" in value:
        raise ValueError("must not contain NUL bytes")
    return value


Name = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(no_nul)]


class ProjectStatus(StrEnum):
    ACTIVE = "active"
    ARCHIVED = "archived"


class ProjectCreate(BaseModel):
    # extra="forbid": a body carrying tenant_id or id is refused (422), never
    # silently honoured (mass assignment).
    model_config = ConfigDict(extra="forbid")

    name: Name
    status: ProjectStatus = ProjectStatus.ACTIVE


class ProjectUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    status: ProjectStatus | None = None


class Project(BaseModel):
    id: uuid.UUID
    name: str
    status: ProjectStatus
    created_at: datetime
    updated_at: datetime
