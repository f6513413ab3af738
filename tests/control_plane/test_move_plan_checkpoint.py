"""A move's plan is checkpointed in the catalog database: never with a password in it."""

from __future__ import annotations

import json
import types
import uuid

import pytest

from control_plane.moves.engine import MovePlan, Side, replication_conninfo
from control_plane.stack import Endpoints
from control_plane.workflows import moves, runtime

POOL = "postgresql://tenantctl_owner:pool-owner-pw@pool.internal:5432/tenantctl_pool"
POOL_ADMIN = "postgresql://admin:pool-admin-pw@pool.internal:5432/tenantctl_pool"
SILOS = "postgresql://admin:silo-admin-pw@silos.internal:5432/postgres"
SILO = "postgresql://tenantctl_owner@silos.internal:5432/silo_acme"


@pytest.fixture
def endpoints(monkeypatch: pytest.MonkeyPatch) -> Endpoints:
    eps = Endpoints(
        catalog_url="postgresql://tenantctl_owner:cat-pw@cat.internal/tenantctl_catalog",
        pool_url=POOL,
        silo_server_url=SILOS,
        app_catalog_url="postgresql://tenantctl_app@cat.internal/tenantctl_catalog",
        app_pool_url="postgresql://tenantctl_app@pool.internal/tenantctl_pool",
        app_silo_server_url="postgresql://tenantctl_app@silos.internal/postgres",
        pool_admin_url=POOL_ADMIN,
    )
    monkeypatch.setattr(runtime, "current", lambda: types.SimpleNamespace(endpoints=eps))
    return eps


def test_plan_checkpoint_holds_no_password_and_reads_back_the_configured_ones(endpoints: Endpoints) -> None:
    plan = MovePlan(
        move_id=uuid.uuid4(),
        tenant_id=uuid.uuid4(),
        source=Side("pool", "p", POOL, POOL_ADMIN, replication_conninfo(POOL, "tenantctl_replicator")),
        target=Side(
            "silo",
            "s",
            SILO,
            "postgresql://admin:silo-admin-pw@silos.internal:5432/silo_acme",
            replication_conninfo(SILO, "tenantctl_replicator"),
            owner_secret="arn:aws:secretsmanager:eu-west-1:000000000000:secret:master",
        ),
        epoch=3,
    )
    stored = json.dumps(moves._plan_json(plan, placement="silo"))
    for password in ("pool-owner-pw", "pool-admin-pw", "silo-admin-pw"):
        assert password not in stored
    restored = moves.plan_of({"plan": json.loads(stored)})
    # Each DSN gets the password of the configured endpoint with the same server and user...
    assert restored.source.owner_dsn == POOL
    assert restored.source.admin_dsn == POOL_ADMIN
    assert "silo-admin-pw" in restored.target.admin_dsn
    # ... and nothing else does: a login no endpoint configures stays without one.
    assert restored.source.replication_conninfo == replication_conninfo(POOL, "tenantctl_replicator")
    assert ":" not in restored.source.replication_conninfo.split("@")[0].removeprefix("postgresql://")
    assert restored.target.owner_dsn == SILO
    assert restored.target.owner_secret == plan.target.owner_secret
