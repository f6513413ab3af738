"""Alembic environment of the ``tenant`` stream."""

from migrations.env_common import run

run(None)
