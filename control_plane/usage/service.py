"""Reading metered usage from the catalog's ``tenant_usage`` (written by the data plane)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.catalog.service import resolve_tenant
from control_plane.usage.schemas import TenantUsage, UsageBucket, UsageTotals
from data_plane.exceptions import InvalidInputError

# Buckets whose hour starts in [from, to): a bucket is reported whole.
USAGE = sa.text(
    """
SELECT period_start, requests, rows_written, rows_stored
  FROM tenant_usage
 WHERE tenant_id = :tenant_id AND period_start >= date_trunc('hour', CAST(:start AS timestamptz), 'UTC')
   AND period_start < CAST(:end AS timestamptz)
 ORDER BY period_start
"""
)


async def tenant_usage(session: AsyncSession, *, ref: str, start: datetime, end: datetime) -> TenantUsage:
    if start.tzinfo is None or end.tzinfo is None:
        raise InvalidInputError("from and to need a time zone (e.g. 2026-11-23T20:00:00Z)")
    if start >= end:
        raise InvalidInputError("from must be before to")
    tenant = await resolve_tenant(session, ref)
    rows = (await session.execute(USAGE, {"tenant_id": tenant.id, "start": start, "end": end})).all()
    buckets = [
        UsageBucket(
            period_start=r.period_start, requests=r.requests, rows_written=r.rows_written, rows_stored=r.rows_stored
        )
        for r in rows
    ]
    stored = [b.rows_stored for b in buckets if b.rows_stored is not None]
    return TenantUsage(
        tenant_id=tenant.id,
        slug=tenant.slug,
        from_=start,
        to=end,
        totals=UsageTotals(
            requests=sum(b.requests for b in buckets),
            rows_written=sum(b.rows_written for b in buckets),
            rows_stored=stored[-1] if stored else None,
        ),
        buckets=buckets,
    )
