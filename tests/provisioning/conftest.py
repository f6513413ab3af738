"""A simulated Amazon RDS server on the real silo PostgreSQL of the test harness.

RDS gives its master user ``NOSUPERUSER CREATEDB CREATEROLE NOREPLICATION``,
membership in ``rds_superuser`` and the right to grant ``rds_replication``; it
creates the instance's database owned by the master. The fixture reproduces
exactly that with a fresh, uniquely named master role (roles are server-wide),
a pre-created ``rds_replication`` role the master may grant, and a database the
master created itself. Everything is dropped afterwards.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg import sql

from control_plane import bootstrap
from data_plane.dsn import libpq, with_database, with_user
from tests.harness import PgServers


@dataclass(frozen=True)
class RdsSilo:
    admin: str  # superuser DSN of the server: the test's view "behind" RDS, never given to the code
    master_dsn: str  # the master user on the silo's database (what the master secret unlocks)
    database: str
    roles: bootstrap.Roles

    def as_role(self, role: str) -> str:
        return with_user(with_database(self.admin, self.database), role)


def _admin_exec(admin: str, *statements: sql.Composable) -> None:
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


@pytest.fixture
def rds_silo(pg_servers: PgServers) -> Iterator[RdsSilo]:
    admin = pg_servers.silo_admin
    suffix = uuid.uuid4().hex[:10]
    roles = bootstrap.Roles(owner=f"rds_master_{suffix}", app=f"rds_app_{suffix}", replication=f"rds_repl_{suffix}")
    database = f"silo_rds_{suffix}"
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        created_rds_replication = (
            conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (bootstrap.RDS_REPLICATION_ROLE,)).fetchone()
            is None
        )
        if created_rds_replication:
            conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(bootstrap.RDS_REPLICATION_ROLE)))
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER CREATEDB CREATEROLE NOREPLICATION NOBYPASSRLS INHERIT").format(
                sql.Identifier(roles.owner)
            )
        )
        conn.execute(
            sql.SQL("GRANT {} TO {} WITH ADMIN OPTION").format(
                sql.Identifier(bootstrap.RDS_REPLICATION_ROLE), sql.Identifier(roles.owner)
            )
        )
    master_server = with_user(admin, roles.owner)
    # RDS creates `db_name` as the master, so the master owns it.
    _admin_exec(master_server, sql.SQL("CREATE DATABASE {}").format(sql.Identifier(database)))
    try:
        yield RdsSilo(
            admin=admin,
            master_dsn=with_database(master_server, database),
            database=database,
            roles=roles,
        )
    finally:
        bootstrap.drop_database(admin, database)
        _admin_exec(
            admin,
            *(
                sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name))
                for name in (roles.app, roles.replication, roles.owner)
            ),
        )
        if created_rds_replication:
            _admin_exec(admin, sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(bootstrap.RDS_REPLICATION_ROLE)))


def scram_verifier_matches(verifier: str, password: str) -> bool:
    """Whether a stored ``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey`` verifier is ``password``'s (RFC 5802)."""
    method, rest = verifier.split("$", 1)
    if method != "SCRAM-SHA-256":
        return False
    iterations_salt, keys = rest.split("$")
    iterations, salt = iterations_salt.split(":")
    stored_key = keys.split(":")[0]
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(salt), int(iterations))
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return base64.b64encode(hashlib.sha256(client_key).digest()).decode() == stored_key


def role_state(admin: str, role: str) -> dict[str, object] | None:
    """Attributes, memberships and password verifier of ``role``, read as the superuser."""
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        row = conn.execute(
            "SELECT rolsuper, rolbypassrls, rolreplication, rolinherit, rolcanlogin, rolcreaterole, rolcreatedb, "
            "rolpassword FROM pg_authid WHERE rolname = %s",
            (role,),
        ).fetchone()
        if row is None:
            return None
        groups = conn.execute(
            "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid "
            "JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %s ORDER BY 1",
            (role,),
        ).fetchall()
    names = ("super", "bypassrls", "replication", "inherit", "login", "createrole", "createdb", "password")
    return dict(zip(names, row, strict=True)) | {"member_of": [g[0] for g in groups]}
