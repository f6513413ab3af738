"""``bootstrap.ensure_roles_rds`` as an RDS master would run it (see ``conftest.rds_silo``).

The master is a real non-superuser CREATEROLE/CREATEDB role on the real silo
server; the tenant schema is migrated by it and the application role it
created is confined by RLS afterwards.
"""

from __future__ import annotations

import dataclasses
import uuid

import psycopg
import pytest
from alembic import command
from psycopg import sql

from control_plane import bootstrap, schema
from control_plane.bootstrap import RdsBootstrapError, ensure_roles_rds
from data_plane.dsn import libpq, with_user
from tests.provisioning.conftest import RdsSilo, role_state, scram_verifier_matches

PASSWORDS = {"app": "app-pw-1!x", "replication": "repl-pw-1!y"}
APP_FLAGS = {
    "super": False,
    "bypassrls": False,
    "replication": False,
    "inherit": False,
    "login": True,
    "createrole": False,
    "createdb": False,
}


def _without_password(state: dict[str, object] | None) -> dict[str, object]:
    assert state is not None
    return {k: v for k, v in state.items() if k != "password"}


def _assert_master_unchanged(rds_silo: RdsSilo, before: dict[str, object] | None) -> None:
    """The master's attributes and password are as they were.

    PostgreSQL 16 makes a CREATEROLE role that creates a role a member of it
    with ADMIN OPTION only (no INHERIT, no SET): the right to manage it, not to
    act as it. Those are the only memberships it may have gained.
    """
    roles = rds_silo.roles
    after = role_state(rds_silo.admin, roles.owner)
    assert before is not None and after is not None
    assert {k: v for k, v in after.items() if k != "member_of"} == {k: v for k, v in before.items() if k != "member_of"}
    gained = set(after["member_of"]) - set(before["member_of"])  # type: ignore[call-overload]
    assert gained <= {roles.app, roles.replication}
    with psycopg.connect(libpq(rds_silo.admin), autocommit=True) as conn:
        options = conn.execute(
            "SELECT g.rolname, m.admin_option, m.inherit_option, m.set_option FROM pg_auth_members m "
            "JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member "
            "WHERE r.rolname = %s AND g.rolname = ANY(%s) ORDER BY 1",
            (roles.owner, sorted(gained)),
        ).fetchall()
    assert options == [(name, True, False, False) for name in sorted(gained)]


def test_creates_the_app_and_replication_roles_without_touching_the_master(rds_silo: RdsSilo) -> None:
    roles = rds_silo.roles
    master_before = role_state(rds_silo.admin, roles.owner)
    state = ensure_roles_rds(rds_silo.master_dsn, roles, PASSWORDS)

    assert state == bootstrap.RdsRoleState(
        master=roles.owner, owner_bypasses_rls=False, replication_bypasses_rls=False, replication_is_rds_member=True
    )
    _assert_master_unchanged(rds_silo, master_before)
    app = role_state(rds_silo.admin, roles.app)
    assert app is not None and _without_password(app) == APP_FLAGS | {"member_of": []}
    replication = role_state(rds_silo.admin, roles.replication)
    assert replication is not None
    assert replication["login"] is True and replication["super"] is False and replication["inherit"] is True
    assert replication["member_of"] == ["rds_replication"]
    # the secrets' passwords, stored as SCRAM verifiers (no plaintext ever reached the server)
    for role, password in ((app, PASSWORDS["app"]), (replication, PASSWORDS["replication"])):
        verifier = str(role["password"])
        assert verifier.startswith("SCRAM-SHA-256$") and password not in verifier
        assert scram_verifier_matches(verifier, password)
        assert not scram_verifier_matches(verifier, password + "-wrong")  # the check can fail


def test_running_twice_converges_and_a_rotated_password_is_applied(rds_silo: RdsSilo) -> None:
    roles = rds_silo.roles
    first = ensure_roles_rds(rds_silo.master_dsn, roles, PASSWORDS)
    after_first = {r: role_state(rds_silo.admin, r) for r in (roles.owner, roles.app, roles.replication)}
    second = ensure_roles_rds(rds_silo.master_dsn, roles, PASSWORDS)
    after_second = {r: role_state(rds_silo.admin, r) for r in (roles.owner, roles.app, roles.replication)}
    assert first == second
    assert {r: _without_password(s) for r, s in after_first.items()} == {
        r: _without_password(s) for r, s in after_second.items()
    }
    assert after_first[roles.owner] == after_second[roles.owner]  # the second run changed nothing of the master
    app_state = after_second[roles.app]
    assert app_state is not None and scram_verifier_matches(str(app_state["password"]), PASSWORDS["app"])

    rotated = {"app": "app-pw-2!x", "replication": "repl-pw-2!y"}
    ensure_roles_rds(rds_silo.master_dsn, roles, rotated)
    app_state = role_state(rds_silo.admin, roles.app)
    assert app_state is not None
    assert scram_verifier_matches(str(app_state["password"]), rotated["app"])
    assert not scram_verifier_matches(str(app_state["password"]), PASSWORDS["app"])


