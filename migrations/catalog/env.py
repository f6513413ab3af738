"""Alembic environment of the ``catalog`` stream.

Target metadata: the catalog models (``control_plane.catalog.models``), so
autogenerate compares against them and every ``op`` names unnamed constraints
and indexes by their naming convention (``op.f()`` marks a name as final).
"""

from control_plane.catalog.models import metadata
from migrations.env_common import run

run(metadata)
