"""Both Alembic streams go from empty to head and back to base on real PostgreSQL."""

from __future__ import annotations

import psycopg
import pytest

from control_plane import schema
from data_plane.dsn import libpq
from tests.harness import PgServers, fresh_database, owner_dsn


def _tables(dsn: str) -> set[str]:
    with psycopg.connect(libpq(dsn)) as conn:
        rows = conn.execute(
            "SELECT schemaname || '.' || tablename FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
        ).fetchall()
    return {r[0] for r in rows}


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (schema.Stream.CATALOG, {"public.tenants", "public.locations", "public.audit_log"}),
        (schema.Stream.TENANT, {"public.projects", "public.tasks", "tenantctl.tenant_ownership"}),
    ],
)
def test_stream_upgrades_from_empty_to_head_and_back_to_base(
    pg_servers: PgServers, stream: schema.Stream, expected: set[str]
) -> None:
    with fresh_database(pg_servers.main_admin, pg_servers.roles, template=None, prefix="t_stream") as db:
        dsn = owner_dsn(pg_servers.main_admin, db, pg_servers.roles)
        assert schema.current_revision(dsn) is None

        schema.upgrade(stream, dsn)
        assert schema.current_revision(dsn) == schema.head(stream)
        assert expected <= _tables(dsn)

        schema.downgrade(stream, dsn, "base")
        assert _tables(dsn) == {"public.alembic_version"}

        schema.upgrade(stream, dsn)  # and up again: downgrade left nothing behind that blocks it
        assert expected <= _tables(dsn)


def test_migration_file_names_are_date_slugs() -> None:
    for stream in schema.Stream:
        for script in schema.script_directory(stream).walk_revisions():
            name = script.path.rsplit("/", 1)[-1]
            assert name[:4].isdigit() and name[4] == "_", name
