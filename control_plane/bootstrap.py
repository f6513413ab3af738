"""Create the project's roles and databases on a PostgreSQL server.

Roles are created by the project, never assumed (PITFALLS: the application
role must own nothing and must not bypass RLS):

* owner/migrator -- owns every table and function; BYPASSRLS so that copies and
  verification made as this role can never be silently filtered;
* application    -- LOGIN, NOSUPERUSER, NOBYPASSRLS, owns nothing;
* replication    -- REPLICATION + BYPASSRLS, used by logical-replication moves
  so that a row filter is the *only* filter applied to the copy.

Every statement is idempotent: bootstrapping twice converges.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from control_plane.exceptions import ProvisioningError
from data_plane.dsn import libpq, with_database


@dataclass(frozen=True)
class Roles:
    owner: str = "tenantctl_owner"
    app: str = "tenantctl_app"
    replication: str = "tenantctl_replicator"


ROLE_ATTRIBUTES = {
    "owner": "LOGIN NOSUPERUSER BYPASSRLS NOCREATEROLE NOREPLICATION",
    "app": "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION NOINHERIT",
    "replication": "LOGIN NOSUPERUSER BYPASSRLS NOCREATEDB NOCREATEROLE REPLICATION",
}


def ensure_roles(admin_dsn: str, roles: Roles, passwords: dict[str, str] | None = None) -> None:
    """Create or correct the three roles (attributes are re-asserted every time)."""
    passwords = passwords or {}
    with psycopg.connect(libpq(admin_dsn), autocommit=True) as conn:
        for kind, name in (("owner", roles.owner), ("app", roles.app), ("replication", roles.replication)):
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            stmt = sql.SQL("{} ROLE {} " + ROLE_ATTRIBUTES[kind]).format(sql.SQL(verb), sql.Identifier(name))
            conn.execute(stmt)
            if kind in passwords:
                conn.execute(
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(name), sql.Literal(passwords[kind]))
                )


def ensure_database(admin_dsn: str, database: str, roles: Roles, *, template: str | None = None) -> bool:
    """Create ``database`` owned by the owner role; return True if it was created."""
    with psycopg.connect(libpq(admin_dsn), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            stmt = sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(database), sql.Identifier(roles.owner))
            if template is not None:
                stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
            conn.execute(stmt)
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(
                sql.Identifier(database), sql.Identifier(roles.app), sql.Identifier(roles.replication)
            )
        )
    with psycopg.connect(with_database(admin_dsn, database), autocommit=True) as conn:
        conn.execute(sql.SQL("ALTER SCHEMA public OWNER TO {}").format(sql.Identifier(roles.owner)))
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA public TO {}, {}").format(
                sql.Identifier(roles.app), sql.Identifier(roles.replication)
            )
        )
    return not exists


def drop_database(admin_dsn: str, database: str) -> None:
    with psycopg.connect(libpq(admin_dsn), autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(database)))


# -- Amazon RDS ---------------------------------------------------------------------------

RDS_REPLICATION_ROLE = "rds_replication"
# Same key as the local provisioner's role lock: two workers bootstrapping one
# server must not run ALTER ROLE on the same role at once.
_ROLES_LOCK = (7303, 0)


class RdsBootstrapError(ProvisioningError):
    """The RDS master cannot bring a role to the required state (see the message)."""


@dataclass(frozen=True)
class RdsRoleState:
    """What :func:`ensure_roles_rds` found and left.

    ``*_bypasses_rls`` decide whether moves can run on this server as they do
    locally (see :func:`ensure_roles_rds`).
    """

    master: str
    owner_bypasses_rls: bool
    replication_bypasses_rls: bool
    replication_is_rds_member: bool


_ROLE_FLAGS = (
    "SELECT rolsuper, rolbypassrls, rolreplication, rolinherit, rolcanlogin, rolcreaterole, rolcreatedb "
    "FROM pg_roles WHERE rolname = %s"
)
# rolsuper, rolbypassrls, rolreplication, rolinherit, rolcanlogin, rolcreaterole, rolcreatedb
_APP_FLAGS = (False, False, False, False, True, False, False)


def ensure_roles_rds(
    master_dsn: str,
    roles: Roles,
    passwords: Mapping[str, str],
    *,
    connect_timeout: int = 10,
) -> RdsRoleState:
    """Create or correct the application and replication roles on an RDS instance.

    Runs as the RDS *master* user, which is the owner role (``roles.owner``:
    the instance's ``master_username``) and is **never altered** here.
    ``passwords`` holds ``app`` and ``replication`` (from their Secrets
    Manager secrets). Everything runs in one transaction under an advisory
    lock, so a crash leaves either the old state or the new one, and running
    it twice converges on the same roles (the stored password verifiers differ
    only by their salt). Passwords are hashed to SCRAM verifiers by libpq on
    this side, so no statement log ever shows a plaintext password.

    * application role: ``LOGIN NOINHERIT NOCREATEDB NOCREATEROLE`` with its
      password, and verified afterwards to be ``NOSUPERUSER NOBYPASSRLS
      NOREPLICATION`` and a member of no role -- if it is not (a role made by
      someone else), :class:`RdsBootstrapError`: the data plane must never
      connect as a role that escapes RLS;
    * replication role: ``LOGIN NOCREATEDB NOCREATEROLE`` with its password,
      ``GRANT rds_replication`` (INHERIT kept, so the membership's rights apply),
      and ``BYPASSRLS`` when -- and only when -- the master holds it itself.

    What the RDS master may do (AWS, "Understanding the rds_superuser role"):
    it is ``NOSUPERUSER CREATEDB CREATEROLE NOREPLICATION`` and a member of
    ``rds_superuser``, which lets it create roles and databases and grant
    ``rds_replication`` (and ``rds_password``) to roles that are not
    ``rds_superuser``. ``REPLICATION`` is not available (``rds_replication``
    stands in for it), and AWS documents no way for it to confer
    ``BYPASSRLS``: in community PostgreSQL a role needs ``BYPASSRLS`` itself
    to grant it (15 and older: superuser only), and third-party reports
    disagree on whether RDS masters hold it. So this function does not assume
    it; it grants what it can and reports the outcome in :class:`RdsRoleState`.

    Consequence for moves. Tenant tables use ``FORCE ROW LEVEL SECURITY``, so
    a role without ``BYPASSRLS`` -- the owner included -- is filtered like the
    application. When ``owner_bypasses_rls`` is false, the engine's copies,
    checksums and target cleanup (run as the owner with ``row_security =
    off``) fail with "query would be affected by row-level security policy"
    instead of moving or deleting rows: safe (I2/I3 hold) but no move can
    complete on that server. When ``replication_bypasses_rls`` is false, a
    subscription reading *from* this server (demotion from a silo) would have
    its initial copy filtered to zero rows **silently**; callers must refuse an
    online move out of such a server, or give the subscription's connection
    ``options=-crow_security=off`` so the copy errors instead of losing rows.
    """
    missing = [kind for kind in ("app", "replication") if not passwords.get(kind)]
    if missing:
        # RDS authenticates by password: a role without one can never log in.
        raise ValueError(f"ensure_roles_rds needs passwords for {', '.join(missing)}")
    with psycopg.connect(libpq(master_dsn), connect_timeout=connect_timeout) as conn:
        master = _current_user(conn)
        _refuse_to_touch_master(master, roles)
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", _ROLES_LOCK)
        master_flags = conn.execute(_ROLE_FLAGS, (master,)).fetchone()
        assert master_flags is not None
        master_bypasses = bool(master_flags[1])
        _ensure_login_role(conn, roles.app, "NOINHERIT NOCREATEDB NOCREATEROLE", passwords["app"])
        _ensure_login_role(conn, roles.replication, "INHERIT NOCREATEDB NOCREATEROLE", passwords["replication"])
        replication_member = _grant_rds_replication(conn, roles.replication)
        if master_bypasses:
            conn.execute(sql.SQL("ALTER ROLE {} BYPASSRLS").format(sql.Identifier(roles.replication)))
        _check_app_role(conn, roles.app)
        replication_flags = conn.execute(_ROLE_FLAGS, (roles.replication,)).fetchone()
        assert replication_flags is not None
        if replication_flags[0]:
            raise RdsBootstrapError(f"role {roles.replication!r} is a superuser; refusing to use it for replication")
    return RdsRoleState(
        master=master,
        owner_bypasses_rls=master_bypasses,
        replication_bypasses_rls=bool(replication_flags[1]),
        replication_is_rds_member=replication_member,
    )


def grant_database_access(owner_dsn: str, database: str, roles: Roles, *, connect_timeout: int = 10) -> None:
    """The database-level grants of :func:`ensure_database`, for a database that already exists.

    RDS creates the silo's database itself, owned by the master (the owner
    role); this closes it to ``PUBLIC`` and opens it to the application and
    replication roles only, as the local provisioner does. Idempotent.
    """
    with psycopg.connect(libpq(owner_dsn), autocommit=True, connect_timeout=connect_timeout) as conn:
        conn.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(sql.Identifier(database)))
        conn.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}, {}").format(
                sql.Identifier(database), sql.Identifier(roles.app), sql.Identifier(roles.replication)
            )
        )
    with psycopg.connect(with_database(owner_dsn, database), autocommit=True, connect_timeout=connect_timeout) as conn:
        conn.execute("REVOKE ALL ON SCHEMA public FROM PUBLIC")
        conn.execute(
            sql.SQL("GRANT USAGE ON SCHEMA public TO {}, {}").format(
                sql.Identifier(roles.app), sql.Identifier(roles.replication)
            )
        )


def _current_user(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT current_user").fetchone()
    assert row is not None
    return str(row[0])


def _refuse_to_touch_master(master: str, roles: Roles) -> None:
    if master != roles.owner:
        raise RdsBootstrapError(
            f"connected as {master!r}, but the owner role is {roles.owner!r}: the RDS master user must be "
            "the owner role (the silo's master_username)"
        )
    if master in (roles.app, roles.replication):
        raise RdsBootstrapError(f"the application and replication roles must not be the master user {master!r}")


def _ensure_login_role(conn: psycopg.Connection[Any], name: str, attributes: str, password: str) -> None:
    # Only attributes a CREATEROLE non-superuser may set: naming SUPERUSER,
    # REPLICATION or BYPASSRLS at all (even NO...) is refused to it on ALTER.
    verifier = conn.pgconn.encrypt_password(password.encode(), name.encode(), b"scram-sha-256").decode()
    exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)).fetchone()
    verb = "ALTER" if exists else "CREATE"
    statement = sql.SQL("{} ROLE {} LOGIN " + attributes + " PASSWORD {}").format(
        sql.SQL(verb), sql.Identifier(name), sql.Literal(verifier)
    )
    try:
        conn.execute(statement)
    except psycopg.errors.InsufficientPrivilege as exc:
        # PostgreSQL 16+: a CREATEROLE role may only alter roles it holds ADMIN
        # on, i.e. roles it created itself.
        raise RdsBootstrapError(
            f"role {name!r} exists and the RDS master may not alter it ({exc.diag.message_primary}); "
            "it was not created by this master: drop it or fix it as a privileged user"
        ) from exc


def _grant_rds_replication(conn: psycopg.Connection[Any], role: str) -> bool:
    """Grant ``rds_replication`` (when the server has it); True if the role is a member afterwards."""
    if conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (RDS_REPLICATION_ROLE,)).fetchone() is None:
        return False
    if not _is_member(conn, role, RDS_REPLICATION_ROLE):
        conn.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(RDS_REPLICATION_ROLE), sql.Identifier(role)))
    return True


def _is_member(conn: psycopg.Connection[Any], member: str, group: str) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid JOIN pg_roles r ON r.oid = m.member "
        "WHERE g.rolname = %s AND r.rolname = %s",
        (group, member),
    ).fetchone()
    return row is not None


def _check_app_role(conn: psycopg.Connection[Any], app: str) -> None:
    flags = conn.execute(_ROLE_FLAGS, (app,)).fetchone()
    if flags is None or tuple(bool(f) for f in flags) != _APP_FLAGS:
        raise RdsBootstrapError(
            f"application role {app!r} has attributes the RDS master cannot remove "
            f"(superuser, bypassrls, replication, inherit, login, createrole, createdb = {flags}); "
            "drop or fix it as a privileged user: the data plane must never connect as a role that escapes RLS"
        )
    groups = conn.execute(
        "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
        "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s ORDER BY 1",
        (app,),
    ).fetchall()
    if groups:
        raise RdsBootstrapError(
            f"application role {app!r} is a member of {', '.join(str(g[0]) for g in groups)}; "
            "it must belong to no role (SET ROLE would escape its grants)"
        )
