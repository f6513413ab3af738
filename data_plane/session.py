"""Tenant transactions: every query runs on the database that owns the tenant now.

``tenantctl.begin_tenant(tenant, epoch)`` binds ``app.current_tenant_id``
transaction-locally (a bound parameter, never string-built SQL) and verifies that
*this* database serves the tenant at the route's epoch, in the same round trip
as the work it guards. Three shapes:

* :meth:`TenantContext.run` -- ``BEGIN``, ``begin_tenant``, the work function's
  statements, ``COMMIT``: for writes and multi-statement work;
* :attr:`TenantContext.writes` -- a single ``INSERT ... SELECT ... FROM
  $tenant_guard``, run as one statement (its own transaction, one round trip)
  whose only row source is ``begin_tenant`` itself::

      INSERT INTO t (...) SELECT <values> FROM
          (SELECT tenantctl.begin_tenant(tenant, epoch) AS ok OFFSET 0) AS _guard
      RETURNING ...

  The inserted row is produced by scanning ``_guard``, so nothing is written
  before ``begin_tenant`` has taken the tenant's shared lock, checked
  ownership (its own statements read fresh snapshots, taken after the lock:
  a fence is never missed) and bound the setting that the values and the
  policy's check read (InitPlans, evaluated when first needed). The lock is
  held to the statement's commit, so the fence drains it like any tenant
  transaction. A query that is not fused fails: ``$tenant_guard`` is not SQL.
  Writes of more than one statement, and any UPDATE or DELETE (whose scan
  order the planner chooses), use :meth:`TenantContext.run`;
* :attr:`TenantContext.reads` -- a single SELECT *fused* with the ownership
  check into one statement and one round trip (the hot read path)::

      SELECT q.* FROM (
          SELECT CASE WHEN <owned here, active, at the epoch>
                      THEN set_config('app.current_tenant_id', tenant, true) IS NOT NULL
                      ELSE tenantctl.refuse_tenant(...) END AS ok
            FROM <the tenant> LEFT JOIN tenantctl.tenant_ownership ...) AS _t
      CROSS JOIN LATERAL (SELECT * FROM (<query>) AS _q WHERE _t.ok OFFSET 0) AS q

  The check is plain SQL in the read's own snapshot, so the rows come from the
  same snapshot that saw this database own the tenant; a read commits nothing,
  so it needs no share of the fence's lock (see migration ``tenant_0004``).
  ``refuse_tenant`` raises ``begin_tenant``'s SQLSTATEs and runs only on the
  refusing branch. ``OFFSET 0`` keeps each side a subquery of its own, and
  the lateral reference makes the query the inner side of a nested loop whose
  outer row computes ``ok``, so it runs after the setting is bound; the
  policy's sub-select is an InitPlan, evaluated when first needed. Were that
  order ever violated, the setting would read as empty and RLS would return
  zero rows: the failure mode is "not found", never another tenant's row.

If the database says the tenant lives elsewhere (a stale route after a move),
the route is refreshed and the work retried once on the new location. A fenced
tenant (a move's cutover, milliseconds long) is held briefly and retried, then
answered 503 with ``Retry-After``. Only errors raised by ``begin_tenant`` lead to
a retry: at that point nothing has run, so a write is never applied twice.
"""

from __future__ import annotations

import contextlib
import functools
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

import asyncpg

from data_plane.exceptions import ServiceUnavailableError, StaleRouteError, TenantFencedError
from data_plane.ownership import BEGIN_TENANT, FENCED, FUSED_STATEMENTS, NOT_SERVED_HERE, STALE_EPOCH
from data_plane.routing import EngineRegistry, Route, RouteDirectory

P = ParamSpec("P")
T = TypeVar("T")

FENCE_HOLD_SECONDS = 2.0
FENCE_POLL_MAX_SECONDS = 0.05

