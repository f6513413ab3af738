"""How a tenant database answers for a tenant: the statement that binds it, the SQLSTATEs that refuse it.

``tenantctl.begin_tenant(tenant, epoch)`` (tenant schema, migration
``tenant_0001``) binds ``app.current_tenant_id`` transaction-locally and
raises one of these SQLSTATEs when this database must not serve the tenant
at that epoch. Its own module so that the engine registry (which warms it on
a move's target) and the tenant transaction share one spelling.
"""

from __future__ import annotations

BEGIN_TENANT = "SELECT tenantctl.begin_tenant($1, $2)"
NOT_SERVED_HERE = "TC001"
FENCED = "TC002"
STALE_EPOCH = "TC003"
REFUSALS = frozenset({NOT_SERVED_HERE, FENCED, STALE_EPOCH})
# An epoch no route ever has (epochs start at 1 and only grow): a statement
# guarded with it is refused by every database, after it has been planned.
NEVER_EPOCH = -1
# Every fused statement (``data_plane.session.fused`` / ``fused_insert``) this
# process has built, with the number of its own parameters (the tenant and the
# epoch follow them). A move's target is warmed with each, guarded with
# NEVER_EPOCH, before the flip: see ``data_plane.routing._warm``.
FUSED_STATEMENTS: dict[str, int] = {}
