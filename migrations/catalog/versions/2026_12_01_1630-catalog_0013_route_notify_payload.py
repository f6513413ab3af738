"""A tenant's route change notifies its new route fields, not only its id.

Revision ID: catalog_0013
Revises: catalog_0012
Create Date: 2026-12-01 16:30:00

The payload of a ``tenants`` change on ``tenant_routes`` becomes
``<id> <route_epoch> <status> <tier> <placement> <location_id> <next_location_id or ->``.
A replica whose cached route names a move's target (``next_location_id``) and
receives the flip's notification (the target as ``location_id``, the next
epoch) installs the route at once, instead of every held request waiting for
a catalog read inside the write pause. Any other change still only evicts
the tenant; other payloads (``*``, a bare id from a location or a delete)
are unchanged. A replica of older code cannot parse the new payload and
evicts its whole cache on it: safe, only costlier, while a rolling upgrade
runs.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "catalog_0013"
down_revision: str | Sequence[str] | None = "catalog_0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

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
        -- The tenant's route fields ride along: a replica that already knows
        -- the location (a move's announced target) takes the flip from this
        -- message, with no catalog read inside the move's write pause.
        PERFORM pg_notify(
            'tenant_routes',
            concat_ws(' ', NEW.id, NEW.route_epoch, NEW.status, NEW.tier, NEW.placement, NEW.location_id,
                      coalesce(NEW.next_location_id::text, '-'))
        );
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


def upgrade() -> None:
    op.execute(NOTIFY)


def downgrade() -> None:
    op.execute(OLD_NOTIFY)
