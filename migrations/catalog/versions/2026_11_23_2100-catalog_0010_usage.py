"""Metered usage per tenant and hour, written by the data plane.

Revision ID: catalog_0010
Revises: catalog_0002
Create Date: 2026-11-23 21:00:00

Each data-plane replica adds its counts to the tenant's hour bucket with
``INSERT ... ON CONFLICT DO UPDATE`` (see ``data_plane.metering``), so replicas
add up. ``rows_stored`` is the last sampled gauge of the hour. The application
role may insert and update these counters and read only the columns its upsert
reads back (PostgreSQL requires SELECT on them for ``ON CONFLICT DO UPDATE``);
it can read nothing else in the catalog but ``tenant_routes``. No foreign key to
``tenants``: a tenant hard-deleted later must not make a flush fail, and usage
outlives offboarding for billing.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

from migrations.helpers import app_role, quote

revision: str = "catalog_0010"
down_revision: str | Sequence[str] | None = "catalog_0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenant_usage",
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("rows_written", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("rows_stored", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("tenant_id", "period_start", name="pk_tenant_usage"),
        sa.CheckConstraint("requests >= 0 AND rows_written >= 0", name="ck_tenant_usage_counts"),
    )
    role = quote(app_role())
    op.execute(f"GRANT INSERT, UPDATE ON tenant_usage TO {role}")
    op.execute(f"GRANT SELECT (tenant_id, period_start, requests, rows_written, rows_stored) ON tenant_usage TO {role}")


def downgrade() -> None:
    op.drop_table("tenant_usage")
