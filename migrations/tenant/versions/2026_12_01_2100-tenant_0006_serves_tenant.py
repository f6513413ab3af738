"""``serves_tenant``: a move's target records changes only until it serves the tenant.

Revision ID: tenant_0006
Revises: tenant_0005
Create Date: 2026-12-01 21:00:00

A move's change-recording triggers on the target exist so that verification
sees every change made there before the target is activated: those applied by
replication and any other write, by any session. After the activation the
target is the tenant's store and nothing is verified any more, but until the
move drops its triggers every write of the tenant's own requests there fired
them: a row in ``move_changes`` per write, and on each new backend the
compilation of the trigger function, in the first writes after the route's
flip (measured ~1.7 ms per backend on an idle host, several times that on a
busy one, inside the move's write pause).

The target's triggers get ``AND NOT tenantctl.serves_tenant(tenant)`` in their
WHEN clause (``control_plane.moves.verify.install_tracking``): a write made
while the tenant is not active there is recorded as before, whoever makes it;
once the activation has committed, nothing is. The source's triggers keep
recording while the source serves the tenant, so they do not use it.
"""

from collections.abc import Sequence

from alembic import op

from migrations.helpers import app_role, quote

revision: str = "tenant_0006"
down_revision: str | Sequence[str] | None = "tenant_0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

SERVES = """
CREATE FUNCTION tenantctl.serves_tenant(p_tenant uuid) RETURNS boolean
LANGUAGE sql STABLE SECURITY INVOKER SET search_path = pg_catalog, pg_temp AS $fn$
    SELECT EXISTS (SELECT 1 FROM tenantctl.tenant_ownership WHERE tenant_id = p_tenant AND state = 'active')
$fn$;
"""


def upgrade() -> None:
    op.execute(SERVES)
    op.execute("REVOKE ALL ON FUNCTION tenantctl.serves_tenant(uuid) FROM PUBLIC")
    # The app role's writes evaluate the WHEN clause (it may read these columns: tenant_0004).
    op.execute(f"GRANT EXECUTE ON FUNCTION tenantctl.serves_tenant(uuid) TO {quote(app_role())}")


def downgrade() -> None:
    op.execute("DROP FUNCTION tenantctl.serves_tenant(uuid)")
