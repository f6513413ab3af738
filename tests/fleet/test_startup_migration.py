"""``tenantctl up`` and ``deploy bootstrap`` migrate the pool through the fleet interlock (DESIGN §4)."""

from __future__ import annotations

import uuid
from dataclasses import replace

import psycopg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.pool import NullPool

from control_plane import schema, stack
from control_plane.exceptions import OperationLockedError
from control_plane.fleet import FleetOptions, migrate_target_to, pool_revision, run_fleet
from control_plane.interlock import mark_tenant_moving
from data_plane.dsn import libpq, sync_url
from tests.fleet.conftest import BASE, Fleet, revision_of
from tests.harness import PgServers, fresh_database, owner_dsn

PREVIOUS = schema.script_directory(schema.Stream.TENANT).get_revision(BASE).down_revision


def _mark_moving(fleet: Fleet, slug: str) -> None:
    with psycopg.connect(libpq(fleet.catalog)) as conn:
        row = conn.execute("SELECT id FROM tenants WHERE slug = %s", (slug,)).fetchone()
    assert row is not None
    engine = create_engine(sync_url(fleet.catalog), poolclass=NullPool)
    with engine.begin() as conn_:
        mark_tenant_moving(conn_, uuid.UUID(str(row[0])))
    engine.dispose()


def _set_status(fleet: Fleet, slug: str, status: str) -> None:
    with psycopg.connect(libpq(fleet.catalog), autocommit=True) as conn:
        conn.execute("UPDATE tenants SET status = %s WHERE slug = %s", (status, slug))


def test_startup_never_upgrades_the_pool_during_a_move(fleet: Fleet, pg_servers: PgServers) -> None:
    """A startup once upgraded the pool under a move whose new silo sat at the pool's old revision."""
    assert isinstance(PREVIOUS, str)
    silo = fleet.add_silos(1)[0]
    # The previous release's fleet: the pool one revision behind this code.
    schema.downgrade(schema.Stream.TENANT, fleet.pool, PREVIOUS, app_role=pg_servers.roles.app)
    # A promotion is under way: the tenant is 'moving', its new silo is at the pool's revision.
    _mark_moving(fleet, silo.slug)
    schema.downgrade(schema.Stream.TENANT, silo.dsn, PREVIOUS, app_role=pg_servers.roles.app)
    migrate_target_to(silo.dsn, pool_revision(fleet.pool))
    with pytest.raises(OperationLockedError):  # control: `tenantctl migrate` refuses too
        run_fleet(fleet.catalog, fleet.pool, FleetOptions(lock_timeout_s=0.5))

    with pytest.raises(OperationLockedError, match=rf"being moved: {silo.slug}.*start again"):
        stack.migrate_all(fleet.endpoints, app_role=pg_servers.roles.app, lock_timeout_s=0.5)

    assert revision_of(fleet.pool) == PREVIOUS == revision_of(silo.dsn)
    # The move has finished: the next start migrates the pool.
    _set_status(fleet, silo.slug, "active")
    stack.migrate_all(fleet.endpoints, app_role=pg_servers.roles.app, lock_timeout_s=0.5)
    assert revision_of(fleet.pool) == BASE


def test_startup_with_nothing_to_migrate_works_during_a_move(fleet: Fleet, pg_servers: PgServers) -> None:
    """Restarting a stack whose pool is at head must not wait for (or be refused by) a pending move."""
    silo = fleet.add_silos(1)[0]
    _mark_moving(fleet, silo.slug)

    stack.migrate_all(fleet.endpoints, app_role=pg_servers.roles.app, lock_timeout_s=0)

    assert revision_of(fleet.pool) == BASE


def test_first_start_migrates_an_empty_catalog_and_pool(fleet: Fleet, pg_servers: PgServers) -> None:
    roles = pg_servers.roles
    admin = pg_servers.main_admin
    with (
        fresh_database(admin, roles, template=None, prefix="t_catalog_new") as catalog,
        fresh_database(admin, roles, template=None, prefix="t_pool_new") as pool,
    ):
        endpoints = replace(
            fleet.endpoints, catalog_url=owner_dsn(admin, catalog, roles), pool_url=owner_dsn(admin, pool, roles)
        )
        assert revision_of(endpoints.pool_url) is None

        stack.migrate_all(endpoints, app_role=roles.app)

        assert schema.current_revision(endpoints.catalog_url) == schema.head(schema.Stream.CATALOG)
        assert revision_of(endpoints.pool_url) == BASE
