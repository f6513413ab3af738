"""Usage metering: per-tenant counts aggregated in memory, flushed to the catalog.

The request path only increments two integers in a dict (:meth:`UsageMeter.record`,
called by the ASGI middleware after the response). A background task started in
the app's lifespan flushes every ``usage_flush_seconds`` and once more on
shutdown: one ``INSERT ... ON CONFLICT DO UPDATE`` adds this replica's counts to
the hour bucket of ``tenant_usage`` in the catalog, so any number of replicas
add up. A failed flush keeps its counts for the next one.

``rows_stored`` is a gauge, sampled (off the request path) for the tenants that
wrote since the last flush, each at most every ``sample_every`` seconds: a
count of every row is a scan, over a second of the database's CPU for a tenant
of a million rows, and counting every tenant that wrote on every flush of every
replica would keep the databases busy counting. It is one read through RLS on
the tenant's own database, exactly as a request would see the rows, on the fused
read path: a read takes no share of a move's fence, so a long count never holds
up a fence's drain (which would wait for it, up to its timeout, inside the
tenant's write pause, and then terminate it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
import structlog

from data_plane.dsn import libpq
from data_plane.exceptions import TenantctlError
from data_plane.routing import EngineRegistry, RouteDirectory
from data_plane.session import TenantContext

log = structlog.get_logger(__name__)

BUCKET_SECONDS = 3600
# How the flush's catalog connection shows in pg_stat_activity.
APPLICATION_NAME = "tenantctl usage meter"
# A sample is best effort: a slow count must not hold the flush (and its counts) back.
SAMPLE_TIMEOUT_SECONDS = 2.0
FLUSH = """
INSERT INTO tenant_usage AS u (tenant_id, period_start, requests, rows_written, rows_stored)
SELECT * FROM unnest($1::uuid[], $2::timestamptz[], $3::bigint[], $4::bigint[], $5::bigint[])
ON CONFLICT (tenant_id, period_start) DO UPDATE
   SET requests = u.requests + EXCLUDED.requests,
       rows_written = u.rows_written + EXCLUDED.rows_written,
       rows_stored = coalesce(EXCLUDED.rows_stored, u.rows_stored),
       updated_at = now()
