"""The body of both streams' ``env.py`` (they differ only in target metadata)."""

from __future__ import annotations

from typing import Any

from alembic import context
from sqlalchemy import MetaData, engine_from_config, pool


def only_modelled(_obj: Any, _name: str | None, _type: str, reflected: bool, compare_to: Any) -> bool:
    """Autogenerate: never propose dropping what the metadata does not model.

    The tenant stream models nothing and the catalog models only what the
    control plane queries (DBOS, usage ... are created by migrations alone):
    without this filter ``alembic revision --autogenerate`` would drop them.
    """
    return not (reflected and compare_to is None)


def run(target_metadata: MetaData) -> None:
    config = context.config
    options: dict[str, Any] = {"target_metadata": target_metadata, "include_object": only_modelled}
    if context.is_offline_mode():
        context.configure(
            url=config.get_main_option("sqlalchemy.url"),
            literal_binds=True,
            transactional_ddl=True,
            **options,
        )
        with context.begin_transaction():
            context.run_migrations()
        return

    connectable = config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, **options)
        with context.begin_transaction():
            context.run_migrations()
        return

    engine = engine_from_config(
        config.get_section(config.config_ini_section, {}), prefix="sqlalchemy.", poolclass=pool.NullPool
    )
    with engine.connect() as connection:
        # One transaction for the whole run: a migration that fails halfway
        # leaves the database at its previous revision (transactional DDL).
        context.configure(connection=connection, **options)
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()
