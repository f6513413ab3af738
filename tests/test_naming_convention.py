"""Both Alembic environments carry the MetaData naming convention; existing revisions keep their names."""

from __future__ import annotations

import runpy
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from alembic.migration import MigrationContext
from alembic.operations import Operations
from sqlalchemy.pool import NullPool

from control_plane import schema
from control_plane.catalog import models
from control_plane.stack import Endpoints
from data_plane.dsn import libpq, sync_url
from migrations import env_common


def _target_metadata(stream: schema.Stream, monkeypatch: pytest.MonkeyPatch) -> sa.MetaData:
    """What the stream's env.py hands to Alembic (its ``run`` intercepted)."""
    captured: list[sa.MetaData] = []
    monkeypatch.setattr(env_common, "run", captured.append)
    runpy.run_path(str(Path(schema.MIGRATIONS_DIR) / stream.value / "env.py"))
    assert len(captured) == 1
    return captured[0]


def test_both_envs_use_a_metadata_with_the_naming_convention(monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = _target_metadata(schema.Stream.CATALOG, monkeypatch)
    assert catalog is models.metadata  # autogenerate compares against the catalog models
    assert {"tenants", "locations", "audit_log", "jobs"} <= set(catalog.tables)
    tenant = _target_metadata(schema.Stream.TENANT, monkeypatch)
    for metadata in (catalog, tenant):
        assert metadata.naming_convention == models.NAMING_CONVENTION
    assert tenant.tables == {}  # the tenant schema has no models
    # Autogenerate never proposes dropping what is not modelled (DBOS tables, the tenant schema).
    assert env_common.only_modelled(None, "projects", "table", True, None) is False
    assert env_common.only_modelled(None, "tenants", "table", True, object()) is True


def _constraint_names(dsn: str) -> set[str]:
    with psycopg.connect(libpq(dsn)) as conn:
        rows = conn.execute(
            "SELECT conname FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE n.nspname IN ('public', 'tenantctl') "
            "UNION SELECT indexname FROM pg_indexes WHERE schemaname IN ('public', 'tenantctl')"
        ).fetchall()
    return {str(r[0]) for r in rows}


def test_existing_revisions_keep_the_names_they_spell_out(endpoints: Endpoints) -> None:
    catalog, pool = _constraint_names(endpoints.catalog_url), _constraint_names(endpoints.pool_url)
    assert {
        "ck_locations_kind",
        "ck_tenants_status",
        "uq_tenants_slug",
        "pk_tenants",
        "ix_tenants_created_at_id",
    } <= catalog
    assert {
        "ck_projects_status",
        "ck_tasks_title_length",
        "pk_projects",
        "fk_tasks_tenant_id_project_id_projects",
    } <= pool
    for name in catalog | pool:
        # The plain %(constraint_name)s token would have produced ck_<table>_ck_<table>_...
        assert "_ck_" not in name, name


def test_new_operations_follow_the_convention(endpoints: Endpoints, monkeypatch: pytest.MonkeyPatch) -> None:
    metadata = _target_metadata(schema.Stream.TENANT, monkeypatch)
    engine = sa.create_engine(sync_url(endpoints.pool_url), poolclass=NullPool)
    try:
        with engine.begin() as conn:
            op = Operations(MigrationContext.configure(conn, opts={"target_metadata": metadata}))
            op.create_table(
                "invoices",
                sa.Column("tenant_id", sa.Uuid(), nullable=False),
                sa.Column("id", sa.Uuid(), nullable=False),
                sa.Column("number", sa.Text(), nullable=False),
                sa.Column("amount", sa.Integer(), nullable=False),
                sa.PrimaryKeyConstraint("tenant_id", "id"),
                sa.UniqueConstraint("tenant_id", "number"),
                sa.CheckConstraint("amount >= 0", name="amount_not_negative"),
                sa.CheckConstraint("amount < 1000000", name="ck_invoices_amount_bounded"),
            )
            op.create_index(None, "invoices", ["tenant_id", "amount"])
            op.create_index(op.f("invoices_by_number"), "invoices", ["number"])
            names = {
                str(r[0])
                for r in conn.exec_driver_sql(
                    "SELECT conname FROM pg_constraint WHERE conrelid = 'invoices'::regclass "
                    "UNION SELECT indexname FROM pg_indexes WHERE tablename = 'invoices'"
                )
            }
            conn.exec_driver_sql("DROP TABLE invoices")
    finally:
        engine.dispose()
    assert names == {
        "pk_invoices",
        "uq_invoices_tenant_id_number",
        "ck_invoices_amount_not_negative",
        "ck_invoices_amount_bounded",
        "ix_invoices_tenant_id_amount",
        "invoices_by_number",
    }
