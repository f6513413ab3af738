"""Database credentials behind a secret reference, resolved at connect time.

The catalog stores DSNs *without* passwords; a location that needs one
carries ``secret_ref`` -- for RDS silos the ARN of an AWS Secrets Manager
secret in the RDS format (``{"username", "password", "host", "port",
"dbname", "engine"}``). This module turns the two into a connectable DSN:

* :class:`SecretStore` -- where secrets come from; :class:`AwsSecretsManagerStore`
  (boto3, imported only when first used, so local deployments never need it)
  and :class:`StaticSecretStore` (an in-memory mapping for development and tests);
* :func:`dsn_with_secret` -- puts the secret's username and password into a
  DSN, refusing a secret that names another user than the DSN (a mixed-up
  reference must never connect the data plane as the owner or replicator);
* :class:`AwsSecretsResolver` -- the data plane's
  :class:`~data_plane.routing.SecretResolver` for locations with a
  ``secret_ref``.

Secrets are cached for a TTL (Secrets Manager bills per call and throttles),
and :meth:`SecretStore.invalidate` drops one entry so a caller that met an
authentication failure re-reads a rotated secret. The password is never part
of a ``repr``, a log event or an error message.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import structlog
from sqlalchemy.engine import make_url

from data_plane.dsn import with_user
from data_plane.exceptions import ServiceUnavailableError, TenantctlError

if TYPE_CHECKING:
    from data_plane.routing import Route

log = structlog.get_logger(__name__)

DEFAULT_TTL_SECONDS = 300.0


class SecretUnavailableError(ServiceUnavailableError):
    """Database credentials could not be read; retry shortly.

    ``message`` is what a client may see (503), so it names nothing;
    ``detail`` -- the reference and the cause -- is for logs and operators.
    """

    code = "secret_unavailable"

    def __init__(self, detail: str, *, retry_after: float = 5.0) -> None:
        super().__init__("tenant database credentials are unavailable", retry_after=retry_after)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail


class SecretNotFoundError(SecretUnavailableError):
    """The referenced secret does not exist (deleted, wrong ARN or region)."""

    code = "secret_not_found"


class SecretMismatchError(TenantctlError):
    """A secret names another database user than the DSN it was meant for.

    A configuration error, not an outage: a 500 whose message is logged, never
    returned, and which no retry can cure.
    """

    code = "secret_mismatch"


@dataclass(frozen=True)
class DatabaseSecret:
    """The parts of an RDS-format secret a connection needs."""

    username: str
    password: str = field(repr=False)
    host: str | None = None
    port: int | None = None
    dbname: str | None = None

    @classmethod
    def parse(cls, text: str, *, ref: str) -> DatabaseSecret:
        """Parse the secret's JSON; errors name the reference, never the content."""
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise SecretUnavailableError(f"secret {ref} is not JSON") from exc
        if not isinstance(data, dict):
            raise SecretUnavailableError(f"secret {ref} is not a JSON object")
        username, password = data.get("username"), data.get("password")
        if not isinstance(username, str) or not username or not isinstance(password, str) or not password:
            raise SecretUnavailableError(f"secret {ref} lacks a username or password")
        port = data.get("port")
        return cls(
            username=username,
            password=password,
            host=str(data["host"]) if data.get("host") else None,
            port=int(port) if port not in (None, "") else None,
            dbname=str(data["dbname"]) if data.get("dbname") else None,
        )


class SecretStore(Protocol):
    """Where database secrets come from."""

    def get(self, ref: str) -> DatabaseSecret:
        """The secret behind ``ref`` (blocking; may be cached)."""
        ...

    async def get_async(self, ref: str) -> DatabaseSecret:
        """:meth:`get` for the event loop: any network call runs in a thread."""
        ...

    def invalidate(self, ref: str) -> None:
        """Forget a cached secret (after an authentication failure, a rotation)."""
        ...


def dsn_with_secret(dsn: str, secret: DatabaseSecret) -> str:
    """``dsn`` with the secret's username and password.

    Refuses (:class:`SecretMismatchError`) when the DSN names no user or
    another user than the secret: the catalog's DSN says which role the
    connection is for, and a secret of another role -- the master, say, behind
    an application location -- must never silently change it.
    """
    user = make_url(dsn).username
    if not user:
        raise SecretMismatchError("the DSN names no user, so the secret's user cannot be checked; refused")
    if user != secret.username:
        raise SecretMismatchError(f"the secret is for database user {secret.username!r}, the DSN for {user!r}; refused")
    return with_user(dsn, user, secret.password)


@dataclass
class _Cached:
    secret: DatabaseSecret
    fetched_at: float


class _TtlCache:
    """Thread-safe ``ref -> secret`` cache with a time-to-live."""

    def __init__(self, ttl_seconds: float, clock: Callable[[], float]) -> None:
        if ttl_seconds < 0:
            raise ValueError("ttl_seconds must be >= 0")
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: dict[str, _Cached] = {}
        self._lock = threading.Lock()

    def get(self, ref: str) -> DatabaseSecret | None:
        with self._lock:
            entry = self._entries.get(ref)
            if entry is None or self._clock() - entry.fetched_at >= self._ttl:
                return None
            return entry.secret

    def put(self, ref: str, secret: DatabaseSecret) -> None:
        with self._lock:
            self._entries[ref] = _Cached(secret=secret, fetched_at=self._clock())

    def drop(self, ref: str) -> None:
        with self._lock:
            self._entries.pop(ref, None)


