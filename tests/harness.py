"""Real PostgreSQL for tests, in the order DESIGN §5 prescribes.

1. ``TENANTCTL_TEST_DATABASE_URL`` (a superuser DSN; catalog, pool and silos
   then share that one server);
2. testcontainers, when a Docker engine answers (two containers);
3. the embedded pgserver clusters (two clusters, ``fsync=off``).

Per-test isolation comes from fresh databases cloned from migrated templates
(``CREATE DATABASE ... TEMPLATE``), which takes tens of milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg
from fastapi import FastAPI

from control_plane import bootstrap, schema
from control_plane.dev import EmbeddedStack
from control_plane.stack import Endpoints
from data_plane.dsn import libpq, with_database, with_user

CATALOG_TEMPLATE = "tenantctl_catalog_tpl"
POOL_TEMPLATE = "tenantctl_pool_tpl"
SILO_TEMPLATE = "tenantctl_silo_tpl"


@dataclass
class PgServers:
    """Superuser DSNs of the main server (catalog + pool) and the silo server."""

    main_admin: str
    silo_admin: str
    kind: str
    roles: bootstrap.Roles = field(default_factory=bootstrap.Roles)
    stop: Callable[[], None] = lambda: None
    embedded: EmbeddedStack | None = None


def _docker_servers() -> PgServers | None:
    try:
        from testcontainers.core.docker_client import DockerClient
        from testcontainers.postgres import PostgresContainer

        DockerClient().client.ping()
    except Exception:
        return None
    containers = [
        PostgresContainer("postgres:16", driver=None).with_command("postgres -c wal_level=logical") for _ in range(2)
    ]
    for container in containers:
        container.start()
    main, silo = (c.get_connection_url() for c in containers)
    return PgServers(
        main_admin=main,
        silo_admin=silo,
        kind="testcontainers",
        stop=lambda: [c.stop() for c in containers] and None,
    )


def start_servers(base_dir: Path) -> PgServers:
    url = os.environ.get("TENANTCTL_TEST_DATABASE_URL")
    if url:
        return PgServers(main_admin=url, silo_admin=url, kind="external")
    docker = _docker_servers()
    if docker is not None:
        return docker
    stack = EmbeddedStack(base_dir, fast=True)
    stack.start()
    return PgServers(
        main_admin=stack.main.dsn(),
        silo_admin=stack.silos.dsn(),
        kind="embedded",
        stop=stack.stop,
        embedded=stack,
    )


def prepare_templates(servers: PgServers) -> None:
    """Roles on both servers; migrated catalog, pool and silo templates."""
    roles = servers.roles
    for admin in {servers.main_admin, servers.silo_admin}:
        bootstrap.ensure_roles(admin, roles)
    for admin, name in (
        (servers.main_admin, CATALOG_TEMPLATE),
        (servers.main_admin, POOL_TEMPLATE),
        (servers.silo_admin, SILO_TEMPLATE),
    ):
        bootstrap.drop_database(admin, name)
        bootstrap.ensure_database(admin, name, roles)
    schema.upgrade(schema.Stream.CATALOG, owner_dsn(servers.main_admin, CATALOG_TEMPLATE, roles))
    schema.upgrade(schema.Stream.TENANT, owner_dsn(servers.main_admin, POOL_TEMPLATE, roles))
    schema.upgrade(schema.Stream.TENANT, owner_dsn(servers.silo_admin, SILO_TEMPLATE, roles))


def owner_dsn(admin: str, database: str, roles: bootstrap.Roles) -> str:
    return with_user(with_database(admin, database), roles.owner)


def app_dsn(admin: str, database: str, roles: bootstrap.Roles) -> str:
    return with_user(with_database(admin, database), roles.app)


def unique_name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


@contextlib.contextmanager
def fresh_database(admin: str, roles: bootstrap.Roles, *, template: str | None, prefix: str) -> Iterator[str]:
    """A new database (cloned from ``template``), dropped afterwards; yields its name."""
    name = unique_name(prefix)
    bootstrap.ensure_database(admin, name, roles, template=template)
    try:
        yield name
    finally:
        bootstrap.drop_database(admin, name)


@contextlib.contextmanager
def fresh_endpoints(servers: PgServers) -> Iterator[Endpoints]:
    roles = servers.roles
    with (
        fresh_database(servers.main_admin, roles, template=CATALOG_TEMPLATE, prefix="t_catalog") as catalog,
        fresh_database(servers.main_admin, roles, template=POOL_TEMPLATE, prefix="t_pool") as pool,
    ):
        yield Endpoints(
            catalog_url=owner_dsn(servers.main_admin, catalog, roles),
            pool_url=owner_dsn(servers.main_admin, pool, roles),
            silo_server_url=servers.silo_admin,
            app_catalog_url=app_dsn(servers.main_admin, catalog, roles),
            app_pool_url=app_dsn(servers.main_admin, pool, roles),
            app_silo_server_url=with_user(servers.silo_admin, roles.app),
            pool_admin_url=with_database(servers.main_admin, pool),
        )


async def asgi_client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client bound to ``app`` with its lifespan running."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client


@contextlib.contextmanager
def scram_role(admin: str, role: str, password: str, *, member_of: str | None = None) -> Iterator[None]:
    """A LOGIN role that must authenticate with its password, on a server that trusts everyone else.

    The embedded servers trust local connections; a ``scram-sha-256`` line for
    this one role goes to the top of ``pg_hba.conf`` (removed afterwards), so
    a wrong or missing password is refused for real.
    """
    from psycopg import sql

    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        statement = sql.SQL("CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS PASSWORD {}").format(
            sql.Identifier(role), sql.Literal(password)
        )
        if member_of is not None:
            statement = sql.SQL("{} IN ROLE {}").format(statement, sql.Identifier(member_of))
        conn.execute(statement)
        row = conn.execute("SHOW hba_file").fetchone()
        assert row is not None
        hba = Path(str(row[0]))
        original = hba.read_text()
        hba.write_text(f"local all {role} scram-sha-256\n{original}")
        conn.execute("SELECT pg_reload_conf()")
    try:
        yield
    finally:
        with psycopg.connect(libpq(admin), autocommit=True) as conn:
            hba.write_text(original)
            conn.execute("SELECT pg_reload_conf()")
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
