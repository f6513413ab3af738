"""Request and response models of tasks."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints

from data_plane.resources.projects.schemas import no_nul

Title = Annotated[str, StringConstraints(min_length=1, max_length=500), AfterValidator(no_nul)]


class TaskCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Title
    done: bool = False


class TaskUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Title | None = None
    done: bool | None = None


class Task(BaseModel):
    id: uuid.UUID
    project_id: uuid.UUID
    title: str
    done: bool
    created_at: datetime
    updated_at: datetime
