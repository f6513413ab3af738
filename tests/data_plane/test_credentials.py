"""Silo credentials behind a ``secret_ref`` (production RDS silos), end to end through the tenant API.

The embedded servers trust local connections, so the test makes one role on
the silo server authenticate for real (``tests.harness.scram_role``). The secret comes from the
real ``AwsSecretsManagerStore`` over botocore's Stubber (canned Secrets Manager
responses, no AWS), with its TTL cache: so a rotated password is exactly the
case where the cached secret is stale and the server refuses it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest

from data_plane.api import create_app
from data_plane.dsn import libpq, with_database, with_user
from data_plane.secrets import AwsSecretsResolver
from data_plane.settings import DataPlaneSettings
from tests.data_plane.conftest import TenantFixture, World, add_silo_tenant
from tests.harness import SILO_TEMPLATE, PgServers, asgi_client, fresh_database, scram_role
from tests.provisioning.test_secrets import Aws, aws, store_for

__all__ = ["aws"]  # the stubbed Secrets Manager fixture, shared with the provisioning tests


@dataclass
class SecretSilo:
    tenant: TenantFixture
    role: str
    ref: str


def _set_password(admin: str, role: str, password: str) -> None:
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("ALTER ROLE {} PASSWORD {}").format(psycopg.sql.Identifier(role), password))


@pytest.fixture
def secret_silo(world: World, pg_servers: PgServers) -> Iterator[SecretSilo]:
    """Silo tenant "V" whose location is ``app_dsn`` without password + ``secret_ref``, as RDS silos are."""
    if pg_servers.embedded is None:
        pytest.skip("needs the embedded silo server, whose pg_hba.conf this test edits")
    admin = pg_servers.silo_admin
    role = f"tc_rot_{uuid.uuid4().hex[:8]}"
    with (
        scram_role(admin, role, "initial", member_of=pg_servers.roles.app),
        fresh_database(admin, pg_servers.roles, template=SILO_TEMPLATE, prefix="t_silo") as db,
    ):
        tenant = add_silo_tenant(world, "V", db, pg_servers)
        ref = f"arn:aws:secretsmanager:eu-west-1:000000000000:secret:tenantctl/silos/{tenant.slug}/app-Ab12Cd"
        with world.catalog() as cat:
            cat.execute(
                "UPDATE locations SET app_dsn = %s, secret_ref = %s WHERE tenant_id = %s",
                (with_user(with_database(admin, db), role), ref, tenant.id),
            )
        yield SecretSilo(tenant=tenant, role=role, ref=ref)


def _secret(role: str, password: str) -> str:
    return json.dumps({"username": role, "password": password, "engine": "postgres"})


async def test_silo_credentials_come_from_the_secret_and_a_rotation_is_followed(
    world: World, dp_settings: DataPlaneSettings, pg_servers: PgServers, secret_silo: SecretSilo, aws: Aws
) -> None:
    silo = secret_silo
    store = store_for(aws)
    resolver = AwsSecretsResolver(store)

    # The check can fail: without the secret's password the server refuses the role.
    with pytest.raises(psycopg.OperationalError, match="password"):
        psycopg.connect(libpq(with_user(pg_servers.silo_admin, silo.role))).close()

    aws.respond(silo.ref, _secret(silo.role, "initial"))
    async for client in asgi_client(create_app(dp_settings, resolver=resolver)):
        served = await client.get("/v1/projects", headers=silo.tenant.headers)
        assert served.status_code == 200, served.text
        assert [p["name"] for p in served.json()["data"]] == [f"{silo.tenant.canary}-project"]
        for canary in world.foreign_canaries("V"):
            assert canary not in served.text
    assert store.fetches == 1

    # Rotation: the server has the new password, the store's cache the old one.
    _set_password(pg_servers.silo_admin, silo.role, "rotated")
    aws.respond(silo.ref, _secret(silo.role, "rotated"))
    async for client in asgi_client(create_app(dp_settings, resolver=resolver)):
        healed = await client.get("/v1/projects", headers=silo.tenant.headers)
        assert healed.status_code == 200, healed.text
        assert [p["name"] for p in healed.json()["data"]] == [f"{silo.tenant.canary}-project"]
    assert store.fetches == 2  # refused once, re-read once
    aws.assert_all_consumed()


async def test_a_secret_the_server_refuses_is_a_503_that_names_nothing(
    world: World, dp_settings: DataPlaneSettings, pg_servers: PgServers, secret_silo: SecretSilo, aws: Aws
) -> None:
    silo = secret_silo
    _set_password(pg_servers.silo_admin, silo.role, "only-the-server-knows")
    aws.respond(silo.ref, _secret(silo.role, "stale"))
    aws.respond(silo.ref, _secret(silo.role, "still-stale"))
    async for client in asgi_client(create_app(dp_settings, resolver=AwsSecretsResolver(store_for(aws)))):
        refused = await client.get("/v1/projects", headers=silo.tenant.headers)
        assert refused.status_code == 503, refused.text
        assert "Retry-After" in refused.headers
        for secret_text in ("stale", silo.ref, silo.role, "arn:aws"):
            assert secret_text not in refused.text
        # Control: the pool tenant of the same app is served.
        pool = await client.get("/v1/projects", headers=world["A"].headers)
        assert pool.status_code == 200, pool.text
    aws.assert_all_consumed()
