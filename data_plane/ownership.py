"""How a tenant database answers for a tenant: the statement that binds it, the SQLSTATEs that refuse it.

``tenantctl.begin_tenant(tenant, epoch)`` (tenant schema, migration
``tenant_0001``) binds ``app.current_tenant_id`` transaction-locally and
raises one of these SQLSTATEs when this database must not serve the tenant
at that epoch. Its own module so that the engine registry (which warms it on
a move's target) and the tenant transaction share one spelling.
"""

BEGIN_TENANT = "SELECT tenantctl.begin_tenant($1, $2)"
NOT_SERVED_HERE = "TC001"
FENCED = "TC002"
STALE_EPOCH = "TC003"
REFUSALS = frozenset({NOT_SERVED_HERE, FENCED, STALE_EPOCH})
