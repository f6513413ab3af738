"""Tenant data schema: ownership fence, projects and tasks under RLS.

Revision ID: tenant_0001
Revises:
Create Date: 2026-11-23 19:30:00

The ``tenantctl`` schema holds what makes "single writer" (invariant I4) a
property of the database itself:

* ``tenant_ownership`` -- which tenants this database serves, at which route
  epoch, and whether a move has fenced them;
* ``begin_tenant(tenant, epoch)`` -- called first in every tenant transaction:
  takes a *shared* advisory lock for the tenant, checks ownership and epoch and
  binds ``app.current_tenant_id`` transaction-locally; returns true, so a
  read can be fused into one statement that depends on it (see
  ``data_plane.session``);
* ``fence_tenant(tenant)`` -- takes the same lock *exclusively*, so it waits
  for every in-flight tenant transaction to finish (drain) and blocks new ones,
  then marks the tenant fenced. A transaction that began before the fence has
  committed before the fence returns; none can commit into this store after.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

from migrations.helpers import app_role, disable_tenant_rls, enable_tenant_rls, quote, timestamps

revision: str = "tenant_0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCK_NAMESPACE = 7301  # first key of the two-key advisory lock; second key: hashtext(tenant)

FUNCTIONS = f"""
CREATE FUNCTION tenantctl.begin_tenant(p_tenant uuid, p_epoch bigint) RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $fn$
DECLARE
    v_state text;
    v_epoch bigint;
BEGIN
    IF p_tenant IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'TC000', MESSAGE = 'tenant context missing';
    END IF;
    -- The drain relies on a fresh snapshot *after* the lock below; under
    -- REPEATABLE READ the snapshot predates the lock and could miss a fence.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION USING ERRCODE = 'TC004',
            MESSAGE = 'tenant transactions must run at READ COMMITTED';
    END IF;
    PERFORM pg_advisory_xact_lock_shared({LOCK_NAMESPACE}, hashtext(p_tenant::text));
    SELECT o.state, o.epoch INTO v_state, v_epoch
      FROM tenantctl.tenant_ownership o WHERE o.tenant_id = p_tenant;
    IF NOT FOUND OR v_state = 'moved' THEN
        RAISE EXCEPTION USING ERRCODE = 'TC001', MESSAGE = 'tenant is not served by this database';
    END IF;
    IF v_state = 'fenced' THEN
        RAISE EXCEPTION USING ERRCODE = 'TC002', MESSAGE = 'tenant is fenced for a move';
    END IF;
    IF p_epoch IS NOT NULL AND v_epoch <> p_epoch THEN
        RAISE EXCEPTION USING ERRCODE = 'TC003', MESSAGE = 'stale route epoch',
            DETAIL = v_epoch::text;
    END IF;
    PERFORM set_config('app.current_tenant_id', p_tenant::text, true);
    RETURN true;
END
$fn$;

CREATE FUNCTION tenantctl.claim_tenant(p_tenant uuid, p_epoch bigint, p_state text DEFAULT 'active')
RETURNS void LANGUAGE sql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $fn$
    INSERT INTO tenantctl.tenant_ownership (tenant_id, state, epoch)
    VALUES (p_tenant, p_state, p_epoch)
    ON CONFLICT (tenant_id) DO UPDATE SET state = EXCLUDED.state, epoch = EXCLUDED.epoch, updated_at = now();
$fn$;

CREATE FUNCTION tenantctl.fence_tenant(p_tenant uuid) RETURNS void
LANGUAGE plpgsql SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    -- Waits (bounded by the caller's lock_timeout) for every transaction that
    -- holds the shared lock, i.e. every in-flight tenant transaction.
    PERFORM pg_advisory_xact_lock({LOCK_NAMESPACE}, hashtext(p_tenant::text));
    UPDATE tenantctl.tenant_ownership SET state = 'fenced', updated_at = now()
     WHERE tenant_id = p_tenant AND state = 'active';
END
$fn$;

CREATE FUNCTION tenantctl.tenant_lock_holders(p_tenant uuid) RETURNS SETOF integer
LANGUAGE sql STABLE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT l.pid FROM pg_locks l
     WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ShareLock'
       AND l.classid = {LOCK_NAMESPACE}::oid AND l.objid = hashtext(p_tenant::text)::oid
       AND l.objsubid = 2 AND l.pid <> pg_backend_pid();
$fn$;
"""


def upgrade() -> None:
    role = quote(app_role())
    op.execute("CREATE SCHEMA tenantctl")
    op.execute("REVOKE ALL ON SCHEMA tenantctl FROM PUBLIC")
    op.execute(f"GRANT USAGE ON SCHEMA tenantctl TO {role}")
    op.create_table(
        "tenant_ownership",
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenant_ownership"),
        sa.CheckConstraint("state IN ('active', 'fenced', 'moved')", name="ck_tenant_ownership_state"),
        schema="tenantctl",
    )
    op.execute(FUNCTIONS)
    op.execute("REVOKE ALL ON ALL FUNCTIONS IN SCHEMA tenantctl FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION tenantctl.begin_tenant(uuid, bigint) TO {role}")

    op.create_table(
        "projects",
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=False),
        sa.Column("id", UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False, server_default="active"),
        *timestamps(),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_projects"),
        sa.CheckConstraint("status IN ('active', 'archived')", name="ck_projects_status"),
        sa.CheckConstraint("char_length(name) BETWEEN 1 AND 200", name="ck_projects_name_length"),
    )
    op.create_index("ix_projects_tenant_id_created_at_id", "projects", ["tenant_id", "created_at", "id"])
    enable_tenant_rls("projects")

    op.create_table(
        "tasks",
        sa.Column("tenant_id", UUID(as_uuid=True), nullable=False),
        sa.Column("id", UUID(as_uuid=True), nullable=False),
        sa.Column("project_id", UUID(as_uuid=True), nullable=False),
        sa.Column("title", sa.Text(), nullable=False),
        sa.Column("done", sa.Boolean(), nullable=False, server_default=sa.false()),
        *timestamps(),
        sa.PrimaryKeyConstraint("tenant_id", "id", name="pk_tasks"),
        # Composite with tenant_id: a task can only reference its own tenant's
        # project, and the FK check cannot be used as a cross-tenant oracle.
        sa.ForeignKeyConstraint(
            ["tenant_id", "project_id"],
            ["projects.tenant_id", "projects.id"],
            name="fk_tasks_tenant_id_project_id_projects",
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("char_length(title) BETWEEN 1 AND 500", name="ck_tasks_title_length"),
    )
    op.create_index(
        "ix_tasks_tenant_id_project_id_created_at_id",
        "tasks",
        ["tenant_id", "project_id", "created_at", "id"],
    )
    enable_tenant_rls("tasks")


def downgrade() -> None:
    disable_tenant_rls("tasks")
    op.drop_table("tasks")
    disable_tenant_rls("projects")
    op.drop_table("projects")
    op.execute("DROP SCHEMA tenantctl CASCADE")
