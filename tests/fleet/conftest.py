"""Fleet fixtures: a catalog + pool (from the shared templates) and N silo databases.

Silos are cloned from the harness's silo template (tenant schema at the
project's head) and recorded in the catalog as ready silo
locations, each serving one tenant. Tests run the runner against a *copy* of
the tenant script directory with extra test-only revisions, so the real
migrations stay untouched.
"""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from control_plane import bootstrap, schema
from control_plane.stack import Endpoints
from data_plane.dsn import libpq
from tests.harness import SILO_TEMPLATE, PgServers, owner_dsn, unique_name


def _next(revision: str, step: int) -> str:
    prefix, _, number = revision.rpartition("_")
    return f"{prefix}_{int(number) + step:0{len(number)}d}"


# The project's real head (what the harness's templates are at) is the tests'
# starting point; the test-only revisions continue its numbering.
BASE = schema.head(schema.Stream.TENANT)
REV2 = _next(BASE, 1)
REV3 = _next(BASE, 2)
AHEAD = _next(BASE, 10)

REVISION_2 = f'''
"""Test-only: a nullable column (cheap, reversible).

Revision ID: {REV2}
Revises: {BASE}
"""
import sqlalchemy as sa
from alembic import op

revision = "{REV2}"
down_revision = "{BASE}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("projects", sa.Column("fleet_note", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("projects", "fleet_note")
'''

# Fails halfway -- after creating a table -- in every database whose name contains
# "fail", so one run shows a failed target next to succeeded ones.
REVISION_3 = f'''
"""Test-only: fails halfway in databases named *fail*.

Revision ID: {REV3}
Revises: {REV2}
"""
from alembic import op

revision = "{REV3}"
down_revision = "{REV2}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE fleet_half (id int)")
    op.execute(
        "DO $$ BEGIN IF position('fail' in current_database()) > 0 THEN "
        "RAISE EXCEPTION 'boom halfway through the test revision'; END IF; END $$"
    )


def downgrade() -> None:
    op.execute("DROP TABLE fleet_half")
'''

# Kills its own worker process (as the OOM killer would) in every database whose
# name contains "fail": a worker death, not a migration error.
REVISION_3_KILLS = f'''
"""Test-only: SIGKILLs the worker process in databases named *fail*.

Revision ID: {REV3}
Revises: {REV2}
"""
import os
import signal

from alembic import op

revision = "{REV3}"
down_revision = "{REV2}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("CREATE TABLE fleet_killed (id int)")
    if "fail" in op.get_bind().exec_driver_sql("SELECT current_database()").scalar():
        os.kill(os.getpid(), signal.SIGKILL)


def downgrade() -> None:
    op.execute("DROP TABLE fleet_killed")
'''


def make_scripts(root: Path, *, failing: bool = False, killing: bool = False, sleep_s: float = 0.0) -> str:
    """A copy of the tenant script directory with REV2 (and a failing or killing REV3) on top of the real head.

    ``sleep_s`` makes REV2 hold its transaction that long (to observe concurrency).
    """
    assert not (failing and killing), "one REV3 at a time"
    dest = root / f"tenant_{int(failing)}{int(killing)}_{sleep_s:g}"
    shutil.copytree(schema.MIGRATIONS_DIR / "tenant", dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    rev2 = REVISION_2
    if sleep_s:
        rev2 = rev2.replace(
            "def upgrade() -> None:\n", f'def upgrade() -> None:\n    op.execute("SELECT pg_sleep({sleep_s})")\n'
        )
    (dest / "versions" / "fleet_test_rev2_fleet_note.py").write_text(textwrap.dedent(rev2))
    if failing:
        (dest / "versions" / "fleet_test_rev3_fleet_half.py").write_text(textwrap.dedent(REVISION_3))
    if killing:
        (dest / "versions" / "fleet_test_rev3_fleet_killed.py").write_text(textwrap.dedent(REVISION_3_KILLS))
    return str(dest)


@pytest.fixture
def scripts(tmp_path: Path) -> str:
    return make_scripts(tmp_path)


@pytest.fixture
def failing_scripts(tmp_path: Path) -> str:
    return make_scripts(tmp_path, failing=True)


@dataclass
class Silo:
    location: str
    slug: str
    database: str
    dsn: str


@dataclass
class Fleet:
    servers: PgServers
    endpoints: Endpoints
    silos: list[Silo] = field(default_factory=list)

    @property
    def catalog(self) -> str:
        return self.endpoints.catalog_url

    @property
    def pool(self) -> str:
        return self.endpoints.pool_url

    def add_silos(self, count: int, *, failing: set[int] | frozenset[int] = frozenset()) -> list[Silo]:
        """Create ``count`` silo databases (index in ``failing`` → a *fail* name) and catalog rows."""
        roles = self.servers.roles
        first = len(self.silos)
        created = [
            Silo(
                location=f"silo-{first + i:03d}",
                slug=f"tenant-{first + i:03d}",
                database=(database := unique_name("t_silo_fail" if i in failing else "t_silo")),
                dsn=owner_dsn(self.servers.silo_admin, database, roles),
            )
            for i in range(count)
        ]
        # CREATE DATABASE costs ~0.6 s here; a few at once bring it to ~0.2 s each.
        with ThreadPoolExecutor(max_workers=6) as pool:
            list(
                pool.map(
                    lambda s: bootstrap.ensure_database(
                        self.servers.silo_admin, s.database, roles, template=SILO_TEMPLATE
                    ),
                    created,
                )
            )
        self.silos.extend(created)
        with psycopg.connect(libpq(self.catalog), autocommit=True) as cat:
            for silo in created:
                loc = cat.execute(
                    "INSERT INTO locations (name, kind, provider, database, dsn, status) "
                    "VALUES (%s, 'silo', 'local', %s, %s, 'ready') RETURNING id",
                    (silo.location, silo.database, silo.dsn),
                ).fetchone()
                assert loc is not None
                cat.execute(
                    "INSERT INTO tenants (slug, name, tier, status, placement, location_id) "
                    "VALUES (%s, %s, 'enterprise', 'active', 'silo', %s)",
                    (silo.slug, silo.slug, loc[0]),
                )
        return created

    def drop_all(self) -> None:
        for silo in self.silos:
            bootstrap.drop_database(self.servers.silo_admin, silo.database)


@pytest.fixture
def fleet(pg_servers: PgServers, endpoints: Endpoints) -> Iterator[Fleet]:
    built = Fleet(servers=pg_servers, endpoints=endpoints)
    try:
        yield built
    finally:
        built.drop_all()


def revision_of(dsn: str) -> str | None:
    return schema.current_revision(dsn)


def has_column(dsn: str, table: str, column: str) -> bool:
    with psycopg.connect(libpq(dsn)) as conn:
        row = conn.execute(
            "SELECT 1 FROM information_schema.columns WHERE table_name = %s AND column_name = %s",
            (table, column),
        ).fetchone()
    return row is not None


def set_allow_connections(admin: str, database: str, allow: bool) -> None:
    with psycopg.connect(libpq(admin), autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{database}" WITH ALLOW_CONNECTIONS {str(allow).lower()}')
