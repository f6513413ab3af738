"""Move change tracking: verify the bulk before the fence, only the changes inside it.

Revision ID: tenant_0003
Revises: tenant_0002
Create Date: 2026-11-23 20:30:00

During a move, row triggers on the tenant's tables (created per move, on both
sides; ``ENABLE ALWAYS`` on the target so that logical-replication apply fires
them) record the primary key of every row of the tenant that is inserted,
updated or deleted into ``tenantctl.move_changes``. Verification then compares
full checksums of two snapshots taken at the same replication position
*before* the fence, and inside the fence only the rows whose keys were
recorded since (see ``control_plane.moves.engine.verify_incremental``).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

revision: str = "tenant_0003"
down_revision: str | Sequence[str] | None = "tenant_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TRACK = """
CREATE FUNCTION tenantctl.track_move_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    -- TG_ARGV: move id, then the primary-key column names
    v_move uuid := TG_ARGV[0]::uuid;
    v_cols text[] := TG_ARGV[1:];
BEGIN
    IF TG_OP IN ('INSERT', 'UPDATE') THEN
        INSERT INTO tenantctl.move_changes (move_id, tbl, pk)
        SELECT v_move, TG_RELID::regclass::text, jsonb_object_agg(c, to_jsonb(NEW) -> c)
          FROM unnest(v_cols) AS c;
    END IF;
    IF TG_OP IN ('UPDATE', 'DELETE') THEN
        INSERT INTO tenantctl.move_changes (move_id, tbl, pk)
        SELECT v_move, TG_RELID::regclass::text, jsonb_object_agg(c, to_jsonb(OLD) -> c)
          FROM unnest(v_cols) AS c;
    END IF;
    RETURN NULL;
END
$fn$;
"""


def upgrade() -> None:
    op.create_table(
        "move_changes",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("move_id", UUID(as_uuid=True), nullable=False),
        sa.Column("tbl", sa.Text(), nullable=False),
        sa.Column("pk", JSONB(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_move_changes"),
        schema="tenantctl",
    )
    op.create_index("ix_move_changes_move_id_tbl", "move_changes", ["move_id", "tbl"], schema="tenantctl")
    op.execute(TRACK)
    op.execute("REVOKE ALL ON FUNCTION tenantctl.track_move_change() FROM PUBLIC")


def downgrade() -> None:
    op.execute("DROP FUNCTION tenantctl.track_move_change()")
    op.drop_table("move_changes", schema="tenantctl")
