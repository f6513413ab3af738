"""Seed helpers shared by benchmarks: pool tenants in the catalog and their rows."""

from __future__ import annotations

import uuid

import psycopg

from control_plane.stack import Endpoints
from data_plane.dsn import libpq


def add_pool_tenants(endpoints: Endpoints, count: int, *, prefix: str = "bench") -> list[uuid.UUID]:
    """Create ``count`` active pool tenants (catalog row + pool ownership) in bulk."""
    ids = [uuid.uuid4() for _ in range(count)]
    with psycopg.connect(libpq(endpoints.catalog_url)) as cat:
        pool_location = cat.execute("SELECT id FROM locations WHERE name = 'pool'").fetchone()
        assert pool_location is not None
        with cat.cursor().copy(
            "COPY tenants (id, slug, name, tier, status, placement, location_id, route_epoch) FROM STDIN"
        ) as copy:
            for i, tenant_id in enumerate(ids):
                copy.write_row(
                    (
                        tenant_id,
                        f"{prefix}-{i}",
                        f"{prefix} {i}",
                        "standard",
                        "active",
                        "pool",
                        pool_location[0],
                        1,
                    )
                )
    with (
        psycopg.connect(libpq(endpoints.pool_url)) as pool,
        pool.cursor().copy("COPY tenantctl.tenant_ownership (tenant_id, state, epoch) FROM STDIN") as copy,
    ):
        for tenant_id in ids:
            copy.write_row((tenant_id, "active", 1))
    return ids