def region_of(ref: str) -> str | None:
    """The region of a Secrets Manager ARN (``arn:aws:secretsmanager:<region>:...``); None for a name."""
    parts = ref.split(":", 5)
    if len(parts) == 6 and parts[0] == "arn" and parts[2] == "secretsmanager" and parts[3]:
        return parts[3]
    return None


ClientFactory = Callable[[str], Any]


def _boto3_client(region: str) -> Any:
    # Imported here: only deployments with secret references need boto3
    # (the `aws` extra); the local default never loads it.
    import boto3  # type: ignore[import-untyped]

    return boto3.session.Session().client("secretsmanager", region_name=region)


# Error codes that mean "this reference resolves to nothing": retrying is pointless.
_NOT_FOUND_CODES = frozenset({"ResourceNotFoundException"})


class AwsSecretsManagerStore:
    """Secrets from AWS Secrets Manager, by ARN, with a TTL cache.

    The region comes from the ARN, so one store serves secrets of several
    regions (one client per region, created on first use); a bare secret name
    uses ``default_region``. ``client_factory(region)`` is the seam for tests
    (a botocore ``Stubber``-wrapped client).
    """

    def __init__(
        self,
        *,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        default_region: str | None = None,
        client_factory: ClientFactory | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._cache = _TtlCache(ttl_seconds, clock)
        self._default_region = default_region
        self._client_factory = client_factory or _boto3_client
        self._clients: dict[str, Any] = {}
        self._clients_lock = threading.Lock()
        self.fetches = 0

    def get(self, ref: str) -> DatabaseSecret:
        cached = self._cache.get(ref)
        if cached is not None:
            return cached
        secret = DatabaseSecret.parse(self._fetch(ref), ref=ref)
        self._cache.put(ref, secret)
        return secret

    async def get_async(self, ref: str) -> DatabaseSecret:
        cached = self._cache.get(ref)
        if cached is not None:
            return cached
        # boto3 is blocking: never call it on the event loop.
        return await asyncio.to_thread(self.get, ref)

    def invalidate(self, ref: str) -> None:
        self._cache.drop(ref)

    def _client(self, ref: str) -> Any:
        region = region_of(ref) or self._default_region
        if region is None:
            raise SecretUnavailableError(f"secret {ref} is not an ARN and no default region is configured")
        with self._clients_lock:
            client = self._clients.get(region)
            if client is None:
                client = self._clients[region] = self._client_factory(region)
            return client

    def _fetch(self, ref: str) -> str:
        from botocore.exceptions import BotoCoreError, ClientError  # type: ignore[import-untyped]

        client = self._client(ref)
        self.fetches += 1
        try:
            response = client.get_secret_value(SecretId=ref)
        except ClientError as exc:
            error_code = str(exc.response.get("Error", {}).get("Code", "ClientError"))
            log.warning("secret.fetch_failed", ref=ref, error=error_code)
            if error_code in _NOT_FOUND_CODES:
                raise SecretNotFoundError(f"secret {ref} does not exist ({error_code})") from exc
            raise SecretUnavailableError(f"secret {ref} could not be read ({error_code})") from exc
        except BotoCoreError as exc:
            # No credentials, endpoint unreachable, ...: botocore already retried.
            log.warning("secret.fetch_failed", ref=ref, error=type(exc).__name__)
            raise SecretUnavailableError(f"secret {ref} could not be read ({type(exc).__name__})") from exc
        text = response.get("SecretString")
        if not isinstance(text, str):
            raise SecretUnavailableError(f"secret {ref} has no SecretString (binary secrets are not supported)")
        return text


class StaticSecretStore:
    """Secrets from a mapping ``ref -> JSON text`` (development, tests, injected files)."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        self._secrets = dict(secrets)

    def get(self, ref: str) -> DatabaseSecret:
        try:
            text = self._secrets[ref]
        except KeyError:
            raise SecretNotFoundError(f"secret {ref} does not exist") from None
        return DatabaseSecret.parse(text, ref=ref)

    async def get_async(self, ref: str) -> DatabaseSecret:
        return self.get(ref)

    def invalidate(self, ref: str) -> None:
        """Nothing is cached."""


class AwsSecretsResolver:
    """The data plane's resolver for locations whose credentials sit behind ``secret_ref``.

    A route with a ``secret_ref`` connects with its ``app_dsn`` plus the
    referenced secret's password (the secret must be the application role's;
    see :func:`dsn_with_secret`). A route without one (local silos) uses its
    ``app_dsn`` as stored, like ``PlainDsnResolver``.
    """

    def __init__(self, store: SecretStore | None = None) -> None:
        self.store: SecretStore = store or AwsSecretsManagerStore()

    async def dsn_for(self, route: Route) -> str:
        if route.app_dsn is None:
            raise ServiceUnavailableError(f"location {route.location_name} has no application DSN")
        if route.secret_ref is None:
            return route.app_dsn
        secret = await self.store.get_async(route.secret_ref)
        return dsn_with_secret(route.app_dsn, secret)

    def invalidate(self, route: Route) -> None:
        """Drop the route's cached secret, e.g. after the database refused its password."""
        if route.secret_ref is not None:
            self.store.invalidate(route.secret_ref)
