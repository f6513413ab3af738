"""Reading metered usage from the catalog's ``tenant_usage`` (written by the data plane)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

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


DEFAULT_RANGE = timedelta(days=1)


def usage_range(start: datetime | None, end: datetime | None) -> tuple[datetime, datetime]:
    """``[from, to)`` in UTC: ``to`` defaults to now, ``from`` to a day before ``to``.

    Both are client input and must be instants PostgreSQL can hold: the
    default range can overflow (``to=0001-01-01T00:00:00Z``), and a time that
    exists only with its offset (``0001-01-01T00:00:00+01:00``) overflowed in
    the driver converting it to UTC inside the query -- both were 500s.
    """
    if (start is not None and start.tzinfo is None) or (end is not None and end.tzinfo is None):
        raise InvalidInputError("from and to need a time zone (e.g. 2026-11-23T20:00:00Z)")
    try:
        end = datetime.now(UTC) if end is None else end.astimezone(UTC)
        start = end - DEFAULT_RANGE if start is None else start.astimezone(UTC)
    except OverflowError:
        raise InvalidInputError(
            "from and to must fall within the years 1 to 9999 in UTC "
            "(and to at least a day into year 1 when from is omitted)"
        ) from None
    if start >= end:
        raise InvalidInputError("from must be before to")
    return start, end


async def tenant_usage(
    session: AsyncSession, *, ref: str, start: datetime | None = None, end: datetime | None = None
) -> TenantUsage:
    """Hourly usage in ``[start, end)`` (see :func:`usage_range` for defaults and limits)."""
    start, end = usage_range(start, end)
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
