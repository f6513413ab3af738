"""A silo's location change notifies its own tenants, not every replica's whole cache.

Revision ID: catalog_0011
Revises: catalog_0010
Create Date: 2026-12-01 12:00:00

``catalog_0001`` sent ``*`` (drop every cached route) for any update of a
location's ``app_dsn``, ``secret_ref`` or ``status``. A promotion's flip marks
its new silo ``ready`` in the flip's own transaction, so every promotion made
every replica drop every tenant's route at the moment the moved tenant's held
requests resume: each tenant's next request then read the catalog again.

* ``status`` is not in ``tenant_routes`` and no longer notifies; a value that
  did not change does not notify either.
* A silo location serves its own tenants (normally one): their ids are sent.
  The shared pool's location still sends ``*``.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "catalog_0011"
down_revision: str | Sequence[str] | None = "catalog_0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

NOTIFY = """
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

LOCATION_TRIGGER = """
CREATE TRIGGER locations_notify_route AFTER UPDATE OF app_dsn, secret_ref ON locations
    FOR EACH ROW
    WHEN (OLD.app_dsn IS DISTINCT FROM NEW.app_dsn OR OLD.secret_ref IS DISTINCT FROM NEW.secret_ref)
    EXECUTE FUNCTION notify_tenant_route();
"""

OLD_NOTIFY = """
CREATE OR REPLACE FUNCTION notify_tenant_route() RETURNS trigger LANGUAGE plpgsql AS $fn$
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
"""

OLD_LOCATION_TRIGGER = """
CREATE TRIGGER locations_notify_route AFTER UPDATE OF app_dsn, secret_ref, status ON locations
    FOR EACH ROW EXECUTE FUNCTION notify_tenant_route();
"""


def upgrade() -> None:
    op.execute(NOTIFY)
    op.execute("DROP TRIGGER locations_notify_route ON locations")
    op.execute(LOCATION_TRIGGER)


def downgrade() -> None:
    op.execute(OLD_NOTIFY)
    op.execute("DROP TRIGGER locations_notify_route ON locations")
    op.execute(OLD_LOCATION_TRIGGER)
