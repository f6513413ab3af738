"""The tenant transaction: one per request, on the database that owns the tenant.

At its start, in one round trip after BEGIN, ``tenantctl.begin_tenant(tenant,
epoch)`` binds ``app.current_tenant_id`` transaction-locally (bound parameter,
never string-built SQL) and verifies that *this* database serves the tenant at
the route's epoch. If it does not -- the route changed under our cache -- the
route is refreshed and the work retried on the new location, once. A fenced
tenant (a move's cutover, milliseconds long) is held briefly and retried, then
answered with 503 ``Retry-After``.

Only errors raised by ``begin_tenant`` trigger a retry: at that point the
request has done nothing, so running it again cannot apply a write twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar

import asyncpg

from data_plane.exceptions import StaleRouteError, TenantFencedError
from data_plane.routing import EngineRegistry, Route, RouteDirectory

P = ParamSpec("P")
T = TypeVar("T")

BEGIN_TENANT = "SELECT tenantctl.begin_tenant($1, $2)"
NOT_SERVED_HERE = "TC001"
FENCED = "TC002"
STALE_EPOCH = "TC003"
FENCE_HOLD_SECONDS = 2.0

current_tenant: ContextVar[uuid.UUID | None] = ContextVar("current_tenant", default=None)


@contextlib.contextmanager
def bound_tenant(tenant_id: uuid.UUID) -> Iterator[None]:
    """Set :data:`current_tenant` for the block and always reset it."""
    token = current_tenant.set(tenant_id)
    try:
        yield
    finally:
        current_tenant.reset(token)


@dataclass
class TenantContext:
    """The verified tenant of one request and the means to run work for it."""

    tenant_id: uuid.UUID
    route: Route
    directory: RouteDirectory
    engines: EngineRegistry
    fence_hold_seconds: float = FENCE_HOLD_SECONDS

    async def run(
        self,
        work: Callable[Concatenate[asyncpg.Connection, P], Awaitable[T]],
        /,
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        """Run ``work(conn, ...)`` in one tenant transaction, following moves."""
        retried_stale = False
        deadline = time.monotonic() + self.fence_hold_seconds
        delay = 0.01
        while True:
            try:
                return await self._run_once(work, *args, **kwargs)
            except asyncpg.PostgresError as exc:
                state = getattr(exc, "sqlstate", None)
                if state in (NOT_SERVED_HERE, STALE_EPOCH):
                    if retried_stale:
                        raise StaleRouteError("the tenant's route changed during the request") from exc
                    retried_stale = True
                    self.route = (await self.directory.lookup(self.tenant_id, fresh=True)).require_servable()
                    continue
                if state == FENCED:
                    if time.monotonic() + delay > deadline:
                        raise TenantFencedError("tenant is being moved", retry_after=1) from exc
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 0.2)
                    self.route = (await self.directory.lookup(self.tenant_id, fresh=True)).require_servable()
                    continue
                raise

    async def _run_once(
        self,
        work: Callable[Concatenate[asyncpg.Connection, P], Awaitable[T]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> T:
        async with self.engines.connection(self.route) as conn, conn.transaction():
            await conn.execute(BEGIN_TENANT, self.tenant_id, self.route.epoch)
            return await work(conn, *args, **kwargs)
