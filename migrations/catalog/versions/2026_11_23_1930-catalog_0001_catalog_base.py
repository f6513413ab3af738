"""Catalog: locations, tenants, audit log, the tenant_routes view and its NOTIFY.

Revision ID: catalog_0001
Revises:
Create Date: 2026-11-23 19:30:00

The data plane reads routes through one narrow contract: SELECT on the
``tenant_routes`` view and LISTEN on the ``tenant_routes`` channel. A payload
is a tenant id, or ``*`` when a change may affect many tenants (a location's
DSN changed): replicas then refresh everything.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB, UUID

from migrations.helpers import app_role, quote, timestamps

revision: str = "catalog_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TENANT_STATUSES = "('provisioning', 'active', 'suspended', 'moving', 'offboarding', 'deleted')"

NOTIFY = """
CREATE FUNCTION notify_tenant_route() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_TABLE_NAME = 'locations' THEN
        PERFORM pg_notify('tenant_routes', '*');
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tenant_routes', OLD.id::text);
    ELSIF TG_OP = 'INSERT'
       OR (NEW.status, NEW.tier, NEW.placement, NEW.location_id, NEW.route_epoch)
          IS DISTINCT FROM (OLD.status, OLD.tier, OLD.placement, OLD.location_id, OLD.route_epoch) THEN
        PERFORM pg_notify('tenant_routes', NEW.id::text);
    END IF;
    RETURN NULL;
END
$fn$;

CREATE TRIGGER tenants_notify_route AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION notify_tenant_route();
CREATE TRIGGER locations_notify_route AFTER UPDATE OF app_dsn, secret_ref, status ON locations
    FOR EACH ROW EXECUTE FUNCTION notify_tenant_route();

CREATE FUNCTION audit_log_is_append_only() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$fn$;

CREATE TRIGGER audit_log_no_update BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_is_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_is_append_only();

CREATE VIEW tenant_routes AS
SELECT t.id AS tenant_id, t.slug, t.tier, t.status, t.placement, t.route_epoch,
       l.id AS location_id, l.name AS location_name, l.app_dsn, l.secret_ref
  FROM tenants t JOIN locations l ON l.id = t.location_id
 WHERE t.status <> 'deleted';
"""


def upgrade() -> None:
    op.create_table(
        "locations",
        sa.Column("id", UUID(as_uuid=True), nullable=False, server_default=sa.text("gen_random_uuid()")),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("stack_name", sa.Text(), nullable=True),
        sa.Column("database", sa.Text(), nullable=True),
        sa.Column("dsn", sa.Text(), nullable=True, comment="owner/admin DSN (dev) -- never with a password"),
        sa.Column("app_dsn", sa.Text(), nullable=True, comment="application-role DSN (dev)"),
        sa.Column("secret_ref", sa.Text(), nullable=True, comment="e.g. an AWS Secrets Manager ARN"),
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=True),
        sa.Column("status", sa.Text(), nullable=False, server_default="ready"),
        sa.Column("detail", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        *timestamps(),
        sa.PrimaryKeyConstraint("id", name="pk_locations"),
        sa.UniqueConstraint("name", name="uq_locations_name"),
        sa.CheckConstraint("kind IN ('pool', 'silo')", name="ck_locations_kind"),
        sa.CheckConstraint(
            "status IN ('provisioning', 'ready', 'deleting', 'deleted', 'failed')", name="ck_locations_status"
        ),
    )
    op.create_table(
        "tenants",
        sa.Column("id", UUID(as_uuid=True), nullable=False, server_default=sa.text("gen_random_uuid()")),
        sa.Column("slug", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("tier", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("placement", sa.Text(), nullable=False),
        sa.Column("location_id", UUID(as_uuid=True), nullable=True),
        sa.Column("route_epoch", sa.BigInteger(), nullable=False, server_default="1"),
        sa.Column("version", sa.Integer(), nullable=False, server_default="1"),
        *timestamps(),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("slug", name="uq_tenants_slug"),
        sa.ForeignKeyConstraint(["location_id"], ["locations.id"], name="fk_tenants_location_id_locations"),
        sa.CheckConstraint(f"status IN {TENANT_STATUSES}", name="ck_tenants_status"),
        sa.CheckConstraint("placement IN ('pool', 'silo')", name="ck_tenants_placement"),
        sa.CheckConstraint("slug ~ '^[a-z0-9][a-z0-9-]{1,62}$'", name="ck_tenants_slug"),
    )
    op.create_index("ix_tenants_status_created_at", "tenants", ["status", "created_at", "id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=True),
        sa.Column("detail", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_tenant_id_at", "audit_log", ["tenant_id", "at"])
    op.execute(NOTIFY)
    op.execute("INSERT INTO locations (name, kind, provider, status) VALUES ('pool', 'pool', 'static', 'ready')")
    op.execute(f"GRANT SELECT ON tenant_routes TO {quote(app_role())}")


def downgrade() -> None:
    op.execute("DROP VIEW tenant_routes")
    op.drop_table("audit_log")
    op.drop_table("tenants")
    op.drop_table("locations")
    op.execute("DROP FUNCTION audit_log_is_append_only()")
    op.execute("DROP FUNCTION notify_tenant_route()")
