"""Fixtures for moves: the data-plane world plus an empty silo for tenant A."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from control_plane.moves.engine import MovePlan, Side, replication_conninfo
from control_plane.stack import Endpoints
from data_plane.dsn import libpq, with_database
from tests.harness import SILO_TEMPLATE, PgServers, app_dsn, fresh_database, owner_dsn
from tests.world import World


@dataclass
class Silo:
    database: str
    location_id: uuid.UUID
    side: Side


def pool_side(endpoints: Endpoints, location_id: uuid.UUID) -> Side:
    assert endpoints.pool_admin_url is not None
    return Side(
        kind="pool",
        location_id=str(location_id),
        owner_dsn=endpoints.pool_url,
        admin_dsn=endpoints.pool_admin_url,
        replication_conninfo=replication_conninfo(endpoints.pool_url, "tenantctl_replicator"),
    )


@pytest.fixture
def empty_silo(world: World, pg_servers: PgServers) -> Iterator[Silo]:
    with fresh_database(pg_servers.silo_admin, pg_servers.roles, template=SILO_TEMPLATE, prefix="t_move") as db:
        owner = owner_dsn(pg_servers.silo_admin, db, pg_servers.roles)
        with world.catalog() as cat:
            row = cat.execute(
                "INSERT INTO locations (name, kind, provider, database, dsn, app_dsn, tenant_id) "
                "VALUES (%s, 'silo', 'local', %s, %s, %s, %s) RETURNING id",
                (f"silo-{db}", db, owner, app_dsn(pg_servers.silo_admin, db, pg_servers.roles), world["A"].id),
            ).fetchone()
        assert row is not None
        side = Side(
            kind="silo",
            location_id=str(row[0]),
            owner_dsn=owner,
            admin_dsn=with_database(pg_servers.silo_admin, db),
            replication_conninfo=replication_conninfo(owner, "tenantctl_replicator"),
        )
        yield Silo(database=db, location_id=row[0], side=side)


def pool_location_id(world: World) -> uuid.UUID:
    with world.catalog() as cat:
        row = cat.execute("SELECT id FROM locations WHERE name = 'pool'").fetchone()
    assert row is not None
    return uuid.UUID(str(row[0]))


def move_plan(world: World, silo: Silo, mode: str = "online") -> MovePlan:
    """A plan moving tenant A from the pool to ``silo`` at epoch 1."""
    return MovePlan(
        move_id=uuid.uuid4(),
        tenant_id=world["A"].id,
        source=pool_side(world.endpoints, pool_location_id(world)),
        target=silo.side,
        epoch=1,
        mode=mode,
    )


def catalog_flip(world: World, target: Side, placement: str):  # type: ignore[no-untyped-def]
    def flip(plan: MovePlan) -> None:
        with world.catalog() as cat:
            cat.execute(
                "UPDATE tenants SET placement = %s, location_id = %s, route_epoch = route_epoch + 1 "
                "WHERE id = %s AND route_epoch = %s",
                (placement, target.location_id, plan.tenant_id, plan.epoch),
            )

    return flip


def rows_of(dsn: str, tenant_id: uuid.UUID) -> dict[str, set[str]]:
    with psycopg.connect(libpq(dsn)) as conn:
        return {
            table: {str(r[0]) for r in conn.execute(f"SELECT id FROM {table} WHERE tenant_id = %s", (tenant_id,))}
            for table in ("projects", "tasks")
        }
