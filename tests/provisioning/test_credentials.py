"""``control_plane.provisioning.credentials``: the control plane's DSNs of a silo.

The last test shows, on the simulated RDS server, why a replication role
without BYPASSRLS gets ``row_security=off``: without it, reading a FORCE-RLS
table returns zero rows *silently*; with it, the read fails.
"""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from control_plane import bootstrap
from control_plane.exceptions import ProvisioningError
from control_plane.provisioning.base import SiloLocation
from control_plane.provisioning.credentials import owner_dsn, replication_conninfo
from data_plane.dsn import libpq
from data_plane.secrets import SecretMismatchError, SecretNotFoundError, StaticSecretStore
from tests.provisioning.conftest import RdsSilo

MASTER = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tenantctl/silos/silo-acme/master-A"
REPLICATION = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tenantctl/silos/silo-acme/replication-B"
OWNER_DSN = "postgresql://tenantctl_owner@silo-acme.example:5432/silo_acme?sslmode=require"


def secret(username: str, password: str) -> str:
    return json.dumps({"username": username, "password": password})


STORE = StaticSecretStore(
    {MASTER: secret("tenantctl_owner", "m-pw"), REPLICATION: secret("tenantctl_replicator", "r-pw")}
)


def rds_location(**detail: object) -> SiloLocation:
    return SiloLocation(
        name="silo-acme",
        provider="pulumi-aws",
        tenant_id=uuid.uuid4(),
        database="silo_acme",
        dsn=OWNER_DSN,
        app_dsn=OWNER_DSN.replace("tenantctl_owner", "tenantctl_app"),
        secret_ref="arn:aws:secretsmanager:eu-west-1:123456789012:secret:tenantctl/silos/silo-acme/app-C",
        detail={"master_secret_arn": MASTER, "replication_secret_arn": REPLICATION, **detail},
    )


def test_owner_dsn_of_an_rds_silo_carries_the_master_password() -> None:
    parts = psycopg.conninfo.conninfo_to_dict(owner_dsn(rds_location(), store=STORE))
    assert (parts["user"], parts["password"], parts["host"], parts["sslmode"]) == (
        "tenantctl_owner",
        "m-pw",
        "silo-acme.example",
        "require",
    )


def test_catalog_rows_work_as_well_as_locations() -> None:
    row = {"name": "silo-acme", "dsn": OWNER_DSN, "detail": {"master_secret_arn": MASTER}}
    assert psycopg.conninfo.conninfo_to_dict(owner_dsn(row, store=STORE))["password"] == "m-pw"


def test_local_silos_are_returned_unchanged_and_need_no_store() -> None:
    local = SiloLocation(
        name="silo-x", provider="local", tenant_id=uuid.uuid4(), dsn="postgresql://tenantctl_owner@/silo_x?host=/tmp"
    )
    assert owner_dsn(local, store=StaticSecretStore({})) == local.dsn
    conninfo = replication_conninfo(local, role="tenantctl_replicator", store=StaticSecretStore({}))
    assert psycopg.conninfo.conninfo_to_dict(conninfo) == {
        "user": "tenantctl_replicator",
        "dbname": "silo_x",
        "host": "/tmp",
    }
    with pytest.raises(ProvisioningError, match="no owner DSN"):
        owner_dsn(SiloLocation(name="silo-y", provider="local", tenant_id=uuid.uuid4()))


def test_a_wrong_or_missing_master_secret_is_refused() -> None:
    swapped = rds_location(master_secret_arn=REPLICATION)
    with pytest.raises(SecretMismatchError):
        owner_dsn(swapped, store=STORE)
    with pytest.raises(SecretNotFoundError):
        owner_dsn(rds_location(master_secret_arn="arn:aws:secretsmanager:eu-west-1:1:secret:gone"), store=STORE)


def test_replication_conninfo_turns_row_security_off_only_when_the_role_cannot_bypass_rls() -> None:
    bypassing = replication_conninfo(
        rds_location(rls_bypass={"owner": True, "replication": True}), role="tenantctl_replicator", store=STORE
    )
    parts = psycopg.conninfo.conninfo_to_dict(bypassing)
    assert (parts["user"], parts["password"]) == ("tenantctl_replicator", "r-pw") and "options" not in parts
    filtered = replication_conninfo(
        rds_location(rls_bypass={"owner": False, "replication": False}), role="tenantctl_replicator", store=STORE
    )
    assert psycopg.conninfo.conninfo_to_dict(filtered)["options"] == "-crow_security=off"


def test_without_bypassrls_row_security_off_turns_a_silent_empty_copy_into_an_error(rds_silo: RdsSilo) -> None:
    roles = rds_silo.roles
    state = bootstrap.ensure_roles_rds(rds_silo.master_dsn, roles, {"app": "a", "replication": "r"})
    assert state.replication_bypasses_rls is False
    bootstrap.grant_database_access(rds_silo.master_dsn, rds_silo.database, roles)
    tenant = uuid.uuid4()
    with psycopg.connect(libpq(rds_silo.master_dsn)) as master:
        master.execute("CREATE TABLE items (tenant_id uuid NOT NULL, v text)")
        master.execute("ALTER TABLE items ENABLE ROW LEVEL SECURITY")
        master.execute("ALTER TABLE items FORCE ROW LEVEL SECURITY")
        master.execute(
            "CREATE POLICY t ON items USING "
            "(tenant_id = (SELECT nullif(current_setting('app.current_tenant_id', true), ''))::uuid)"
        )
        master.execute(f'GRANT SELECT ON items TO "{roles.replication}"')
        master.execute("SELECT set_config('app.current_tenant_id', %s, true)", (str(tenant),))
        master.execute("INSERT INTO items VALUES (%s, 'a'), (%s, 'b')", (tenant, tenant))
    location = {
        "name": "silo-acme",
        "dsn": rds_silo.as_role(roles.owner),
        "detail": {"rls_bypass": {"owner": False, "replication": False}},
    }
    plain = replication_conninfo({**location, "detail": {}}, role=roles.replication)
    guarded = replication_conninfo(location, role=roles.replication)
    with psycopg.connect(libpq(plain)) as conn:
        # the danger: rows exist, the copy's query sees none, and nothing says so
        assert conn.execute("SELECT count(*) FROM items").fetchone() == (0,)
    with (
        psycopg.connect(libpq(guarded)) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"),
    ):
        conn.execute("SELECT count(*) FROM items")
