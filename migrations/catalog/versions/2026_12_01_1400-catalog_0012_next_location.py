"""A moving tenant's route names where it is going, so replicas can connect there first.

Revision ID: catalog_0012
Revises: catalog_0011
Create Date: 2026-12-01 14:00:00

A move sets ``tenants.next_location_id`` when it plans its target and clears
it at the flip (or when it is cancelled). ``tenant_routes`` shows that
location's name, kind and application DSN/secret beside the current one: a
replica that serves the tenant opens its connection pool to the target while
the tenant still writes to the source. Otherwise the first write after the
flip waits for a backend start and an authentication inside the move's write
pause. A change of ``next_location_id`` notifies the tenant, and so does a
DSN change of a silo that is a tenant's next location. Nothing routes there:
requests follow ``location_id`` only, and the target refuses the tenant until
the cutover activates it.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "catalog_0012"
down_revision: str | Sequence[str] | None = "catalog_0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEW = """
CREATE OR REPLACE VIEW tenant_routes AS
SELECT t.id AS tenant_id, t.slug, t.tier, t.status, t.placement, t.route_epoch,
       l.id AS location_id, l.name AS location_name, l.app_dsn, l.secret_ref,
       n.id AS next_location_id, n.kind AS next_location_kind, n.name AS next_location_name,
       n.app_dsn AS next_app_dsn, n.secret_ref AS next_secret_ref
  FROM tenants t JOIN locations l ON l.id = t.location_id
  LEFT JOIN locations n ON n.id = t.next_location_id
 WHERE t.status <> 'deleted';
"""

OLD_VIEW = """
CREATE VIEW tenant_routes AS
SELECT t.id AS tenant_id, t.slug, t.tier, t.status, t.placement, t.route_epoch,
       l.id AS location_id, l.name AS location_name, l.app_dsn, l.secret_ref
  FROM tenants t JOIN locations l ON l.id = t.location_id
 WHERE t.status <> 'deleted';
"""

NOTIFY = """
CREATE OR REPLACE FUNCTION notify_tenant_route() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_TABLE_NAME = 'locations' THEN
        IF NEW.kind = 'silo' THEN
            PERFORM pg_notify('tenant_routes', t.id::text)
               FROM tenants t WHERE t.location_id = NEW.id OR t.next_location_id = NEW.id;
        ELSE
            PERFORM pg_notify('tenant_routes', '*');
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        PERFORM pg_notify('tenant_routes', OLD.id::text);
    ELSIF TG_OP = 'INSERT'
       OR (NEW.status, NEW.tier, NEW.placement, NEW.location_id, NEW.route_epoch, NEW.next_location_id)
          IS DISTINCT FROM
          (OLD.status, OLD.tier, OLD.placement, OLD.location_id, OLD.route_epoch, OLD.next_location_id) THEN
        PERFORM pg_notify('tenant_routes', NEW.id::text);
    END IF;
    RETURN NULL;
END
$fn$;
"""

OLD_NOTIFY = """
CREATE OR REPLACE FUNCTION notify_tenant_route() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF TG_TABLE_NAME = 'locations' THEN
        IF NEW.kind = 'silo' THEN
            PERFORM pg_notify('tenant_routes', t.id::text) FROM tenants t WHERE t.location_id = NEW.id;
        ELSE
            PERFORM pg_notify('tenant_routes', '*');
        END IF;
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
"""


def upgrade() -> None:
    op.execute("ALTER TABLE tenants ADD COLUMN next_location_id uuid REFERENCES locations (id)")
    op.execute(VIEW)  # adds columns at the end: grants on the view are kept
    op.execute(NOTIFY)


def downgrade() -> None:
    op.execute(OLD_NOTIFY)
    # A view cannot lose columns in place; its grants go with it and are restored.
    grants = op.get_bind().exec_driver_sql(
        "SELECT grantee, privilege_type FROM information_schema.role_table_grants "
        "WHERE table_name = 'tenant_routes' AND grantee <> current_user"
    )
    saved = [(str(grantee), str(privilege)) for grantee, privilege in grants]
    op.execute("DROP VIEW tenant_routes")
    op.execute(OLD_VIEW)
    for grantee, privilege in saved:
        op.execute(f'GRANT {privilege} ON tenant_routes TO "{grantee}"')
    op.execute("ALTER TABLE tenants DROP COLUMN next_location_id")
