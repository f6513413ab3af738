"""Discovery of tenant tables and their foreign-key order."""

from __future__ import annotations

from typing import Any

import psycopg

TENANT_TABLES = """
SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname)
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
 WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenantctl')
   AND n.nspname !~ '^pg_' AND NOT c.relispartition
"""

FOREIGN_KEYS = "SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f' AND conrelid <> confrelid"


def tenant_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """Qualified names of every table with a ``tenant_id`` column, parents before children.

    Parents first is the order a copy must insert in (and cleanup must delete
    in reverse) so that composite foreign keys are satisfied at every step.
    """
    rows = conn.execute(TENANT_TABLES).fetchall()
    # quote_ident: quoted only where needed, the same text as regclass::text
    # with the schema off the search path (what the move triggers record).
    names = {oid: str(name) for oid, name in rows}
    parents: dict[int, set[int]] = {oid: set() for oid in names}
    for child, parent in conn.execute(FOREIGN_KEYS).fetchall():
        if child in names and parent in names:
            parents[child].add(parent)
    ordered: list[str] = []
    done: set[int] = set()

    def visit(oid: int, path: frozenset[int]) -> None:
        if oid in done:
            return
        if oid in path:
            raise ValueError(f"foreign-key cycle through {names[oid]}; moves need an acyclic schema")
        for parent in sorted(parents[oid], key=names.__getitem__):
            visit(parent, path | {oid})
        done.add(oid)
        ordered.append(names[oid])

    for oid in sorted(names, key=names.__getitem__):
        visit(oid, frozenset())
    return ordered
