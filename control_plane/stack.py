"""Resolve where the catalog, pool and silo server are, and prepare them.

Embedded mode (no URLs configured): the two clusters of ``control_plane.dev``
under the state directory, with the project's roles and databases created by
:mod:`control_plane.bootstrap`. External mode: the configured URLs, used as is.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane import bootstrap, schema
from control_plane.dev import EmbeddedStack, StackInfo
from control_plane.exceptions import EmbeddedStackError
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


def migrate_all(endpoints: Endpoints, *, app_role: str) -> None:
    """Shared catalog first, then the pool's tenant schema (django-tenants order)."""
    schema.upgrade(schema.Stream.CATALOG, endpoints.catalog_url, app_role=app_role)
    schema.upgrade(schema.Stream.TENANT, endpoints.pool_url, app_role=app_role)


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
