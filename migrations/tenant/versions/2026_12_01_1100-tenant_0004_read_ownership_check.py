"""Ownership check of the fused read as plain SQL in the read's own statement.

Revision ID: tenant_0004
Revises: tenant_0003
Create Date: 2026-12-01 11:00:00

A single-SELECT read (``data_plane.session.fused``) used to call
``begin_tenant``: a PL/pgSQL call that takes the tenant's shared advisory lock
and runs the ownership lookup as a query of its own. Measured with pgbench at
10 clients on the benchmark machine, that made the read cost ~2.5x the bare
indexed lookup; the same check written into the read's statement costs ~1.7x.

The read does not need the lock. The lock exists so that the fence can drain
the tenant's *writing* transactions: none may commit into this store after
the fence. A read-only statement commits nothing. It checks ownership in the
statement's snapshot and reads the tenant's rows in that same snapshot, so
what it returns is exactly the state of a moment at which this database
owned the tenant at the route's epoch. A read whose snapshot is taken after
the fence commits sees 'fenced' and is held. After the flip it sees 'moved'
and follows the new route.

* The application role gets SELECT on the ownership columns. It reveals which
  tenants this database serves, which the role can already read in the
  catalog's ``tenant_routes``. It does not reveal any tenant's data.
* ``refuse_tenant(tenant, state, epoch, expected)`` raises the same SQLSTATEs
  as ``begin_tenant`` (TC000 no context, TC001 not served here, TC002 fenced,
  TC003 stale epoch). It works only on the values the statement observed, so
  the reason always matches the snapshot that refused.
"""

from collections.abc import Sequence

from alembic import op

from migrations.helpers import app_role, quote

revision: str = "tenant_0004"
down_revision: str | Sequence[str] | None = "tenant_0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

REFUSE = """
CREATE FUNCTION tenantctl.refuse_tenant(p_tenant uuid, p_state text, p_epoch bigint, p_expected bigint)
RETURNS boolean LANGUAGE plpgsql VOLATILE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $fn$
BEGIN
    IF p_tenant IS NULL THEN
        RAISE EXCEPTION USING ERRCODE = 'TC000', MESSAGE = 'tenant context missing';
    END IF;
    IF p_state IS NULL OR p_state = 'moved' THEN
        RAISE EXCEPTION USING ERRCODE = 'TC001', MESSAGE = 'tenant is not served by this database';
    END IF;
    IF p_state = 'fenced' THEN
        RAISE EXCEPTION USING ERRCODE = 'TC002', MESSAGE = 'tenant is fenced for a move';
    END IF;
    IF p_expected IS NOT NULL AND p_epoch <> p_expected THEN
        RAISE EXCEPTION USING ERRCODE = 'TC003', MESSAGE = 'stale route epoch', DETAIL = p_epoch::text;
    END IF;
    -- Only reached if a caller asks with values that pass: refuse anyway (fail closed).
    RAISE EXCEPTION USING ERRCODE = 'TC001', MESSAGE = 'ownership check called for a served tenant';
END
$fn$;
"""


def upgrade() -> None:
    role = quote(app_role())
    op.execute(REFUSE)
    op.execute("REVOKE ALL ON FUNCTION tenantctl.refuse_tenant(uuid, text, bigint, bigint) FROM PUBLIC")
    op.execute(f"GRANT EXECUTE ON FUNCTION tenantctl.refuse_tenant(uuid, text, bigint, bigint) TO {role}")
    op.execute(f"GRANT SELECT (tenant_id, state, epoch) ON tenantctl.tenant_ownership TO {role}")


def downgrade() -> None:
    role = quote(app_role())
    op.execute(f"REVOKE SELECT (tenant_id, state, epoch) ON tenantctl.tenant_ownership FROM {role}")
    op.execute("DROP FUNCTION tenantctl.refuse_tenant(uuid, text, bigint, bigint)")
