"""Jobs, idempotency keys, and the DBOS system schema in the catalog database.

Revision ID: catalog_0002
Revises: catalog_0001
Create Date: 2026-11-23 19:45:00

* ``jobs`` -- one row per long operation (onboarding, offboarding, later
  promotion/demotion). The row *is* the job the admin API shows; the DBOS
  workflow that executes it has the same id. A partial unique index allows at
  most one unfinished job per tenant, so a duplicate operation is a 409.
* ``idempotency_keys`` -- the stored response of every admin POST sent with an
  ``Idempotency-Key`` header, scoped by caller.
* schema ``dbos`` -- DBOS's system tables (workflow status, step outputs,
  queues). DESIGN: "DBOS, on the catalog database". Created here so that a
  migrated catalog can accept enqueued jobs before any worker ever launched.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects.postgresql import JSONB, UUID

from migrations.helpers import timestamps

revision: str = "catalog_0002"
down_revision: str | Sequence[str] | None = "catalog_0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JOB_STATUSES = "('pending', 'running', 'succeeded', 'failed', 'cancelled')"
DBOS_SCHEMA = "dbos"


def _migrate_dbos_schema() -> None:
    # Imported here: only an online upgrade needs DBOS, and DBOS.migrate opens
    # its own connection (its DDL touches nothing this transaction locks).
    from dbos import DBOS

    url = op.get_bind().engine.url.set(drivername="postgresql+psycopg")
    DBOS.migrate(url.render_as_string(hide_password=False), schema=DBOS_SCHEMA)


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", UUID(as_uuid=True), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=True),
        sa.Column("status", sa.Text(), nullable=False, server_default="pending"),
        sa.Column("step", sa.Text(), nullable=True),
        sa.Column("progress", sa.Float(), nullable=False, server_default="0"),
        sa.Column("detail", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("params", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("created_by", sa.Text(), nullable=False),
        *timestamps(),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name="fk_jobs_tenant_id_tenants"),
        sa.CheckConstraint(f"status IN {JOB_STATUSES}", name="ck_jobs_status"),
        sa.CheckConstraint("progress >= 0 AND progress <= 1", name="ck_jobs_progress"),
    )
    op.create_index("ix_jobs_tenant_id_created_at", "jobs", ["tenant_id", "created_at"])
    op.create_index(
        "uq_jobs_tenant_id_unfinished",
        "jobs",
        ["tenant_id"],
        unique=True,
        postgresql_where=sa.text("status IN ('pending', 'running')"),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("request_hash", sa.Text(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False, server_default="in_flight"),
        sa.Column("response_status", sa.Integer(), nullable=True),
        sa.Column("response_body", JSONB(), nullable=True),
        sa.Column("response_headers", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        *timestamps(),
        sa.PrimaryKeyConstraint("actor", "key", name="pk_idempotency_keys"),
        sa.CheckConstraint("state IN ('in_flight', 'done')", name="ck_idempotency_keys_state"),
        sa.CheckConstraint("char_length(key) BETWEEN 1 AND 255", name="ck_idempotency_keys_key_length"),
    )
    op.create_index("ix_tenants_created_at_id", "tenants", ["created_at", "id"])
    if not context.is_offline_mode():
        _migrate_dbos_schema()


def downgrade() -> None:
    op.drop_index("ix_tenants_created_at_id", table_name="tenants")
    op.drop_table("idempotency_keys")
    op.drop_table("jobs")
    op.execute(f"DROP SCHEMA IF EXISTS {DBOS_SCHEMA} CASCADE")
