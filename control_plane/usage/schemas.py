"""Response models of ``GET /v1/tenants/{id}/usage``."""

from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import BaseModel, Field


class UsageBucket(BaseModel):
    """One hour of one tenant's usage, summed over every data-plane replica."""

    period_start: datetime
    requests: int
    rows_written: int
    rows_stored: int | None


class UsageTotals(BaseModel):
    requests: int
    rows_written: int
    rows_stored: int | None  # the latest sample in the range


class TenantUsage(BaseModel):
    tenant_id: uuid.UUID
    slug: str
    from_: datetime = Field(serialization_alias="from")
    to: datetime
    totals: UsageTotals
    buckets: list[UsageBucket]
