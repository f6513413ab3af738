"""Discovery of tenant tables and their foreign-key order."""

from __future__ import annotations

from typing import Any, NamedTuple

import psycopg
from psycopg import sql

# Relations with a tenant_id column outside the system and tenantctl schemas
# (``c``, named ``n.nspname.c.relname``); each query below narrows the kinds.
_TENANT_RELATIONS = """
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
 WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'tenantctl') AND n.nspname !~ '^pg_'
"""

# Plain and partitioned tables; not partitions, whose rows are their
# partitioned table's (and whose layout the other database need not share).
TENANT_TABLES = (
    "SELECT c.oid, quote_ident(n.nspname) || '.' || quote_ident(c.relname)"
    + _TENANT_RELATIONS
    + "   AND c.relkind IN ('r', 'p') AND NOT c.relispartition"
)

# Every table with a tenant_id column, partitions too (each has a replica identity of its own),
# with what decides whether a move can carry it.
MOVABILITY = (
    """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
       c.relreplident = 'f' OR EXISTS (
           SELECT 1 FROM pg_index i JOIN pg_attribute k ON k.attrelid = i.indrelid AND k.attnum = ANY(i.indkey)
            WHERE i.indrelid = c.oid AND k.attname = 'tenant_id'
              AND ((c.relreplident = 'd' AND i.indisprimary) OR (c.relreplident = 'i' AND i.indisreplident)))"""
    + _TENANT_RELATIONS
    + "   AND c.relkind IN ('r', 'p') ORDER BY 1"
)

# (relation, column, sequence) for each column a sequence fills: identity
# and serial columns' own (the sequence's "internal" or "auto" dependency on
# the column) and any other a column default calls nextval() on (the
# default's dependency on the sequence). Only sequences: indexes and TOAST
# tables depend on their table's columns the same way.
_COLUMN_SEQUENCES = """
SELECT f.relid, f.attnum, s.oid AS seqid, s.relname, sn.nspname FROM (
       SELECT d.refobjid AS relid, d.refobjsubid AS attnum, d.objid AS seqid FROM pg_depend d
        WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.deptype IN ('a', 'i')
       UNION
       SELECT ad.adrelid, ad.adnum, d.refobjid FROM pg_attrdef ad
         JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid
          AND d.refclassid = 'pg_class'::regclass) AS f
  JOIN pg_class s ON s.oid = f.seqid AND s.relkind = 'S'
  JOIN pg_namespace sn ON sn.oid = s.relnamespace
"""

# The sequences that fill a column of a tenant table.
SEQUENCES = (
    "SELECT DISTINCT cs.nspname, cs.relname,"
    " has_sequence_privilege(cs.seqid, 'SELECT') AND has_sequence_privilege(cs.seqid, 'UPDATE')"
    f" FROM ({_COLUMN_SEQUENCES}) AS cs WHERE cs.relid IN (SELECT c.oid" + _TENANT_RELATIONS + ") ORDER BY 1, 2"
)

# A ctid is unique within one table only: in a partitioned table every
# partition has a row at (0,1), so a batch picked by ctid alone also deleted
# other tenants' rows that sat at the same place in another partition. The
# outer tenant_id condition makes the batch the tenant's rows only, whatever
# the layout. Offboarding deleted this way from partitioned tables, and its
# export also listed each partition as a table of its own, whose rows were
# then exported and counted twice.
TENANT_BATCH_DELETE = (
    "DELETE FROM {t} WHERE tenant_id = %s AND ctid = ANY(ARRAY(SELECT ctid FROM {t} WHERE tenant_id = %s LIMIT %s))"
)


FOREIGN_KEYS = "SELECT conrelid, confrelid FROM pg_constraint WHERE contype = 'f' AND conrelid <> confrelid"


