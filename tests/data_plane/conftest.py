"""The data-plane fixtures live in ``tests.world`` (a plugin of the top-level conftest).

Re-exported here for the modules that import them by this path.
"""

from tests.world import TenantFixture, World, add_pool_tenant, add_silo_tenant, seed_rows

__all__ = ["TenantFixture", "World", "add_pool_tenant", "add_silo_tenant", "seed_rows"]
