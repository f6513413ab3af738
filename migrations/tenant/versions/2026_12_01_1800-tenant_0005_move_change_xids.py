"""Each recorded move change carries its transaction id, so the fence reads only the new ones.

Revision ID: tenant_0005
Revises: tenant_0004
Create Date: 2026-12-01 18:00:00

Inside the fence, verification needs the changes recorded since its early
pass (``control_plane.moves.verify``). It used to read every change row of
the move on both sides and drop the ones it had already seen: thousands of
rows for a busy tenant, inside the write pause. A change-row id cannot tell
the new ones apart, because ids are handed out in insert order and
transactions commit in another order: a row with a smaller id than one
already seen can become visible later.

A transaction id can, against a snapshot. With the early pass's snapshot E,
a change row is new exactly when its transaction is not visible in E, and
every such transaction has an id of at least E's xmin. So the fence reads
``xid >= pg_snapshot_xmin(E) AND NOT pg_visible_in_snapshot(xid, E)``
through an index on ``(move_id, xid)``: only the transactions of the last
moments before the fence.

``pg_current_xact_id()`` is the top-level transaction's id, also when the
trigger fires in a subtransaction, and visibility in a snapshot is decided by
the top-level transaction. The column's default is volatile, so adding it
rewrites the table; the table holds only the rows of moves under way (a
fleet migration and a move never run at once), and rows that existed get the
migration's own id, later than any snapshot of theirs: they count as new,
which costs a re-read and never misses a change.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "tenant_0005"
down_revision: str | Sequence[str] | None = "tenant_0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Raw DDL: SQLAlchemy has no xid8 type.
    op.execute("ALTER TABLE tenantctl.move_changes ADD COLUMN xid xid8 NOT NULL DEFAULT pg_current_xact_id()")
    op.create_index("ix_move_changes_move_id_xid", "move_changes", ["move_id", "xid"], schema="tenantctl")


def downgrade() -> None:
    op.drop_index("ix_move_changes_move_id_xid", table_name="move_changes", schema="tenantctl")
    op.drop_column("move_changes", "xid", schema="tenantctl")
