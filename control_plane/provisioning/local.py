"""The local provisioner: one database per silo on the silo server.

Used on laptops, in CI and in tests (``TENANTCTL_PROVISIONER=local``, the
default). The silo server is ``TENANTCTL_SILO_SERVER_URL`` -- the embedded
silo cluster when nothing is configured -- reached with a superuser (admin)
DSN. Each silo is a database named ``silo_<slug>`` owned by the owner role,
with the same roles and database-level grants as the pool
(:mod:`control_plane.bootstrap`); the tenant schema is then applied by the
caller with ``schema.upgrade(Stream.TENANT, location.dsn, revision)``.

Ownership marker. The database's ``COMMENT`` records which tenant it belongs
to. It is written last, so a crash leaves either nothing, an empty unmarked
database (adopted by the retry, see :meth:`LocalProvisioner.provision`) or a
finished silo. ``deprovision`` drops a database only when the marker names
the location's tenant (or when it is the expected, still empty, unmarked
leftover of a crashed ``provision``), so a wrong or stale location can never
drop another tenant's data.

Concurrency. Every operation on one silo holds a session advisory lock on the
silo server, keyed by the database name, so two workers retrying the same job
serialise instead of racing ``CREATE``/``DROP DATABASE``.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
import structlog
from psycopg import sql

from control_plane import bootstrap
from control_plane.exceptions import ProvisioningError, SiloOwnershipError
from control_plane.provisioning.base import SiloLocation, SiloSpec
from control_plane.provisioning.naming import silo_database_name
from control_plane.provisioning.retry import RetryPolicy, call_with_retry
from data_plane.dsn import libpq, redact, with_database, with_user

log = structlog.get_logger(__name__)
T = TypeVar("T")

PROVIDER = "local"
MARKER_PREFIX = "tenantctl-silo:"
# First key of the two-key advisory lock serialising operations on one silo
# (the tenant schema's fence uses 7301).
LOCK_NAMESPACE = 7302
# Server-wide lock around role bootstrap: two sessions running ALTER ROLE on
# the same role at once can fail with "tuple concurrently updated".
ROLES_LOCK = (7303, 0)
LOCK_TIMEOUT = "30s"

# SQLSTATEs a later attempt can cure.
_TRANSIENT_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "42P04",  # duplicate_database: a concurrent attempt created it; the retry adopts it
        "42710",  # duplicate_object: a role created concurrently by another process
        "53300",  # too_many_connections
        "55006",  # object_in_use
        "55P03",  # lock_not_available (our advisory lock timed out)
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (server starting)
    }
)
# Connection failures that are configuration problems, not outages.
_PERMANENT_CONNECT = re.compile(
    r"authentication failed|no pg_hba\.conf entry|does not exist|permission denied", re.IGNORECASE
)


def is_transient(error: BaseException) -> bool:
    """True for PostgreSQL errors worth retrying (outage, restart, concurrent operation)."""
    if not isinstance(error, psycopg.Error):
        return False
    state = error.sqlstate
    if state is not None:
        return state in _TRANSIENT_SQLSTATES or state.startswith("08")
    # Connection-level errors come without a SQLSTATE; only their text tells
    # "server down" (retry) from "wrong credentials or database" (do not).
    return isinstance(error, psycopg.OperationalError) and not _PERMANENT_CONNECT.search(str(error))


@dataclass(frozen=True)
class Marker:
    """What the ``COMMENT ON DATABASE`` of a silo says about its owner."""

    tenant_id: uuid.UUID
    slug: str

    def render(self) -> str:
        return MARKER_PREFIX + json.dumps({"tenant_id": str(self.tenant_id), "slug": self.slug})

    @classmethod
    def parse(cls, comment: str | None) -> Marker | None:
        """The marker in ``comment``; None when there is no comment at all.

        A comment that is not ours raises: a database someone else annotated
        is not a silo we may adopt or drop.
        """
        if comment is None:
            return None
        if not comment.startswith(MARKER_PREFIX):
            raise SiloOwnershipError("the database carries a comment that is not a tenantctl silo marker")
        try:
            data = json.loads(comment.removeprefix(MARKER_PREFIX))
            return cls(tenant_id=uuid.UUID(data["tenant_id"]), slug=str(data["slug"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SiloOwnershipError("the database's tenantctl silo marker is malformed") from exc


@dataclass(frozen=True)
class DatabaseState:
    exists: bool
    owner: str | None = None
    comment: str | None = None
    size_bytes: int | None = None


class LocalProvisioner:
    """Silo databases on one PostgreSQL server (see module docstring).

    ``server_url`` is an admin DSN of the silo server (a superuser, or at
    least a role with CREATEDB and CREATEROLE that may comment on and drop the
    silo databases). It is used only here; the locations handed back carry the
    owner and application roles, never a password.
    """

    kind = PROVIDER

    def __init__(
        self,
        *,
        server_url: str,
        roles: bootstrap.Roles | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.server_url = server_url
        self.roles = roles or bootstrap.Roles()
        self.retry = retry or RetryPolicy()

    # -- public interface ---------------------------------------------------

    def location_for(self, spec: SiloSpec) -> SiloLocation:
        """The location ``provision(spec)`` returns, computed without touching the server."""
        database = silo_database_name(spec.slug)
        silo = with_database(self.server_url, database)
        return SiloLocation(
            name=spec.name,
            provider=PROVIDER,
            tenant_id=spec.tenant_id,
            database=database,
            # with_user(..., password=None) drops any password of the admin DSN.
            dsn=with_user(silo, self.roles.owner),
            app_dsn=with_user(silo, self.roles.app),
            detail={"slug": spec.slug, "tier": spec.tier},
        )

    def provision(self, spec: SiloSpec) -> SiloLocation:
        """Create the silo database, or converge on the one an earlier attempt left.

        Safe to call any number of times, concurrently or after a crash at
        any point. Raises :class:`SiloOwnershipError` when a database of that
        name exists and is not this tenant's (marked for another tenant, or
        unmarked and not an empty leftover of our own).
        """
        location = self.location_for(spec)
        assert location.database is not None
        database = location.database
        self._retrying("provision", lambda: self._provision(spec, database), database=database)
        log.info("silo.provisioned", provider=PROVIDER, tenant_id=str(spec.tenant_id), database=database)
        return location

    def deprovision(self, location: SiloLocation) -> None:
        """Drop the silo database after checking it belongs to ``location.tenant_id``.

        Idempotent: a silo that no longer exists is a success.
        """
        database = self._database_of(location)
        self._retrying("deprovision", lambda: self._deprovision(location, database), database=database)

    def describe(self, location: SiloLocation) -> dict[str, Any]:
        """``{exists, database, owner, tenant_id, owned_by_tenant, size_bytes}`` of the silo."""
        database = self._database_of(location)
        state = self._retrying("describe", lambda: self._inspect(database), database=database)
        info: dict[str, Any] = {"provider": PROVIDER, "database": database, "exists": state.exists}
        if state.exists:
            marker = _safe_marker(state.comment)
            info |= {
                "owner": state.owner,
                "size_bytes": state.size_bytes,
                "tenant_id": str(marker.tenant_id) if marker else None,
                "owned_by_tenant": marker is not None and marker.tenant_id == location.tenant_id,
            }
        return info

    # -- steps (each idempotent) --------------------------------------------

    def _provision(self, spec: SiloSpec, database: str) -> None:
        with self._silo_lock(database) as conn:
            conn.execute("SELECT pg_advisory_lock(%s, %s)", ROLES_LOCK)
            try:
                bootstrap.ensure_roles(self.server_url, self.roles)
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s, %s)", ROLES_LOCK)
            state = self._inspect(database)
            if state.exists:
                self._check_adoptable(state, database, spec.tenant_id, spec.slug)
            # Creates the database owned by the owner role, or re-asserts the
            # grants a crash may have left unmade; then the marker, last.
            bootstrap.ensure_database(self.server_url, database, self.roles)
            self._write_marker(database, Marker(tenant_id=spec.tenant_id, slug=spec.slug))

    def _deprovision(self, location: SiloLocation, database: str) -> None:
        with self._silo_lock(database):
            state = self._inspect(database)
            if not state.exists:
                log.info("silo.already_absent", provider=PROVIDER, database=database)
                return
            slug = location.name.removeprefix("silo-")
            self._check_adoptable(state, database, location.tenant_id, slug)
            bootstrap.drop_database(self.server_url, database)
            log.info("silo.deprovisioned", provider=PROVIDER, tenant_id=str(location.tenant_id), database=database)

    def _check_adoptable(self, state: DatabaseState, database: str, tenant_id: uuid.UUID, slug: str) -> None:
        """Raise unless ``database`` is this tenant's silo or our own empty leftover."""
        marker = Marker.parse(state.comment)
        if marker is not None:
            if marker.tenant_id != tenant_id:
                raise SiloOwnershipError(
                    f"database {database!r} belongs to tenant {marker.tenant_id}, not {tenant_id}; refused"
                )
            return
        # Unmarked: what a crash between CREATE DATABASE and the marker leaves.
        # Adopt it only when it is exactly that -- the expected name, owned by
        # the owner role, and holding no relation at all.
        expected = _expected_name(slug)
        if database != expected or state.owner != self.roles.owner or not self._is_empty(database):
            raise SiloOwnershipError(
                f"database {database!r} exists without a tenantctl silo marker and is not an empty "
                f"leftover of a crashed provisioning (owner {state.owner!r}); refused to touch it"
            )
        log.warning("silo.adopting_unmarked", provider=PROVIDER, database=database, tenant_id=str(tenant_id))

    # -- SQL helpers --------------------------------------------------------

    def _inspect(self, database: str) -> DatabaseState:
        with psycopg.connect(libpq(self.server_url), autocommit=True) as conn:
            row = conn.execute(
                "SELECT r.rolname, shobj_description(d.oid, 'pg_database'), pg_database_size(d.oid) "
                "FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba WHERE d.datname = %s",
                (database,),
            ).fetchone()
        if row is None:
            return DatabaseState(exists=False)
        return DatabaseState(exists=True, owner=row[0], comment=row[1], size_bytes=row[2])

    def _is_empty(self, database: str) -> bool:
        with psycopg.connect(with_database(self.server_url, database), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') "
                "AND n.nspname NOT LIKE 'pg_toast%%' AND n.nspname NOT LIKE 'pg_temp%%'"
            ).fetchone()
        return row is not None and row[0] == 0

    def _write_marker(self, database: str, marker: Marker) -> None:
        with psycopg.connect(libpq(self.server_url), autocommit=True) as conn:
            conn.execute(
                sql.SQL("COMMENT ON DATABASE {} IS {}").format(sql.Identifier(database), sql.Literal(marker.render()))
            )

    @contextmanager
    def _silo_lock(self, database: str) -> Iterator[psycopg.Connection[Any]]:
        # lock_timeout as a startup option of this private session: the lock
        # waits (this one and ROLES_LOCK's) give up instead of hanging on a
        # stuck holder, with no session-level SET statement to leak anywhere.
        with psycopg.connect(
            libpq(self.server_url), autocommit=True, options=f"-c lock_timeout={LOCK_TIMEOUT}"
        ) as conn:
            conn.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (LOCK_NAMESPACE, database))
            # Closing the session releases the lock, including when we crash.
            yield conn

    # -- plumbing -----------------------------------------------------------

    def _retrying(self, operation: str, fn: Callable[[], T], *, database: str) -> T:
        try:
            return call_with_retry(
                fn, operation=operation, policy=self.retry, is_transient=is_transient, database=database
            )
        except SiloOwnershipError:
            raise
        except psycopg.Error as exc:
            raise ProvisioningError(
                f"local silo {operation} of {database!r} on {redact(self.server_url)} failed: "
                f"{type(exc).__name__}: {str(exc).strip()}"
            ) from exc

    @staticmethod
    def _database_of(location: SiloLocation) -> str:
        if location.provider != PROVIDER:
            raise ProvisioningError(
                f"location {location.name!r} was made by the {location.provider!r} provisioner, not {PROVIDER!r}"
            )
        if not location.database:
            raise ProvisioningError(f"location {location.name!r} names no database")
        return location.database


def _expected_name(slug: str) -> str | None:
    try:
        return silo_database_name(slug)
    except ValueError:
        return None


def _safe_marker(comment: str | None) -> Marker | None:
    try:
        return Marker.parse(comment)
    except SiloOwnershipError:
        return None
