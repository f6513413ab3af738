"""Alembic operations that give a tenant table tenantctl's protection in one line.

In a tenant-stream migration::

    from migrations.helpers import enable_tenant_rls

    def upgrade() -> None:
        op.create_table("invoices", sa.Column("tenant_id", UUID, nullable=False), ...,
                        sa.PrimaryKeyConstraint("tenant_id", "id"))
        enable_tenant_rls("invoices")

``enable_tenant_rls`` enables and forces RLS, adds the fail-closed,
index-friendly policy of DESIGN §3, grants exactly SELECT, INSERT, UPDATE,
DELETE to the application role (never TRUNCATE or REFERENCES: both bypass RLS)
and SELECT to the replication role that moves copy with.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

POLICY_NAME = "tenant_isolation"
# A sub-select is evaluated once per statement (an InitPlan) instead of per
# row; nullif() makes the '' that a used-then-reset setting reads back as mean
# "no tenant", so the comparison is NULL and no row matches (fail closed).
TENANT_PREDICATE = "tenant_id = (SELECT nullif(current_setting('app.current_tenant_id', true), ''))::uuid"

_preparer = postgresql.dialect().identifier_preparer  # type: ignore[no-untyped-call]


def quote(name: str) -> str:
    return str(_preparer.quote(name))


def qualified(table: str, schema: str | None) -> str:
    return f"{quote(schema)}.{quote(table)}" if schema else quote(table)


def app_role() -> str:
    """The application role that migrations grant to (``app_role`` main option)."""
    return context.config.get_main_option("app_role") or "tenantctl_app"


def replication_role() -> str:
    """The role moves replicate as (``replication_role`` main option)."""
    return context.config.get_main_option("replication_role") or "tenantctl_replicator"


def enable_tenant_rls(table: str, *, schema: str | None = None) -> None:
    name = qualified(table, schema)
    op.execute(f"ALTER TABLE {name} ENABLE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {name} FORCE ROW LEVEL SECURITY")
    op.execute(
        f"CREATE POLICY {POLICY_NAME} ON {name} AS PERMISSIVE FOR ALL TO PUBLIC "
        f"USING ({TENANT_PREDICATE}) WITH CHECK ({TENANT_PREDICATE})"
    )
    op.execute(f"REVOKE ALL ON {name} FROM PUBLIC")
    op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {quote(app_role())}")
    # Moves copy the table through logical replication as this role (BYPASSRLS,
    # so the publication's row filter is the only filter applied).
    op.execute(f"GRANT SELECT ON {name} TO {quote(replication_role())}")


def disable_tenant_rls(table: str, *, schema: str | None = None) -> None:
    name = qualified(table, schema)
    op.execute(f"REVOKE ALL ON {name} FROM {quote(app_role())}")
    op.execute(f"REVOKE ALL ON {name} FROM {quote(replication_role())}")
    op.execute(f"DROP POLICY IF EXISTS {POLICY_NAME} ON {name}")
    op.execute(f"ALTER TABLE {name} NO FORCE ROW LEVEL SECURITY")
    op.execute(f"ALTER TABLE {name} DISABLE ROW LEVEL SECURITY")


def tenant_id_column() -> sa.Column[object]:
    return sa.Column("tenant_id", postgresql.UUID(as_uuid=True), nullable=False)


def timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    ]
