"""Per-tenant rate limits and resource quotas, by tier.

Rate limits use the ``limits`` library with a fixed window per tenant: one
counter increment per request (in memory, or one Redis round trip when
``TENANTCTL_REDIS_URL`` is set so that every replica counts against the same
budget). The in-memory counters are :class:`LocalWindowStorage`, a storage
for ``limits``' own strategies. A refused request is a 429 with ``Retry-After`` (the end of the
window). If Redis is unreachable the request is let through and a warning is
logged: a rate limiter must not turn a cache outage into a full outage.

Quotas are enforced where the row is written, inside the tenant transaction
(see ``data_plane.resources.projects.service``); this module only knows the
numbers.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import structlog
from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage, Storage
from limits.aio.strategies import FixedWindowRateLimiter
from limits.errors import StorageError

from data_plane.exceptions import RateLimitedError
from data_plane.settings import DataPlaneSettings

log = structlog.get_logger(__name__)

NAMESPACE = "tenantctl"
# At most one "storage down" warning per this many seconds (not one per request).
WARN_EVERY_SECONDS = 10.0


class LocalWindowStorage(Storage):
    """In-process fixed-window counters for ``limits``' strategies, with cheap expiry.

    ``limits``' async ``MemoryStorage`` starts an expiry task on every hit once
    the previous one has finished, and that task walks every key: on the API
    benchmark that was ~50 us a request, growing with the number of active
    tenants. These counters need no lock: every method runs on the event loop
    without awaiting. A counter whose window has passed reads as zero, and
    expired keys are swept at most once per ``sweep_seconds``, so memory stays
    bounded by the tenants seen in the last window.
    """

    STORAGE_SCHEME = ["async+tenantctl-local"]

    def __init__(self, *, sweep_seconds: float = 1.0) -> None:
        super().__init__()
        self._counts: dict[str, int] = {}
        self._expiries: dict[str, float] = {}
        self._sweep_seconds = sweep_seconds
        self._next_sweep = 0.0

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def __len__(self) -> int:
        return len(self._counts)

    def _live(self, key: str, now: float) -> bool:
        if self._expiries.get(key, 0.0) > now:
            return True
        self._counts.pop(key, None)
        self._expiries.pop(key, None)
        return False

    def _sweep(self, now: float) -> None:
        self._next_sweep = now + self._sweep_seconds
        for key in [k for k, expiry in self._expiries.items() if expiry <= now]:
            del self._expiries[key]
            self._counts.pop(key, None)

    async def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        now = time.time()
        if now >= self._next_sweep:
            self._sweep(now)
        if not self._live(key, now):
            self._expiries[key] = now + expiry
        count = self._counts.get(key, 0) + amount
        self._counts[key] = count
        return count

    async def get(self, key: str) -> int:
        return self._counts.get(key, 0) if self._live(key, time.time()) else 0

    async def get_expiry(self, key: str) -> float:
        now = time.time()
        return self._expiries[key] if self._live(key, now) else now

    async def check(self) -> bool:
        return True

    async def reset(self) -> int | None:
        cleared = len(self._counts)
        self._counts.clear()
        self._expiries.clear()
        return cleared

    async def clear(self, key: str) -> None:
        self._counts.pop(key, None)
        self._expiries.pop(key, None)


class TenantRateLimiter:
    """Counts requests per tenant against its tier's limit."""

    def __init__(self, limits_by_tier: dict[str, str], *, default: str, redis_url: str | None = None) -> None:
        self._items: dict[str, RateLimitItem] = {tier: parse(value) for tier, value in limits_by_tier.items()}
        self._default = parse(default)
        self.shared = redis_url is not None
        self._storage: Storage = (
            RedisStorage(_async_uri(redis_url), implementation="redispy", key_prefix=NAMESPACE, wrap_exceptions=True)
            if redis_url is not None
            else LocalWindowStorage()
        )
        self._limiter = FixedWindowRateLimiter(self._storage)
        self._last_warning = 0.0
        self.refused = 0

    @classmethod
    def from_settings(cls, settings: DataPlaneSettings) -> TenantRateLimiter:
        return cls(settings.rate_limits, default=settings.default_rate_limit, redis_url=settings.redis_url)

    def limit_for(self, tier: str) -> RateLimitItem:
        return self._items.get(tier, self._default)

    async def check(self, tenant_id: uuid.UUID, tier: str) -> None:
        """Count one request; raise :class:`RateLimitedError` if the tenant's window is used up."""
        item = self._items.get(tier, self._default)
        key = tenant_id.hex
        try:
            allowed = await self._limiter.hit(item, key)
        except (StorageError, OSError) as exc:
            self._warn(exc)
            return
        if allowed:
            return
        self.refused += 1
        retry_after = float(item.get_expiry())
        with contextlib.suppress(StorageError, OSError):
            stats = await self._limiter.get_window_stats(item, key)
            retry_after = stats.reset_time - time.time()
        raise RateLimitedError(f"rate limit of {item} exceeded", retry_after=max(1.0, retry_after))

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_SECONDS:
            self._last_warning = now
            log.warning("rate_limit_storage_unavailable", error=type(exc).__name__)


def _async_uri(url: str) -> str:
    return url if url.startswith("async+") else f"async+{url}"


class Quotas:
    """Resource quotas by tier; ``None`` means unlimited."""

    def __init__(self, projects_by_tier: dict[str, int]) -> None:
        self._projects = dict(projects_by_tier)

    @classmethod
    def from_settings(cls, settings: DataPlaneSettings) -> Quotas:
        return cls(settings.project_quotas)

    def projects(self, tier: str) -> int | None:
        return self._projects.get(tier)
