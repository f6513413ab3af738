"""Role posture and the fail-closed RLS rule, proven on real PostgreSQL.

Every "denied" has an "allowed" control next to it, so a test cannot pass
because nothing works at all.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import asyncpg
import psycopg
import pytest

from control_plane.stack import Endpoints
from data_plane.dsn import libpq
from data_plane.session import fused

A, B = uuid.uuid4(), uuid.uuid4()


@pytest.fixture
def seeded(endpoints: Endpoints) -> Endpoints:
    """Two pool tenants with one project each, written as the owner (bypasses RLS)."""
    with psycopg.connect(libpq(endpoints.pool_url)) as conn:
        for tenant, name in ((A, "canary-A-project"), (B, "canary-B-project")):
            conn.execute("SELECT tenantctl.claim_tenant(%s, 1)", (tenant,))
            conn.execute("INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, %s)", (tenant, uuid.uuid4(), name))
    return endpoints


@pytest.fixture
def app_conn(seeded: Endpoints) -> Iterator[psycopg.Connection]:
    with psycopg.connect(libpq(seeded.app_pool_url)) as conn:
        yield conn


def test_app_role_is_not_privileged(app_conn: psycopg.Connection) -> None:
    row = app_conn.execute(
        "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb, rolreplication "
        "FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    assert row == (False, False, False, False, False)


def test_app_role_owns_nothing(seeded: Endpoints) -> None:
    for dsn in (seeded.pool_url, seeded.catalog_url):
        with psycopg.connect(libpq(dsn)) as conn:
            owned = conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner "
                "WHERE r.rolname = 'tenantctl_app' "
                "UNION ALL SELECT p.proname FROM pg_proc p JOIN pg_roles r ON r.oid = p.proowner "
                "WHERE r.rolname = 'tenantctl_app' "
                "UNION ALL SELECT n.nspname FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner "
                "WHERE r.rolname = 'tenantctl_app'"
            ).fetchall()
            assert owned == []
            # control: the owner role does own the tables
            owner_tables = conn.execute(
                "SELECT count(*) FROM pg_tables WHERE tableowner = 'tenantctl_owner'"
            ).fetchone()
            assert owner_tables is not None and owner_tables[0] >= 3


def test_app_role_cannot_truncate_or_disable_rls(app_conn: psycopg.Connection) -> None:
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app_conn.execute("TRUNCATE projects")
    app_conn.rollback()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app_conn.execute("ALTER TABLE projects DISABLE ROW LEVEL SECURITY")
    app_conn.rollback()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        app_conn.execute("SET row_security = off; SELECT * FROM projects")
    app_conn.rollback()
    # control: the same role can read through the tenant path
    app_conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
    assert app_conn.execute("SELECT count(*) FROM projects").fetchone() == (1,)


def test_rls_forced_and_enabled_on_tenant_tables(seeded: Endpoints) -> None:
    with psycopg.connect(libpq(seeded.pool_url)) as conn:
        rows = conn.execute(
            "SELECT relname, relrowsecurity, relforcerowsecurity FROM pg_class "
            "WHERE relname IN ('projects', 'tasks') ORDER BY relname"
        ).fetchall()
    assert rows == [("projects", True, True), ("tasks", True, True)]


def test_no_context_gives_zero_rows(app_conn: psycopg.Connection) -> None:
    assert app_conn.execute("SELECT count(*) FROM projects").fetchone() == (0,)
    app_conn.rollback()
    # A setting used once reads back as '' afterwards: still zero rows.
    app_conn.execute("SELECT set_config('app.current_tenant_id', '', true)")
    assert app_conn.execute("SELECT count(*) FROM projects").fetchone() == (0,)
    app_conn.rollback()
    assert app_conn.execute("SELECT count(*) FROM projects").fetchone() == (0,)


def test_context_a_sees_only_a(app_conn: psycopg.Connection) -> None:
    app_conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
    names = [r[0] for r in app_conn.execute("SELECT name FROM projects").fetchall()]
    assert names == ["canary-A-project"]
    app_conn.rollback()
    app_conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (B,))
    names = [r[0] for r in app_conn.execute("SELECT name FROM projects").fetchall()]
    assert names == ["canary-B-project"]


def test_context_is_transaction_local(app_conn: psycopg.Connection) -> None:
    app_conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
    assert app_conn.execute("SELECT count(*) FROM projects").fetchone() == (1,)
    app_conn.commit()
    assert app_conn.execute("SELECT count(*) FROM projects").fetchone() == (0,)


def test_writes_for_another_tenant_are_refused(app_conn: psycopg.Connection) -> None:
    app_conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
    with pytest.raises(psycopg.errors.InsufficientPrivilege):  # WITH CHECK raises
        app_conn.execute("INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'x')", (B, uuid.uuid4()))
    app_conn.rollback()
    app_conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
    # USING filters silently: RETURNING proves B's row was not touched...
    changed = app_conn.execute("UPDATE projects SET name = 'pwned' WHERE tenant_id = %s RETURNING id", (B,)).fetchall()
    assert changed == []
    # ...while A's own row is (control).
    changed = app_conn.execute(
        "UPDATE projects SET name = 'renamed' WHERE tenant_id = %s RETURNING name", (A,)
    ).fetchall()
    assert changed == [("renamed",)]


def test_task_cannot_reference_another_tenants_project(seeded: Endpoints) -> None:
    with psycopg.connect(libpq(seeded.pool_url)) as conn:
        b_project = conn.execute("SELECT id FROM projects WHERE tenant_id = %s", (B,)).fetchone()
        a_project = conn.execute("SELECT id FROM projects WHERE tenant_id = %s", (A,)).fetchone()
    assert b_project and a_project
    with psycopg.connect(libpq(seeded.app_pool_url)) as conn:
        conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute(
                "INSERT INTO tasks (tenant_id, id, project_id, title) VALUES (%s, %s, %s, 't')",
                (A, uuid.uuid4(), b_project[0]),
            )
        conn.rollback()
        conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
        conn.execute(
            "INSERT INTO tasks (tenant_id, id, project_id, title) VALUES (%s, %s, %s, 't')",
            (A, uuid.uuid4(), a_project[0]),
        )


@pytest.mark.parametrize(
    ("setup", "epoch", "sqlstate"),
    [
        ("unknown", 1, "TC001"),
        ("moved", 1, "TC001"),
        ("fenced", 1, "TC002"),
        ("active", 7, "TC003"),
    ],
)
def test_begin_tenant_refuses_when_this_database_does_not_serve_the_tenant(
    seeded: Endpoints, setup: str, epoch: int, sqlstate: str
) -> None:
    tenant = uuid.uuid4()
    if setup != "unknown":
        with psycopg.connect(libpq(seeded.pool_url)) as conn:
            conn.execute("SELECT tenantctl.claim_tenant(%s, 1, %s)", (tenant, setup))
    with psycopg.connect(libpq(seeded.app_pool_url)) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("SELECT tenantctl.begin_tenant(%s, %s)", (tenant, epoch))
        assert info.value.sqlstate == sqlstate
        conn.rollback()
        conn.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))  # control


def test_fence_waits_for_in_flight_transaction_and_blocks_late_commits(seeded: Endpoints) -> None:
    """I4: a transaction open across the fence commits before it, never after."""
    with (
        psycopg.connect(libpq(seeded.app_pool_url)) as writer,
        psycopg.connect(libpq(seeded.pool_url)) as fencer,
    ):
        writer.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
        writer.execute("INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'in-flight')", (A, uuid.uuid4()))
        fencer.execute("SET lock_timeout = '200ms'")
        with pytest.raises(psycopg.errors.LockNotAvailable):
            fencer.execute("SELECT tenantctl.fence_tenant(%s)", (A,))
        fencer.rollback()
        holders = fencer.execute("SELECT * FROM tenantctl.tenant_lock_holders(%s)", (A,)).fetchall()
        assert len(holders) == 1
        writer.commit()  # the in-flight write lands before the fence
        fencer.execute("SELECT tenantctl.fence_tenant(%s)", (A,))
        fencer.commit()
        with pytest.raises(psycopg.Error) as info:
            writer.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
        assert info.value.sqlstate == "TC002"
        writer.rollback()
        writer.execute("SELECT tenantctl.begin_tenant(%s, 1)", (B,))  # control: B unaffected
        count = fencer.execute("SELECT count(*) FROM projects WHERE name = 'in-flight'").fetchone()
        assert count == (1,)


FUSED_NAMES = fused("SELECT name FROM projects", 0)


@pytest.mark.parametrize(
    ("setup", "tenant_is_null", "epoch", "sqlstate"),
    [
        ("unknown", False, 1, "TC001"),
        ("moved", False, 1, "TC001"),
        ("fenced", False, 1, "TC002"),
        ("active", False, 7, "TC003"),
        ("active", True, 1, "TC000"),
    ],
)
async def test_fused_read_refuses_when_this_database_does_not_serve_the_tenant(
    seeded: Endpoints, setup: str, tenant_is_null: bool, epoch: int, sqlstate: str
) -> None:
    """The read path's in-statement check raises begin_tenant's SQLSTATEs (the router retries on them)."""
    tenant = uuid.uuid4()
    if setup != "unknown":
        with psycopg.connect(libpq(seeded.pool_url)) as conn:
            conn.execute("SELECT tenantctl.claim_tenant(%s, 1, %s)", (tenant, setup))
            conn.execute(
                "INSERT INTO projects (tenant_id, id, name) VALUES (%s, %s, 'canary-C')", (tenant, uuid.uuid4())
            )
    conn = await asyncpg.connect(libpq(seeded.app_pool_url))
    try:
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch(FUSED_NAMES, None if tenant_is_null else tenant, epoch)
        assert info.value.sqlstate == sqlstate
        rows = await conn.fetch(FUSED_NAMES, A, 1)  # control: served, its own rows only
        assert [r["name"] for r in rows] == ["canary-A-project"]
    finally:
        await conn.close()


async def test_fused_read_reads_one_snapshot_and_needs_no_share_of_the_fence(seeded: Endpoints) -> None:
    """A read commits nothing: it is not held by a fence in progress, and it reads the rows of the
    same snapshot whose ownership check passed; once the fence commits, reads are refused."""
    conn = await asyncpg.connect(libpq(seeded.app_pool_url))
    try:
        with psycopg.connect(libpq(seeded.pool_url)) as fencer:
            fencer.execute("SELECT tenantctl.fence_tenant(%s)", (A,))  # exclusive lock held, not committed
            rows = await asyncio.wait_for(conn.fetch(FUSED_NAMES, A, 1), timeout=30)
            assert [r["name"] for r in rows] == ["canary-A-project"]
            with psycopg.connect(libpq(seeded.app_pool_url)) as writer:  # control: a writer is held
                writer.execute("SET lock_timeout = '200ms'")
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    writer.execute("SELECT tenantctl.begin_tenant(%s, 1)", (A,))
            fencer.commit()
        with pytest.raises(asyncpg.PostgresError) as info:
            await conn.fetch(FUSED_NAMES, A, 1)
        assert info.value.sqlstate == "TC002"
        rows = await conn.fetch(FUSED_NAMES, B, 1)  # control: B unaffected
        assert [r["name"] for r in rows] == ["canary-B-project"]
    finally:
        await conn.close()


def test_app_role_reads_ownership_but_cannot_change_it(app_conn: psycopg.Connection) -> None:
    row = app_conn.execute("SELECT state, epoch FROM tenantctl.tenant_ownership WHERE tenant_id = %s", (A,)).fetchone()
    assert row == ("active", 1)
    app_conn.rollback()
    for statement in (
        "UPDATE tenantctl.tenant_ownership SET state = 'active'",
        "DELETE FROM tenantctl.tenant_ownership",
        "INSERT INTO tenantctl.tenant_ownership (tenant_id, state, epoch) VALUES (gen_random_uuid(), 'active', 1)",
    ):
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            app_conn.execute(statement)
        app_conn.rollback()