# The tenant database is down, restarting, failing over or out of
# connections: the same 503 a replica gives when it cannot open the database's
# pool at all (``EngineRegistry``). Without this, a pool that already existed
# surfaced the outage raw: a 500 per pooled connection whose backend was
# terminated (ConnectionDoesNotExistError), then one per refused reconnect.
UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused or reset socket; TimeoutError too
    asyncpg.ConnectionDoesNotExistError,  # the backend went away mid-request
    asyncpg.PostgresConnectionError,  # class 08
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.OperatorInterventionError,  # class 57: shutdown, crash recovery, "cannot connect now"
    asyncpg.ObjectNotInPrerequisiteStateError,  # 55000 "database does not allow connections", 55P03 lock timeout
    asyncpg.InvalidAuthorizationSpecificationError,  # class 28: a rotated password (re-read when the pool is new)
)

current_tenant: ContextVar[uuid.UUID | None] = ContextVar("current_tenant", default=None)


@contextlib.contextmanager
def bound_tenant(tenant_id: uuid.UUID) -> Iterator[None]:
    """Set :data:`current_tenant` (for logs) for the block and always reset it."""
    token = current_tenant.set(tenant_id)
    try:
        yield
    finally:
        current_tenant.reset(token)


class TenantQueries(Protocol):
    """What service functions query through: a transaction or the fused read path."""

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]: ...

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None: ...

    async def fetchval(self, query: str, *args: Any) -> Any: ...