"""
# Tenant tables the data plane serves. Counted through RLS in a tenant
# transaction: the application role sees the tenant's rows and no others.
STORED_TABLES = ("projects", "tasks")
ROWS_STORED = "SELECT " + " + ".join(f"(SELECT count(*) FROM {t})" for t in STORED_TABLES)


def bucket_of(now: float) -> datetime:
    return datetime.fromtimestamp(now - now % BUCKET_SECONDS, tz=UTC)


class UsageMeter:
    """In-memory per-tenant counters of one replica."""

    def __init__(self, catalog_dsn: str, *, interval: float = 10.0, sample_every: float = 300.0) -> None:
        self._dsn = libpq(catalog_dsn)
        self._interval = interval
        self._sample_every = sample_every
        # tenant -> when its rows stored were last counted (monotonic)
        self._sampled: dict[uuid.UUID, float] = {}
        # tenant -> [requests, rows_written]; a list is mutated in place, so a
        # request after the first one of a window allocates nothing.
        self._counts: dict[uuid.UUID, list[int]] = {}
        self._bucket = bucket_of(time.time())
        self._task: asyncio.Task[None] | None = None
        self._routes: RouteDirectory | None = None
        self._engines: EngineRegistry | None = None
        # One catalog connection, kept between flushes: a connection per flush
        # was a new PostgreSQL backend every 10 s, and its start-up, on a busy
        # host, stalled the requests in flight (a p99 of 50-90 ms in the
        # fixed-rate rounds of bench api that a flush fell in, 3 ms in others).
        self._pool: asyncpg.Pool | None = None
        self.flushes = 0
        self.flush_failures = 0
        # Set while the periodic task is inside a flush, and once closing.
        self._flushing = False
        self._closing = False

    def record(self, tenant_id: uuid.UUID, rows_written: int) -> None:
        """Count one request of ``tenant_id`` (the hot path: no I/O, no await)."""
        counts = self._counts.get(tenant_id)
        if counts is None:
            self._counts[tenant_id] = [1, rows_written]
        else:
            counts[0] += 1
            counts[1] += rows_written

    def start(self, routes: RouteDirectory, engines: EngineRegistry) -> None:
        self._routes, self._engines = routes, engines
        self._task = asyncio.create_task(self._flush_forever(), name="usage-flush")

    async def close(self) -> None:
        self._closing = True  # the flush in progress samples no more tenants, and is the loop's last
        if self._task is not None:
            # A flush in progress is awaited, never cancelled: it has taken
            # the counts out of memory before sampling rows stored (seconds),
            # and cancelling it there lost them (the final flush below found
            # nothing); cancelled in its INSERT, it could count them twice.
            if not self._flushing:
                self._task.cancel()  # asleep between flushes: it holds nothing
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        # The last counts, without sampling rows stored: at shutdown the
        # engines may hold connections of cancelled requests, and the counts
        # are what must not be lost.
        await self.flush(sample=False)
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _flush_forever(self) -> None:
        while not self._closing:
            await asyncio.sleep(self._interval)
            # No await between waking and this flag: close() sees either a
            # sleeping task (cancelled) or a flushing one (awaited).
            self._flushing = True
            try:
                await self.flush()
            finally:
                self._flushing = False

    async def flush(self, *, sample: bool = True) -> bool:
        """Write the counts gathered since the last flush; True if it was written (or nothing to write)."""
        now = time.time()
        counts, bucket = self._counts, self._bucket
        # Swap first: requests served while this flush awaits count into the next one.
        self._counts, self._bucket = {}, bucket_of(now)
        if not counts:
            return True
        tenants = list(counts)
        # Forget counts older than the interval: the map stays as small as the
        # set of tenants counted recently.
        mono = time.monotonic()
        self._sampled = {t: at for t, at in self._sampled.items() if mono - at < self._sample_every}
        stored = [
            await self._rows_stored(t) if sample and counts[t][1] and t not in self._sampled else None for t in tenants
        ]
        try:
            if self._pool is None:
                # Connects on first use (min_size=0) and again after a broken connection.
                self._pool = await asyncpg.create_pool(
                    self._dsn, min_size=0, max_size=1, timeout=5, server_settings={"application_name": APPLICATION_NAME}
                )
            async with self._pool.acquire(timeout=5) as conn:
                await conn.execute(
                    FLUSH,
                    tenants,
                    [bucket] * len(tenants),
                    [counts[t][0] for t in tenants],
                    [counts[t][1] for t in tenants],
                    stored,
                )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            self.flush_failures += 1
            log.warning("usage_flush_failed", error=type(exc).__name__, tenants=len(tenants))
            self._merge_back(counts, bucket)
            return False
        self.flushes += 1
        return True

    def _merge_back(self, counts: dict[uuid.UUID, list[int]], bucket: datetime) -> None:
        # Counts of an older bucket are credited to the current one rather than
        # lost: usage may shift by one hour under a catalog outage, never vanish.
        for tenant_id, (requests, rows) in counts.items():
            current = self._counts.setdefault(tenant_id, [0, 0])
            current[0] += requests
            current[1] += rows
        del bucket

    async def _rows_stored(self, tenant_id: uuid.UUID) -> int | None:
        if self._routes is None or self._engines is None or self._closing:
            return None
        try:
            route = (await self._routes.lookup(tenant_id)).require_servable()
            ctx = TenantContext(tenant_id=tenant_id, route=route, directory=self._routes, engines=self._engines)
            value = await asyncio.wait_for(ctx.reads.fetchval(ROWS_STORED), timeout=SAMPLE_TIMEOUT_SECONDS)
        except (
            TenantctlError,
            OSError,
            TimeoutError,
            asyncpg.PostgresError,
            asyncpg.InterfaceError,
            asyncpg.InternalClientError,
        ) as exc:
            # Suspended, fenced or moving: sample it next time it writes.
            log.info("usage_rows_stored_skipped", tenant_id=str(tenant_id), reason=type(exc).__name__)
            return None
        # Counted: not again within the interval (a skipped count is tried at the next flush).
        self._sampled[tenant_id] = time.monotonic()
        return None if value is None else int(value)

    def pending(self) -> Sequence[uuid.UUID]:
        return list(self._counts)
