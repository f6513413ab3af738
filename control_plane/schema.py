"""Run the two Alembic streams (``catalog`` and ``tenant``) programmatically.

Alembic's ``context``/``op`` are process-wide globals (PITFALLS: Migrations):
never call these functions from two threads or tasks of one process at once.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import psycopg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from data_plane.dsn import libpq, sync_url

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"
FILE_TEMPLATE = "%%(year)d_%%(month).2d_%%(day).2d_%%(hour).2d%%(minute).2d-%%(rev)s_%%(slug)s"


class Stream(StrEnum):
    CATALOG = "catalog"
    TENANT = "tenant"


def alembic_config(
    stream: Stream,
    dsn: str | None = None,
    *,
    app_role: str = "tenantctl_app",
    replication_role: str = "tenantctl_replicator",
) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR / stream.value))
    cfg.set_main_option("file_template", FILE_TEMPLATE)
    cfg.set_main_option("app_role", app_role)
    cfg.set_main_option("replication_role", replication_role)
    cfg.set_main_option("stream", stream.value)
    if dsn is not None:
        # ConfigParser interpolation would eat a literal '%' in a password.
        cfg.set_main_option("sqlalchemy.url", sync_url(dsn).render_as_string(False).replace("%", "%%"))
    return cfg


def upgrade(stream: Stream, dsn: str, revision: str = "head", *, app_role: str = "tenantctl_app") -> None:
    command.upgrade(alembic_config(stream, dsn, app_role=app_role), revision)


def downgrade(stream: Stream, dsn: str, revision: str, *, app_role: str = "tenantctl_app") -> None:
    command.downgrade(alembic_config(stream, dsn, app_role=app_role), revision)


def script_directory(stream: Stream) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(stream))


def head(stream: Stream) -> str:
    heads = script_directory(stream).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"the {stream} stream has {len(heads)} heads; merge them first")
    return heads[0]


def current_revision(dsn: str) -> str | None:
    """The database's revision with one query (None when unversioned)."""
    with psycopg.connect(libpq(dsn), autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('public.alembic_version') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return None
        row = conn.execute("SELECT version_num FROM public.alembic_version").fetchone()
        return None if row is None else str(row[0])
