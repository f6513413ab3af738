"""Route directory and engine registry.

The data plane reads routes through one narrow contract (DESIGN §1): SELECT on
the catalog's ``tenant_routes`` view and LISTEN on the ``tenant_routes``
channel. :class:`RouteDirectory` caches routes per replica; a notification
evicts one tenant (payload: its id) or everything (payload ``*``). After the
listener reconnects, the whole cache is dropped, because notifications sent
while it was away are lost. A TTL bounds staleness should the listener be down.
A lookup caches what it read only if no invalidation arrived while it was
reading (a generation counter): otherwise a route read just before a suspension
committed would be cached *after* the suspension's NOTIFY, and served for a TTL.

:class:`EngineRegistry` holds the pool's connection pool and a bounded LRU of
small per-silo pools, resolved through a :class:`SecretResolver`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar, cast

import asyncpg
import structlog

from data_plane.dsn import libpq
from data_plane.exceptions import (
    ServiceUnavailableError,
    TenantDeletedError,
    TenantSuspendedError,
    TenantUnknownError,
)
from data_plane.ownership import BEGIN_TENANT, FUSED_STATEMENTS, NEVER_EPOCH, REFUSALS

log = structlog.get_logger(__name__)

T = TypeVar("T")


def detached_task(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """A task that a request starts but that is not part of it, run in an empty context.

    A task copies the context it is created in: a task started while serving a
    request would otherwise log with that request's id and tenant (and see its
    ``current_tenant``), although it serves others too or none (PITFALLS:
    ContextVars copy into tasks at creation).
    """
    return asyncio.create_task(coro, name=name, context=contextvars.Context())


CHANNEL = "tenant_routes"
# The route listener's liveness probe, every second: longer than any healthy
# catalog takes to answer SELECT 1, short next to the route cache's TTL.
LISTENER_PROBE_TIMEOUT_SECONDS = 5.0
# Catalog reads per lookup while invalidations keep arriving mid-read; the last
# read is returned uncached (it is at least as fresh as the request).
LOOKUP_READS = 3
ROUTE_QUERY = """
SELECT tenant_id, slug, tier, status, placement, route_epoch, location_id, location_name,
       app_dsn, secret_ref, next_location_id, next_location_kind, next_location_name, next_app_dsn, next_secret_ref
  FROM tenant_routes WHERE tenant_id = $1
