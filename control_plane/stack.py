"""Resolve where the catalog, pool and silo server are, and prepare them.

Embedded mode (no URLs configured): the two clusters of ``control_plane.dev``
under the state directory, with the project's roles and databases created by
:mod:`control_plane.bootstrap`. External mode: the configured URLs, used as is.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane import bootstrap, schema
from control_plane.dev import EmbeddedStack, StackInfo
from control_plane.exceptions import EmbeddedStackError, MigrationFailedError, OperationLockedError
from control_plane.settings import ControlPlaneSettings
from data_plane.dsn import with_database, with_user

CATALOG_DB = "tenantctl_catalog"
POOL_DB = "tenantctl_pool"


@dataclass(frozen=True)
class Endpoints:
    """DSNs of one stack, as the owner role and as the application role."""

    catalog_url: str
    pool_url: str
    silo_server_url: str
    app_catalog_url: str
    app_pool_url: str
    app_silo_server_url: str
    # A DSN on the pool's database that may create subscriptions and drop
    # replication slots (superuser in dev; pg_create_subscription + REPLICATION
    # on managed servers). Only moves need it; None falls back to pool_url.
    pool_admin_url: str | None = None


def roles_of(settings: ControlPlaneSettings) -> bootstrap.Roles:
    return bootstrap.Roles(owner=settings.owner_role, app=settings.app_role, replication=settings.replication_role)


def embedded_endpoints(stack: EmbeddedStack, roles: bootstrap.Roles) -> Endpoints:
    main_admin = stack.main.dsn()
    silo_admin = stack.silos.dsn()
    return Endpoints(
        catalog_url=with_user(with_database(main_admin, CATALOG_DB), roles.owner),
        pool_url=with_user(with_database(main_admin, POOL_DB), roles.owner),
        silo_server_url=silo_admin,
        app_catalog_url=with_user(with_database(main_admin, CATALOG_DB), roles.app),
        app_pool_url=with_user(with_database(main_admin, POOL_DB), roles.app),
        app_silo_server_url=with_user(silo_admin, roles.app),
        pool_admin_url=with_database(main_admin, POOL_DB),
    )


def bootstrap_embedded(stack: EmbeddedStack, roles: bootstrap.Roles) -> Endpoints:
    """Create roles and databases on both clusters (idempotent) and return the endpoints."""
    for cluster in (stack.main, stack.silos):
        bootstrap.ensure_roles(cluster.dsn(), roles)
    bootstrap.ensure_database(stack.main.dsn(), CATALOG_DB, roles)
    bootstrap.ensure_database(stack.main.dsn(), POOL_DB, roles)
    return embedded_endpoints(stack, roles)


def external_endpoints(settings: ControlPlaneSettings) -> Endpoints:
    if not (settings.catalog_url and settings.pool_url and settings.silo_server_url):
        raise EmbeddedStackError(
            "set all of TENANTCTL_CATALOG_URL, TENANTCTL_POOL_URL and TENANTCTL_SILO_SERVER_URL, "
            "or none of them for the embedded default"
        )
    app = settings.app_role
    return Endpoints(
        catalog_url=settings.catalog_url,
        pool_url=settings.pool_url,
        silo_server_url=settings.silo_server_url,
        app_catalog_url=with_user(settings.catalog_url, app),
        app_pool_url=with_user(settings.pool_url, app),
        app_silo_server_url=with_user(settings.silo_server_url, app),
        pool_admin_url=settings.pool_admin_url,
    )


def migrate_all(
    endpoints: Endpoints,
    *,
    app_role: str,
    replication_role: str = "tenantctl_replicator",
    lock_timeout_s: float = 10.0,
) -> None:
    """Shared catalog first, then the pool's tenant schema (django-tenants order).

    The pool is migrated by the fleet runner (``--target pool``), so under the
    same catalog interlock and per-database lock as ``tenantctl migrate``. A
    plain upgrade here once changed the pool's revision during a move, whose
    new silo had been migrated to the pool's *old* revision: the move then
    copied between two schema revisions. While a tenant is moving (or a fleet
    run holds the interlock past ``lock_timeout_s``) this raises
    :class:`~control_plane.exceptions.OperationLockedError` instead; a failed
    pool migration raises :class:`~control_plane.exceptions.MigrationFailedError`.
    A pool already at head takes no lock, so restarting a stack while a move
    is pending still works when no tenant-schema migration is waiting.
    """
    # Imported here: the fleet runner starts worker processes whose fork server
    # imports the CLI, which imports this module.
    from control_plane.fleet.runner import FleetOptions, pool_revision, run_fleet
    from control_plane.fleet.targets import POOL

    schema.upgrade(schema.Stream.CATALOG, endpoints.catalog_url, app_role=app_role)
    if pool_revision(endpoints.pool_url) == schema.head(schema.Stream.TENANT):
        return
    options = FleetOptions(app_role=app_role, replication_role=replication_role, lock_timeout_s=lock_timeout_s)
    try:
        report = run_fleet(endpoints.catalog_url, endpoints.pool_url, options, selector=POOL)
    except OperationLockedError as exc:
        raise OperationLockedError(
            f"the pool's tenant schema needs migrating to this release's head, which cannot happen now: "
            f"{exc.message}. Let the move(s) finish (or cancel them) with the release that started them, "
            "then start again"
        ) from None
    (pool,) = report.results
    if report.failed:
        raise MigrationFailedError(
            f"migrating the pool's tenant schema {pool.from_revision or 'base'} -> head failed: {pool.error}"
        )


def running_endpoints(settings: ControlPlaneSettings) -> Endpoints:
    """Endpoints for a command run beside a stack (``status``, ``tenants``, ``migrate`` ...)."""
    if not settings.embedded:
        return external_endpoints(settings)
    info = StackInfo.read(settings.state_dir)
    if info is None:
        raise EmbeddedStackError(
            f"no tenantctl stack is running from {settings.state_dir.resolve()}; "
            "start one with `tenantctl up` (or `make run`), or set TENANTCTL_CATALOG_URL and friends"
        )
    return Endpoints(
        catalog_url=info.catalog_url,
        pool_url=info.pool_url,
        silo_server_url=info.silo_server_url,
        app_catalog_url=info.app_catalog_url,
        app_pool_url=info.app_pool_url,
        app_silo_server_url=info.app_silo_server_url,
        pool_admin_url=info.pool_admin_url,
    )