def tenant_tables(conn: psycopg.Connection[Any]) -> list[str]:
    """Qualified names of every table with a ``tenant_id`` column, parents before children.

    A partitioned table is listed, its partitions are not: the move copies,
    replicates (``publish_via_partition_root``), verifies and deletes through it.

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


def unmovable(conn: psycopg.Connection[Any], *, online: bool) -> list[tuple[str, str]]:
    """Why a move could not carry the tenant's rows faithfully: (table, reason) pairs (none: it can).

    Checked before a move touches anything, because each of these used to be
    found late or not at all:

    * a sequence that fills a column and that the move's role cannot read
      and advance (``engine.carry_sequences``) would restart on the target
      and its next values collide with the copied rows;
    * online, logical replication with a ``tenant_id`` row filter needs
      ``tenant_id`` in the table's replica identity, or PostgreSQL refuses
      every tenant's UPDATE and DELETE on it while the publication exists;
      verification needs a primary key.
    """
    problems = []
    for table, has_pk, identity_has_tenant in conn.execute(MOVABILITY).fetchall():
        if online and not has_pk:
            problems.append((table, "no primary key"))
        elif online and not identity_has_tenant:
            problems.append(
                (
                    table,
                    "tenant_id is not in its replica identity (primary key), which a row-filtered "
                    "publication needs for every tenant's UPDATE and DELETE",
                )
            )
    problems += [(seq.qualified, UNUSABLE_SEQUENCE) for seq in sequences(conn) if not seq.usable]
    return problems


UNUSABLE_SEQUENCE = "a sequence of a tenant table that the move's role cannot read and advance"


class TenantSequence(NamedTuple):
    """A sequence that fills a column of a tenant table."""

    schema: str
    name: str
    usable: bool  # this connection's role can read and advance it

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


def sequences(conn: psycopg.Connection[Any]) -> list[TenantSequence]:
    """Every sequence that fills a column of a tenant table."""
    return [TenantSequence(str(schema), str(name), bool(usable)) for schema, name, usable in conn.execute(SEQUENCES)]


def stored_columns(conn: psycopg.Connection[Any], table: str) -> list[str]:
    """``table``'s columns that hold stored values (not generated ones), in order."""
    rows = conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "AND attgenerated = '' ORDER BY attnum",
        (table,),
    ).fetchall()
    return [str(r[0]) for r in rows]


_SEQUENCE_COLUMNS = (
    "SELECT a.attname, cs.seqid::regclass::text"
    f" FROM ({_COLUMN_SEQUENCES}) AS cs JOIN pg_attribute a ON a.attrelid = cs.relid AND a.attnum = cs.attnum"
    " WHERE cs.relid = %(t)s::regclass"
)


def sequence_columns(conn: psycopg.Connection[Any], table: str) -> list[tuple[str, str]]:
    """(column, sequence) for each column of ``table`` filled from a sequence."""
    return [(str(c), str(s)) for c, s in conn.execute(_SEQUENCE_COLUMNS, {"t": table}).fetchall()]


# Whether a table has a column whose hash differs between two databases for
# the same value: hash_record_extended hashes each column with its type's own
# hash function, and an enum's hashes its label's OID, different in every
# database (so did composite and other user-defined types, and arrays of them).
# Domains are looked through: one over a built-in type hashes as that type.
_NON_PORTABLE_HASH = """
SELECT EXISTS (
    SELECT 1 FROM pg_attribute AS a
      JOIN pg_type AS t ON t.oid = a.atttypid
      JOIN pg_type AS b ON b.oid = CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE t.oid END
      JOIN pg_type AS e ON e.oid = CASE WHEN b.typcategory = 'A' THEN b.typelem ELSE b.oid END
      JOIN pg_type AS f ON f.oid = CASE WHEN e.typtype = 'd' THEN e.typbasetype ELSE e.oid END
     WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped AND f.oid >= 16384
)
"""
FAST_DIGEST = sql.SQL("hash_record_extended(t, 0)")
# The row's text, rendered under the settings engine._privileged fixes on both sides.
PORTABLE_DIGEST = sql.SQL("hashtextextended(t::text, 0)")


def row_digest(conn: psycopg.Connection[Any], table: str) -> sql.Composable:
    """How to hash a row of ``table`` (aliased ``t``) to the same value in any database.

    The type's own hash where it is the same everywhere (~4x faster than
    hashing the row's text); the text's hash for a table with a column of a
    user-defined type. Before, an enum column failed every move's
    verification, after the whole copy.
    """
    row = conn.execute(_NON_PORTABLE_HASH, (table,)).fetchone()
    return PORTABLE_DIGEST if row is not None and row[0] else FAST_DIGEST
