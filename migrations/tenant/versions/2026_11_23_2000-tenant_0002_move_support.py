"""Move support: markers for an exact final catch-up, replication grants.

Revision ID: tenant_0002
Revises: tenant_0001
Create Date: 2026-11-23 20:00:00

``tenantctl.move_markers`` is published (row-filtered by tenant) together with
the tenant's tables. The fence writes a marker in the same transaction that
fences the tenant; logical replication applies transactions in commit order, so
once the marker exists on the target, every write the source accepted for the
tenant exists there too. ``fence_tenant`` is replaced to write it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

from migrations.helpers import quote, replication_role

revision: str = "tenant_0002"
down_revision: str | Sequence[str] | None = "tenant_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCK_NAMESPACE = 7301

FENCE_WITH_MARKER = f"""
CREATE OR REPLACE FUNCTION tenantctl.fence_tenant(p_tenant uuid, p_marker uuid DEFAULT NULL) RETURNS void
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- Waits (bounded by the caller's lock_timeout) for every transaction that
    -- holds the shared lock, i.e. every in-flight tenant transaction.
    PERFORM pg_advisory_xact_lock({LOCK_NAMESPACE}, hashtext(p_tenant::text));
    UPDATE tenantctl.tenant_ownership SET state = 'fenced', updated_at = now()
     WHERE tenant_id = p_tenant AND state = 'active';
    IF p_marker IS NOT NULL THEN
        INSERT INTO tenantctl.move_markers (marker, tenant_id) VALUES (p_marker, p_tenant)
        ON CONFLICT (tenant_id, marker) DO NOTHING;
    END IF;
END
$fn$;
"""


def upgrade() -> None:
    replicator = quote(replication_role())
    op.create_table(
        "move_markers",
        sa.Column("marker", UUID(as_uuid=True), nullable=False),
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        # tenant_id leads the key: the publication filters on it, and a row
        # filter may only use replica-identity columns (else DELETE fails).
        sa.PrimaryKeyConstraint("tenant_id", "marker", name="pk_move_markers"),
        schema="tenantctl",
    )
    op.execute("DROP FUNCTION tenantctl.fence_tenant(uuid)")
    op.execute(FENCE_WITH_MARKER)
    op.execute("REVOKE ALL ON FUNCTION tenantctl.fence_tenant(uuid, uuid) FROM PUBLIC")
    op.execute(f"GRANT USAGE ON SCHEMA tenantctl TO {replicator}")
    op.execute(f"GRANT SELECT ON tenantctl.move_markers TO {replicator}")
    op.execute(f"GRANT SELECT ON public.projects, public.tasks TO {replicator}")


def downgrade() -> None:
    replicator = quote(replication_role())
    op.execute(f"REVOKE ALL ON public.projects, public.tasks FROM {replicator}")
    op.execute(f"REVOKE ALL ON SCHEMA tenantctl FROM {replicator}")
    op.execute("DROP FUNCTION tenantctl.fence_tenant(uuid, uuid)")
    op.execute(
        FENCE_WITH_MARKER.replace(", p_marker uuid DEFAULT NULL", "")
        .replace(
            """    IF p_marker IS NOT NULL THEN
        INSERT INTO tenantctl.move_markers (marker, tenant_id) VALUES (p_marker, p_tenant)
        ON CONFLICT (tenant_id, marker) DO NOTHING;
    END IF;
""",
            "",
        )
        .replace("CREATE OR REPLACE", "CREATE")
    )
    op.execute("REVOKE ALL ON FUNCTION tenantctl.fence_tenant(uuid) FROM PUBLIC")
    op.drop_table("move_markers", schema="tenantctl")