"""


# Statuses whose tenant is served ('moving': until the move's fence, at the database).
SERVABLE_STATUSES = frozenset({"active", "moving"})


@dataclass(frozen=True)
class Route:
    """Where a tenant lives right now."""

    tenant_id: uuid.UUID
    slug: str
    tier: str
    status: str
    placement: str  # 'pool' | 'silo'
    epoch: int
    location_id: uuid.UUID
    location_name: str
    app_dsn: str | None
    secret_ref: str | None
    # Where a move in progress is taking the tenant (None when none is): a
    # silo named here is connected to ahead of the flip, never routed to.
    upcoming: Route | None = None
    # The tenant id as text, formatted once per route: log lines carry it on
    # every request, and ``str(UUID)`` costs ~1.6 us (a third of the access line).
    tenant_text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_text", str(self.tenant_id))

    @classmethod
    def from_record(cls, record: asyncpg.Record) -> Route:
        route = cls(
            tenant_id=record["tenant_id"],
            slug=record["slug"],
            tier=record["tier"],
            status=record["status"],
            placement=record["placement"],
            epoch=record["route_epoch"],
            location_id=record["location_id"],
            location_name=record["location_name"],
            app_dsn=record["app_dsn"],
            secret_ref=record["secret_ref"],
        )
        if record["next_location_id"] is None or record["next_location_id"] == route.location_id:
            return route
        upcoming = replace(
            route,
            placement=record["next_location_kind"],
            epoch=route.epoch + 1,
            location_id=record["next_location_id"],
            location_name=record["next_location_name"],
            app_dsn=record["next_app_dsn"],
            secret_ref=record["next_secret_ref"],
        )
        return replace(route, upcoming=upcoming)

    def require_servable(self) -> Route:
        """Raise the §5 error for a tenant that must not be served.

        An allow-list (fail closed): a status this code does not know, say one
        a newer catalog migration adds, is refused, never served by default.
        """
        if self.status in SERVABLE_STATUSES:
            return self
        if self.status == "suspended":
            raise TenantSuspendedError("tenant is suspended")
        if self.status in ("offboarding", "deleted"):
            raise TenantDeletedError("tenant has been offboarded")
        if self.status == "provisioning":
            raise TenantUnknownError("tenant is still being provisioned", code="tenant_not_ready")
        raise TenantUnknownError("tenant cannot be served in its current state")


@dataclass
class _Cached:
    route: Route
    loaded_at: float


class RouteDirectory:
    """Per-replica cache of ``tenant_routes``, invalidated by LISTEN/NOTIFY."""

    def __init__(self, catalog_dsn: str, *, ttl: float = 30.0, pool_size: int = 4) -> None:
        self._dsn = libpq(catalog_dsn)
        self._ttl = ttl
        self._pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._cache: dict[uuid.UUID, _Cached] = {}
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        # Bumped by every invalidation; see lookup().
        self._generation = 0
        # Requests holding for a tenant's route to change (a fenced tenant):
        # woken by its invalidation, so the flip's NOTIFY ends their wait.
        self._changes: dict[uuid.UUID, asyncio.Event] = {}
        self._reads: dict[tuple[uuid.UUID, int], asyncio.Future[asyncpg.Record | None]] = {}
        self.hits = 0
        self.refreshes = 0
        self.arrivals = 0  # flips taken from their notification, with no catalog read
        self.invalidations = 0

    async def start(self) -> None:
        self._pool = await asyncpg.create_pool(self._dsn, min_size=1, max_size=self._pool_size)
        self._listener = asyncio.create_task(self._listen_forever(), name="route-listener")
        # Serving before LISTEN is active could cache a route whose change we
        # would never hear about; wait (bounded) for the first subscription.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout=10)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
        if self._pool is not None:
            await self._pool.close()

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    def invalidate(self, tenant_id: uuid.UUID | None = None) -> None:
        self.invalidations += 1
        self._generation += 1
        if tenant_id is None:
            self._cache.clear()
            changed, self._changes = list(self._changes.values()), {}
        else:
            self._cache.pop(tenant_id, None)
            event = self._changes.pop(tenant_id, None)
            changed = [] if event is None else [event]
        for event in changed:
            event.set()

    def is_current(self, route: Route) -> bool:
        """Whether ``route`` is still what the cache holds (no invalidation since it was read)."""
        cached = self._cache.get(route.tenant_id)
        return cached is not None and cached.route is route

    async def wait_for_change(self, tenant_id: uuid.UUID, *, seconds: float) -> bool:
        """Wait up to ``seconds`` for the tenant's route to be invalidated; True if it was."""
        event = self._changes.setdefault(tenant_id, asyncio.Event())
        try:
            await asyncio.wait_for(event.wait(), seconds)
        except TimeoutError:
            return False
        return True

    async def lookup(self, tenant_id: uuid.UUID, *, fresh: bool = False) -> Route:
        """The tenant's route (any status); TenantUnknownError if the catalog has none."""
        cached = self._cache.get(tenant_id)
        if cached is not None and not fresh and time.monotonic() - cached.loaded_at < self._ttl:
            self.hits += 1
            return cached.route
        for _ in range(LOOKUP_READS):
            generation = self._generation
            record = await self._shared_read(tenant_id, generation, join=not fresh)
            if generation == self._generation:
                break
            # A NOTIFY arrived while the catalog was being read: what we read
            # may predate the change it announces. Read again; never cache it.
        if record is None:
            self._cache.pop(tenant_id, None)
            raise TenantUnknownError("unknown tenant")
        route = Route.from_record(record)
        if generation == self._generation:
            self._cache[tenant_id] = _Cached(route=route, loaded_at=time.monotonic())
        return route

    async def _shared_read(self, tenant_id: uuid.UUID, generation: int, *, join: bool) -> asyncpg.Record | None:
        """One catalog read shared by the cache misses of a tenant within one generation.

        After a route flip every request held for that tenant misses at once;
        without sharing each would read the catalog (a burst of identical
        queries queued on a small pool, lengthening the move's write pause).
        A read begun in the current generation is as fresh as a miss needs:
        any invalidation since would have bumped the generation. A ``fresh``
        lookup never joins (it wants a read that starts after it asked), but
        later misses may join its read.
        """
        key = (tenant_id, generation)
        task = self._reads.get(key) if join else None
        if task is None:
            task = detached_task(self._read(tenant_id), name=f"route-read-{tenant_id}")
            self._reads[key] = task
            task.add_done_callback(lambda done: self._reads.pop(key, None) if self._reads.get(key) is done else None)
        # Shielded: a cancelled request must not cancel the read others wait on.
        return await asyncio.shield(task)

    async def _read(self, tenant_id: uuid.UUID) -> asyncpg.Record | None:
        assert self._pool is not None, "RouteDirectory.start() was not awaited"
        self.refreshes += 1
        try:
            return await self._pool.fetchrow(ROUTE_QUERY, tenant_id)
        except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise ServiceUnavailableError("route catalog unavailable", retry_after=1) from exc

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        if payload == "*":
            self.invalidate()
            return
        words = str(payload).split(" ")
        try:
            tenant_id = uuid.UUID(words[0])
        except ValueError:
            self.invalidate()
            return
        if not self._arrived(tenant_id, words[1:]):
            self.invalidate(tenant_id)

    def _arrived(self, tenant_id: uuid.UUID, fields: list[str]) -> bool:
        """Take a move's flip from its notification: True if the cached route's target became its route.

        ``fields`` (catalog_0013): route epoch, status, tier, placement,
        location and next location of the tenant after the change. Only the
        exact arrival the cached route announced (its ``upcoming`` location, at
        the next epoch, the same tier, no further move) is taken; anything else
        is an eviction and a catalog read, as before. The route is a cache
        either way: the database checks the epoch of every transaction.
        """
        cached = self._cache.get(tenant_id)
        upcoming = None if cached is None else cached.route.upcoming
        if upcoming is None or len(fields) != 6:
            return False
        epoch, status, tier, placement, location_id, next_location_id = fields
        if (epoch, tier, placement, location_id, next_location_id) != (
            str(upcoming.epoch),
            upcoming.tier,
            upcoming.placement,
            str(upcoming.location_id),
            "-",
        ):
            return False
        self.invalidate(tenant_id)  # wakes the held requests; in-flight reads are not cached
        self._cache[tenant_id] = _Cached(route=replace(upcoming, status=status), loaded_at=time.monotonic())
        self.arrivals += 1
        return True

    def _on_connection_lost(self, _conn: object) -> None:
        self._listening.clear()

    async def _listen_forever(self) -> None:
        backoff = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self._dsn)
                conn.add_termination_listener(self._on_connection_lost)
                await conn.add_listener(CHANNEL, self._on_notify)
                # Anything cached may have changed while nobody listened.
                self.invalidate()
                self._listening.set()
                backoff = 0.1
                while not conn.is_closed():
                    await asyncio.sleep(1.0)
                    # A cheap liveness probe: a half-open socket would
                    # otherwise keep us "listening" to nothing. Bounded: on
                    # such a socket the probe itself never returns, and the
                    # listener stayed "up", hearing no NOTIFY, for good.
                    await conn.execute("SELECT 1", timeout=LISTENER_PROBE_TIMEOUT_SECONDS)
            except asyncio.CancelledError:
                raise
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.warning("route_listener_disconnected", error=type(exc).__name__, retry_in=backoff)
            finally:
                self._listening.clear()
                if conn is not None and not conn.is_closed():
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), timeout=1)
            self.invalidate()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)