class Transaction:
    """:class:`TenantQueries` inside an open tenant transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return list(await self.conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        return await self.conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self.conn.fetchval(query, *args)

    async def execute(self, query: str, *args: Any) -> str:
        return await self.conn.execute(query, *args)


@functools.cache  # the statements are module constants: one build each
def fused(query: str, nargs: int) -> str:
    """``query`` (one SELECT with ``$1..$nargs``) fused with the ownership check.

    The tenant and the route's epoch are parameters ``$nargs+1`` and ``$nargs+2``.
    """
    if not query.lstrip().upper().startswith("SELECT"):
        raise ValueError("only a single SELECT can be fused; run writes with TenantContext.writes or .run")
    tenant, epoch = f"${nargs + 1}::uuid", f"${nargs + 2}::bigint"
    statement = (
        "SELECT q.* FROM (SELECT CASE"
        f" WHEN o.state = 'active' AND (o.epoch = {epoch} OR {epoch} IS NULL)"
        f" THEN pg_catalog.set_config('app.current_tenant_id', {tenant}::text, true) IS NOT NULL"
        f" ELSE tenantctl.refuse_tenant(_want.tenant_id, o.state, o.epoch, {epoch}) END AS ok"
        f" FROM (SELECT {tenant} AS tenant_id) AS _want"
        " LEFT JOIN tenantctl.tenant_ownership AS o ON o.tenant_id = _want.tenant_id OFFSET 0) AS _t"
        f" CROSS JOIN LATERAL (SELECT * FROM ({query}) AS _q WHERE _t.ok OFFSET 0) AS q"
    )
    FUSED_STATEMENTS[statement] = nargs
    return statement


# Where a fused INSERT takes its row from: replaced by :func:`fused_insert`.
TENANT_GUARD = "$tenant_guard"


@functools.cache
def fused_insert(query: str, nargs: int) -> str:
    """``query`` (one ``INSERT ... SELECT ... FROM $tenant_guard`` with ``$1..$nargs``) guarded by ``begin_tenant``.

    The tenant and the route's epoch are parameters ``$nargs+1`` and ``$nargs+2``.
    """
    if not query.lstrip().upper().startswith("INSERT") or query.count(TENANT_GUARD) != 1:
        raise ValueError(f"a fused write is one INSERT ... SELECT ... FROM {TENANT_GUARD}; run others with run()")
    guard = f"(SELECT tenantctl.begin_tenant(${nargs + 1}::uuid, ${nargs + 2}::bigint) AS ok OFFSET 0) AS _guard"
    statement = query.replace(TENANT_GUARD, guard)
    FUSED_STATEMENTS[statement] = nargs
    return statement


@dataclass
class TenantContext:
    """The verified tenant of one request and the means to run work for it."""

    tenant_id: uuid.UUID
    route: Route
    directory: RouteDirectory
    engines: EngineRegistry
    fence_hold_seconds: float = FENCE_HOLD_SECONDS

    # Not cached on the context: a context holding its _Fused, which holds the
    # context, is a reference cycle per request, freed only by the cyclic
    # garbage collector. That garbage set off collections on the hot path
    # (a full one every ~5,000 requests, walking every object of the process:
    # ~10 us a request on average, and a stall of every request in flight).
    @property
    def reads(self) -> TenantQueries:
        """Single-statement reads, each its own one-round-trip tenant transaction."""
        return _Fused(self, fused)

    @property
    def writes(self) -> TenantQueries:
        """Single-INSERT writes (``FROM $tenant_guard``), each its own one-round-trip tenant transaction."""
        return _Fused(self, fused_insert)

    async def run(
        self,
        work: Callable[Concatenate[Transaction, P], Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``work(tx, ...)`` in one tenant transaction, following moves."""

        async def attempt() -> T:
            async with self.engines.connection(self.route) as conn, conn.transaction():
                await conn.execute(BEGIN_TENANT, self.tenant_id, self.route.epoch)
                return await work(Transaction(conn), *args, **kwargs)

        return await self.with_retries(attempt)

    async def with_retries(self, attempt: Callable[[], Awaitable[T]]) -> T:
        retried_stale = False
        deadline = time.monotonic() + self.fence_hold_seconds
        delay = 0.01
        while True:
            try:
                return await attempt()
            except UNAVAILABLE as exc:
                raise ServiceUnavailableError("tenant database unavailable", retry_after=1) from exc
            except asyncpg.PostgresError as exc:
                state = getattr(exc, "sqlstate", None)
                if state in (NOT_SERVED_HERE, STALE_EPOCH):
                    if retried_stale:
                        raise StaleRouteError("the tenant's route changed during the request") from exc
                    retried_stale = True
                elif state == FENCED:
                    if time.monotonic() + delay > deadline:
                        raise TenantFencedError("tenant is being moved", retry_after=1) from exc
                    # The cutover ends with the route's flip, whose NOTIFY wakes
                    # this wait at once; the poll is the fallback (no NOTIFY for
                    # an aborted move: the source is simply unfenced). A NOTIFY
                    # that arrived while this attempt ran has already dropped
                    # the route it used: then look again at once, no wait.
                    if self.directory.is_current(self.route):
                        await self.directory.wait_for_change(self.tenant_id, seconds=delay)
                        delay = min(delay * 2, FENCE_POLL_MAX_SECONDS)
                    # The cached route is as fresh as the last NOTIFY: if the
                    # flip invalidated it, this reads the catalog (one read
                    # shared by every held request); if not, the source still
                    # owns the tenant, or answers "moved" (then a fresh read).
                    self.route = (await self.directory.lookup(self.tenant_id)).require_servable()
                    continue
                else:
                    raise
                self.route = (await self.directory.lookup(self.tenant_id, fresh=True)).require_servable()


class _Fused:
    """:class:`TenantQueries` whose statements each carry their own ownership check (``fuse``)."""

    def __init__(self, ctx: TenantContext, fuse: Callable[[str, int], str]) -> None:
        self._ctx = ctx
        self._fuse = fuse

    async def _fetch(self, query: str, args: Sequence[Any]) -> list[asyncpg.Record]:
        ctx = self._ctx
        sql = self._fuse(query, len(args))

        async def attempt() -> list[asyncpg.Record]:
            return await ctx.engines.fetch(ctx.route, sql, *args, ctx.tenant_id, ctx.route.epoch)

        return await ctx.with_retries(attempt)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        return await self._fetch(query, args)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        rows = await self._fetch(query, args)
        return rows[0] if rows else None

    async def fetchval(self, query: str, *args: Any) -> Any:
        row = await self.fetchrow(query, *args)
        return None if row is None else row[0]