def test_the_master_migrates_the_tenant_schema_and_the_app_role_cannot_bypass_rls(rds_silo: RdsSilo) -> None:
    roles = rds_silo.roles
    ensure_roles_rds(rds_silo.master_dsn, roles, PASSWORDS)
    bootstrap.grant_database_access(rds_silo.master_dsn, rds_silo.database, roles)
    config = schema.alembic_config(
        schema.Stream.TENANT, rds_silo.master_dsn, app_role=roles.app, replication_role=roles.replication
    )
    command.upgrade(config, "head")
    assert schema.current_revision(rds_silo.master_dsn) == schema.head(schema.Stream.TENANT)

    tenant, other = uuid.uuid4(), uuid.uuid4()
    with psycopg.connect(libpq(rds_silo.master_dsn)) as owner:
        owner.execute("SELECT tenantctl.claim_tenant(%s, 1)", (tenant,))
    app_dsn = rds_silo.as_role(roles.app)
    with psycopg.connect(libpq(app_dsn)) as app:
        flags = app.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user").fetchone()
        assert flags == (False, False)
        app.execute("SELECT tenantctl.begin_tenant(%s, 1)", (tenant,))
        created = app.execute(
            "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'rds') RETURNING id", (tenant, uuid.uuid4())
        ).fetchall()
        assert len(created) == 1  # allowed: the tenant's own row, through the tenant path
        app.commit()
        app.execute("SELECT tenantctl.begin_tenant(%s, 1)", (tenant,))
        assert app.execute("SELECT count(*) FROM projects").fetchone() == (1,)  # control: read back
        app.rollback()
        assert app.execute("SELECT count(*) FROM projects").fetchone() == (0,)  # no context: nothing
        app.rollback()
        app.execute("SELECT set_config('app.current_tenant_id', %s, true)", (str(other),))
        assert app.execute("SELECT count(*) FROM projects").fetchone() == (0,)  # another tenant: nothing
        app.rollback()
        # asking to see everything (row_security off) raises instead of bypassing
        app.execute("SELECT set_config('row_security', 'off', true)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            app.execute("SELECT count(*) FROM projects")
        app.rollback()
        # NOINHERIT and no membership: it cannot become the owner either
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(roles.owner)))


def test_database_access_is_closed_to_public(rds_silo: RdsSilo) -> None:
    roles = rds_silo.roles
    ensure_roles_rds(rds_silo.master_dsn, roles, PASSWORDS)
    bootstrap.grant_database_access(rds_silo.master_dsn, rds_silo.database, roles)
    bootstrap.grant_database_access(rds_silo.master_dsn, rds_silo.database, roles)  # idempotent
    stranger = f"rds_stranger_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(libpq(rds_silo.admin), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(stranger)))
    try:
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(libpq(rds_silo.as_role(stranger))).close()
        for role in (roles.app, roles.replication):  # control: the two roles may connect
            psycopg.connect(libpq(rds_silo.as_role(role))).close()
    finally:
        with psycopg.connect(libpq(rds_silo.admin), autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(stranger)))


def test_a_master_holding_bypassrls_passes_it_to_the_replication_role(rds_silo: RdsSilo) -> None:
    roles = rds_silo.roles
    with psycopg.connect(libpq(rds_silo.admin), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(roles.owner)))
    state = ensure_roles_rds(rds_silo.master_dsn, roles, PASSWORDS)
    assert state.owner_bypasses_rls and state.replication_bypasses_rls
    replication = role_state(rds_silo.admin, roles.replication)
    assert replication is not None and replication["bypassrls"] is True
    app = role_state(rds_silo.admin, roles.app)
    assert app is not None and app["bypassrls"] is False  # never the application role


def test_a_preexisting_app_role_that_escapes_rls_is_refused_and_nothing_changes(rds_silo: RdsSilo) -> None:
    roles = rds_silo.roles
    with psycopg.connect(libpq(rds_silo.admin), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} LOGIN BYPASSRLS").format(sql.Identifier(roles.app)))
    with pytest.raises(RdsBootstrapError, match="may not alter it"):
        ensure_roles_rds(rds_silo.master_dsn, roles, PASSWORDS)
    app = role_state(rds_silo.admin, roles.app)
    assert app is not None and app["bypassrls"] is True and app["password"] is None
    assert role_state(rds_silo.admin, roles.replication) is None  # one transaction: nothing half-done


def test_the_master_is_never_the_role_being_altered(rds_silo: RdsSilo) -> None:
    roles = rds_silo.roles
    master_before = role_state(rds_silo.admin, roles.owner)
    with pytest.raises(RdsBootstrapError, match="must not be the master user"):
        ensure_roles_rds(rds_silo.master_dsn, dataclasses.replace(roles, app=roles.owner), PASSWORDS)
    with pytest.raises(RdsBootstrapError, match="the owner role is"):
        ensure_roles_rds(rds_silo.master_dsn, dataclasses.replace(roles, owner="tenantctl_owner"), PASSWORDS)
    assert role_state(rds_silo.admin, roles.owner) == master_before  # refused before anything ran
    # connected as another role than the master (here the replication role once it exists)
    ensure_roles_rds(rds_silo.master_dsn, roles, PASSWORDS)
    with pytest.raises(RdsBootstrapError, match="the owner role is"):
        ensure_roles_rds(with_user(rds_silo.master_dsn, roles.replication), roles, PASSWORDS)


def test_both_passwords_are_required(rds_silo: RdsSilo) -> None:
    with pytest.raises(ValueError, match="replication"):
        ensure_roles_rds(rds_silo.master_dsn, rds_silo.roles, {"app": "x"})
    assert role_state(rds_silo.admin, rds_silo.roles.app) is None
