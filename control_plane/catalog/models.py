"""SQLAlchemy Core tables of the catalog (the schema itself is owned by the
``catalog`` Alembic stream; these mirror it for queries)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import JSONB, UUID


def _check_name(constraint: sa.Constraint, table: sa.Table) -> str:
    """The ``<name>`` of ``ck_<table>_<name>``; an explicit name already spelled in full is kept.

    Every revision so far names its CHECK constraints in full (``ck_tenants_status``):
    with the plain ``%(constraint_name)s`` token they would become
    ``ck_tenants_ck_tenants_status`` once the migration environment uses this
    convention, so a fresh database would no longer match the ones migrated before.
    """
    name = constraint.name
    if not isinstance(name, str) or not name:
        raise sa.exc.InvalidRequestError(f"a CHECK constraint on {table.name} needs a name (ck_<table>_<name>)")
    prefix = f"ck_{table.name}_"
    return name.removeprefix(prefix)


# The token's name contains "constraint_name" on purpose: SQLAlchemy applies a
# convention to *explicitly named* constraints only when its template mentions
# that token (a plain template would keep a short explicit name unprefixed).
NAMING_CONVENTION: dict[str, Any] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name_in_full)s",
    "constraint_name_in_full": _check_name,
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = sa.MetaData(naming_convention=NAMING_CONVENTION)


def _timestamps() -> list[sa.Column[object]]:
    return [
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    ]


locations = sa.Table(
    "locations",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("name", sa.Text(), nullable=False, unique=True),
    sa.Column("kind", sa.Text(), nullable=False),
    sa.Column("provider", sa.Text(), nullable=False),
    sa.Column("stack_name", sa.Text()),
    sa.Column("database", sa.Text()),
    sa.Column("dsn", sa.Text()),
    sa.Column("app_dsn", sa.Text()),
    sa.Column("secret_ref", sa.Text()),
    sa.Column("tenant_id", UUID(as_uuid=True)),
    sa.Column("status", sa.Text(), nullable=False, server_default="ready"),
    sa.Column("detail", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
    *_timestamps(),
)

tenants = sa.Table(
    "tenants",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True, server_default=sa.text("gen_random_uuid()")),
    sa.Column("slug", sa.Text(), nullable=False, unique=True),
    sa.Column("name", sa.Text(), nullable=False),
    sa.Column("tier", sa.Text(), nullable=False),
    sa.Column("status", sa.Text(), nullable=False),
    sa.Column("placement", sa.Text(), nullable=False),
    sa.Column("location_id", UUID(as_uuid=True), sa.ForeignKey("locations.id")),
    sa.Column("route_epoch", sa.BigInteger(), nullable=False, server_default="1"),
    sa.Column("version", sa.Integer(), nullable=False, server_default="1"),
    *_timestamps(),
    sa.Column("deleted_at", sa.DateTime(timezone=True)),
    # Where a move in progress is taking the tenant (catalog_0012): replicas
    # connect there before the flip; routes still follow location_id.
    sa.Column("next_location_id", UUID(as_uuid=True), sa.ForeignKey("locations.id")),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()),
    sa.Column("actor", sa.Text(), nullable=False),
    sa.Column("action", sa.Text(), nullable=False),
    sa.Column("tenant_id", UUID(as_uuid=True)),
    sa.Column("detail", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", UUID(as_uuid=True), primary_key=True),
    sa.Column("kind", sa.Text(), nullable=False),
    sa.Column("tenant_id", UUID(as_uuid=True), sa.ForeignKey("tenants.id")),
    sa.Column("status", sa.Text(), nullable=False, server_default="pending"),
    sa.Column("step", sa.Text()),
    sa.Column("progress", sa.Float(), nullable=False, server_default="0"),
    sa.Column("detail", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("params", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
    sa.Column("error", sa.Text()),
    sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("created_by", sa.Text(), nullable=False),
    *_timestamps(),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("actor", sa.Text(), primary_key=True),
    sa.Column("key", sa.Text(), primary_key=True),
    sa.Column("request_hash", sa.Text(), nullable=False),
    sa.Column("state", sa.Text(), nullable=False, server_default="in_flight"),
    sa.Column("response_status", sa.Integer()),
    sa.Column("response_body", JSONB()),
    sa.Column("response_headers", JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
    *_timestamps(),
)
