"""Alembic environment of the ``catalog`` stream."""

from migrations.env_common import run

run(None)