class SecretResolver(Protocol):
    """Turns a route into a DSN for the application role."""

    async def dsn_for(self, route: Route) -> str: ...


class PlainDsnResolver:
    """Dev and test: the location's ``app_dsn`` as stored in the catalog.

    Production deployments with ``secret_ref`` locations plug in a resolver that
    reads the secret (e.g. AWS Secrets Manager) and builds the DSN.
    """

    async def dsn_for(self, route: Route) -> str:
        if route.app_dsn is None:
            raise ServiceUnavailableError(
                f"location {route.location_name} has only a secret reference and no secret resolver is configured"
            )
        return route.app_dsn


async def _reset_connection(conn: asyncpg.Connection) -> None:
    """Replace asyncpg's default reset (one extra round trip per request).

    Tenant context is transaction-local, so a connection that is not inside a
    transaction carries nothing to reset. One that *is* (a request cancelled
    mid-transaction) must never be reused inside it: roll back, and if even
    that fails asyncpg terminates the connection.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")


async def _warm(conn: asyncpg.Connection, route: Route) -> None:
    """Run a tenant transaction's first statement once on a new connection, and roll it back.

    A new backend's first tenant transaction compiles ``begin_tenant`` and
    loads the catalog entries it reads, and asyncpg prepares the statement: a
    round trip and several milliseconds of the target's CPU (measured ~4 ms on
    an idle host, against 0.5 ms warm), which a promotion's first write after
    the flip would otherwise spend inside the write pause. Before the flip
    the target refuses the tenant (not yet active, or the route's epoch is
    not yet the catalog's) -- the expected answer; after it, the statement
    binds the tenant in a transaction that is rolled back. Either way
    nothing is written and no transaction stays open.

    Then every fused statement this process has run (``FUSED_STATEMENTS``)
    once, guarded with ``NEVER_EPOCH``: each is parsed and planned on this
    backend, kept in asyncpg's statement cache, and refused by its guard
    before it reads or writes anything. Measured on an idle host, the first
    fused INSERT on a connection warmed with ``begin_tenant`` alone took
    2.3 ms (median of 30), 1.1 ms after this, against 0.8 ms on a warm one.
    """
    transaction = conn.transaction()
    await transaction.start()
    try:
        await _refused(conn, BEGIN_TENANT, route.tenant_id, route.epoch)
    finally:
        await transaction.rollback()
    for statement, nargs in list(FUSED_STATEMENTS.items()):
        await _refused(conn, statement, *([None] * nargs), route.tenant_id, NEVER_EPOCH)


async def _refused(conn: asyncpg.Connection, statement: str, *args: Any) -> None:
    """Run ``statement``, expecting one of the ownership refusals (or none)."""
    try:
        await conn.execute(statement, *args)
    except asyncpg.PostgresError as exc:
        if getattr(exc, "sqlstate", None) not in REFUSALS:
            raise


@dataclass
class _SiloPool:
    pool: asyncpg.Pool
    last_used: float
    borrowed: int = 0

    def give_back(self) -> None:
        """End one borrow (see ``EngineRegistry._borrow_silo``); the idle clock restarts."""
        self.borrowed -= 1
        self.last_used = time.monotonic()


class EngineRegistry:
    """The pool's connection pool plus a bounded LRU of per-silo pools."""

    def __init__(
        self,
        pool_dsn: str,
        *,
        resolver: SecretResolver | None = None,
        pool_size: int = 10,
        silo_pool_size: int = 2,
        max_silos: int = 64,
        idle_seconds: float = 300.0,
    ) -> None:
        self._pool_dsn = libpq(pool_dsn)
        self._resolver = resolver or PlainDsnResolver()
        self._pool_size = pool_size
        self._silo_pool_size = silo_pool_size
        self._max_silos = max_silos
        self._idle_seconds = idle_seconds
        self._pool: asyncpg.Pool | None = None
        self._silos: OrderedDict[uuid.UUID, _SiloPool] = OrderedDict()
        self._lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self._warming: dict[uuid.UUID, asyncio.Task[None]] = {}

    @staticmethod
    async def _create_pool(dsn: str, size: int) -> asyncpg.Pool:
        return await asyncpg.create_pool(
            dsn,
            min_size=min(1, size),
            max_size=size,
            reset=_reset_connection,
            # Generic plans keyed on a prepared statement are safe here: the
            # policy's sub-select re-reads the setting per execution (PITFALLS:
            # cached-plan trap), and every query also names tenant_id.
            statement_cache_size=256,
        )

    async def start(self) -> None:
        self._pool = await self._create_pool(self._pool_dsn, self._pool_size)
        self._reaper = asyncio.create_task(self._reap_forever(), name="silo-pool-reaper")

    async def close(self) -> None:
        for task in [*self._warming.values(), *([self._reaper] if self._reaper is not None else [])]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for entry in self._silos.values():
            await entry.pool.close()
        self._silos.clear()
        if self._pool is not None:
            await self._pool.close()

    @property
    def silo_count(self) -> int:
        return len(self._silos)

    def has_engine(self, location_id: uuid.UUID) -> bool:
        return location_id in self._silos

    def open_connections(self, location_id: uuid.UUID) -> int:
        """Connections the location's pool has open (0 without a pool)."""
        entry = self._silos.get(location_id)
        return 0 if entry is None else entry.pool.get_size()

    def prewarm(self, route: Route) -> None:
        """Open the pool of the silo a move is taking ``route``'s tenant to, in the background.

        A promotion's first write after the flip would otherwise wait for a
        new connection (a backend start and an authentication: tens of
        milliseconds on a busy host) inside the move's write pause. Opening a
        pool serves nothing: requests follow the route's current location,
        and the target refuses the tenant until the cutover activates it.
        """
        upcoming = route.upcoming
        if upcoming is None or upcoming.placement != "silo":
            return
        if upcoming.location_id in self._silos or upcoming.location_id in self._warming:
            return
        task = detached_task(self._prewarm(upcoming), name=f"prewarm-{upcoming.location_name}")
        self._warming[upcoming.location_id] = task
        task.add_done_callback(lambda _: self._warming.pop(upcoming.location_id, None))

    async def _prewarm(self, route: Route) -> None:
        try:
            entry = await self._borrow_silo(route)
        except ServiceUnavailableError as exc:
            # Not an error of any request: the first one routed there will
            # open the pool itself (and report it).
            log.info("silo_prewarm_failed", location=route.location_name, error=str(exc))
            return
        # Every connection of the pool, not just its first: the requests held
        # by the fence all come at once after the flip, and the pool would
        # otherwise open the rest of its connections in the write pause.
        held: list[asyncpg.pool.PoolConnectionProxy] = []
        try:
            for _ in range(self._silo_pool_size):
                conn = await entry.pool.acquire()
                held.append(conn)
                await _warm(cast(asyncpg.Connection, conn), route)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.info("silo_prewarm_partial", location=route.location_name, opened=len(held), error=str(exc))
        finally:
            for conn in held:
                await entry.pool.release(conn)
            entry.give_back()

    @contextlib.asynccontextmanager
    async def connection(self, route: Route) -> AsyncIterator[asyncpg.Connection]:
        """A connection to the database that ``route`` points at."""
        if route.placement == "pool":
            assert self._pool is not None, "EngineRegistry.start() was not awaited"
            async with self._pool.acquire() as conn:
                # The pool hands out a proxy with Connection's whole API.
                yield cast(asyncpg.Connection, conn)
            return
        entry = await self._borrow_silo(route)
        try:
            async with entry.pool.acquire() as conn:
                yield cast(asyncpg.Connection, conn)
        finally:
            entry.give_back()

    async def fetch(self, route: Route, query: str, *args: Any) -> list[asyncpg.Record]:
        """Run one statement, in its own implicit transaction, on ``route``'s database.

        The fused read path: ``Pool.fetch`` acquires and releases through the
        pool's own context object, without :meth:`connection`'s generator
        frames (measured on the hot path of ``GET /v1/projects/{id}``).
        """
        if route.placement == "pool":
            assert self._pool is not None, "EngineRegistry.start() was not awaited"
            return await self._pool.fetch(query, *args)
        entry = await self._borrow_silo(route)
        try:
            return await entry.pool.fetch(query, *args)
        finally:
            entry.give_back()

    async def _borrow_silo(self, route: Route) -> _SiloPool:
        """The location's engine, already counted as borrowed.

        Counted *before* anything can evict: a new engine is created with
        ``borrowed = 1``, so the capacity pass that follows its creation can
        never close the engine about to be returned (were every older engine
        busy, the newest would be the only candidate).
        """
        entry = self._silos.get(route.location_id)
        if entry is not None:
            self._silos.move_to_end(route.location_id)
            entry.borrowed += 1
            return entry
        async with self._lock:
            entry = self._silos.get(route.location_id)
            if entry is not None:
                self._silos.move_to_end(route.location_id)
                entry.borrowed += 1
                return entry
            pool = await self._open_silo_pool(route)
            entry = _SiloPool(pool=pool, last_used=time.monotonic(), borrowed=1)
            self._silos[route.location_id] = entry
            try:
                await self._evict_over_capacity()
            except BaseException:
                # Cancelled (or failed) while closing another engine: the
                # caller never gets this one, so it must not stay borrowed.
                entry.borrowed -= 1
                raise
            return entry

    async def _open_silo_pool(self, route: Route) -> asyncpg.Pool:
        """A new pool for the route's location; a refused password re-reads the secret once.

        Secrets rotate: a cached secret older than the rotation is refused by the
        server, and only a fresh read of the secret can heal that.
        """
        for attempt in (1, 2):
            dsn = libpq(await self._resolver.dsn_for(route))
            try:
                return await self._create_pool(dsn, self._silo_pool_size)
            except asyncpg.InvalidPasswordError as exc:
                invalidate = getattr(self._resolver, "invalidate", None)
                if attempt == 2 or invalidate is None:
                    raise ServiceUnavailableError("tenant database refused its credentials", retry_after=5) from exc
                log.warning("silo refused its credentials; re-reading the secret", location=route.location_name)
                invalidate(route)
            except (OSError, asyncpg.PostgresError) as exc:
                raise ServiceUnavailableError("tenant database unavailable", retry_after=1) from exc
        raise AssertionError("unreachable")

    async def _evict_over_capacity(self) -> int:
        """Close least recently used idle engines until within the bound (caller holds the lock).

        An engine with borrowed connections is never closed under a running
        request; if every engine is busy the registry stays over its bound
        for a while, and a later pass (the next new engine, or the reaper)
        brings it back.
        """
        closed = 0
        for location_id in list(self._silos):
            if len(self._silos) <= self._max_silos:
                break
            entry = self._silos[location_id]
            if entry.borrowed == 0:
                del self._silos[location_id]
                await entry.pool.close()
                closed += 1
        return closed

    async def evict_idle(self, *, now: float | None = None) -> int:
        """Close engines idle for ``idle_seconds`` and any left over the bound; return how many."""
        now = time.monotonic() if now is None else now
        closed = 0
        async with self._lock:
            for location_id, entry in list(self._silos.items()):
                if entry.borrowed == 0 and now - entry.last_used >= self._idle_seconds:
                    del self._silos[location_id]
                    await entry.pool.close()
                    closed += 1
            closed += await self._evict_over_capacity()
        return closed

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(max(1.0, self._idle_seconds / 4))
            await self.evict_idle()

    def stats(self) -> dict[str, Any]:
        return {"silo_pools": len(self._silos), "max_silo_pools": self._max_silos}
