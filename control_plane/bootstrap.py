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

from dataclasses import dataclass

import psycopg
from psycopg import sql

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
                    sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                        sql.Identifier(name), sql.Literal(passwords[kind])
                    )
                )


def ensure_database(admin_dsn: str, database: str, roles: Roles, *, template: str | None = None) -> bool:
    """Create ``database`` owned by the owner role; return True if it was created."""
    with psycopg.connect(libpq(admin_dsn), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,)).fetchone()
        if not exists:
            stmt = sql.SQL("CREATE DATABASE {} OWNER {}").format(
                sql.Identifier(database), sql.Identifier(roles.owner)
            )
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
