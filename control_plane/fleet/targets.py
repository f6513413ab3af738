"""Which databases a fleet run touches: the pool and the silos recorded in the catalog.

A silo is a target when its ``locations`` row has ``kind = 'silo'``, a DSN and
status ``'ready'`` -- or status ``'provisioning'`` while the tenant it was
recorded for is itself still ``'provisioning'`` (an onboarding between its
``migrate`` and ``activate`` steps). Without the latter, a fleet run in that
window would move the pool to a new revision and skip the new silo, which then
turns ready on the old revision and is never seen again (issue 7 item 7).
The onboarding's own ``migrate`` runs under the interlock
(``control_plane.fleet.migrate_new_silo``), so the two never interleave.
A move's new silo needs no such rule: its tenant is ``'moving'``, which makes
the runner refuse. Deleted or failed silos are not the fleet's business.
"""

from __future__ import annotations

import psycopg

from control_plane.fleet.models import Target
from data_plane.dsn import libpq
from data_plane.exceptions import InvalidInputError, NotFoundError

POOL = "pool"
ALL = "all"

_SILOS = """
SELECT l.name, l.dsn,
       coalesce((SELECT min(t.slug) FROM tenants t WHERE t.location_id = l.id AND t.status <> 'deleted'), o.slug),
       l.detail ->> 'master_secret_arn'
  FROM locations l LEFT JOIN tenants o ON o.id = l.tenant_id
 WHERE l.kind = 'silo' AND l.dsn IS NOT NULL
   AND (l.status = 'ready' OR (l.status = 'provisioning' AND o.status = 'provisioning'))
 ORDER BY l.name
"""

_TENANT_LOCATION = """
SELECT l.kind, l.name, l.dsn, l.status, l.detail ->> 'master_secret_arn'
  FROM tenants t LEFT JOIN locations l ON l.id = t.location_id
 WHERE t.slug = %s
"""


def pool_target(pool_dsn: str) -> Target:
    return Target(name=POOL, kind="pool", dsn=pool_dsn)


def load_targets(catalog_dsn: str, pool_dsn: str, selector: str = ALL) -> list[Target]:
    """Targets for ``--target``: ``all`` (pool first, then silos by name), ``pool``, or a tenant slug.

    A slug selects the database that serves the tenant: its silo, or the pool
    for a pool tenant.
    """
    if selector == POOL:
        return [pool_target(pool_dsn)]
    with psycopg.connect(libpq(catalog_dsn), autocommit=True) as conn:
        if selector == ALL:
            rows = conn.execute(_SILOS).fetchall()
            silos = [
                Target(name=str(n), kind="silo", dsn=str(d), tenant=t and str(t), secret_ref=ref)
                for n, d, t, ref in rows
            ]
            return [pool_target(pool_dsn), *silos]
        row = conn.execute(_TENANT_LOCATION, (selector,)).fetchone()
    if row is None:
        raise NotFoundError(f"no tenant with slug {selector!r} (--target takes pool, all or a tenant slug)")
    kind, name, dsn, status, ref = row
    if kind == "pool":
        return [pool_target(pool_dsn)]
    if kind != "silo" or not dsn or status != "ready":
        raise InvalidInputError(
            f"tenant {selector!r} has no ready database location (location {name!r}, status {status!r})"
        )
    return [Target(name=str(name), kind="silo", dsn=str(dsn), tenant=selector, secret_ref=ref)]
