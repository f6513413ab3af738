"""Alembic environment of the ``tenant`` stream.

The tenant schema has no SQLAlchemy models (the data plane writes SQL), but its
migrations get the catalog's naming convention all the same: unnamed
constraints and indexes created by ``op`` are named ``pk_<table>``,
``ix_<table>_<columns>`` ..., and ``op.f()`` marks a name as final.
"""

from sqlalchemy import MetaData

from control_plane.catalog.models import NAMING_CONVENTION
from migrations.env_common import run

run(MetaData(naming_convention=NAMING_CONVENTION))
