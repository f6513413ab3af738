"""Tenant export and import: the offboarding archive format.

Format ``tenantctl-export/1`` -- a directory ``<state_dir>/exports/<tenant_id>/``:

* ``manifest.json``::

      {"format": "tenantctl-export/1", "tenant_id": "...", "slug": "...",
       "exported_at": "2026-11-23T19:50:00+00:00", "schema_revision": "tenant_0001",
       "tables": [{"name": "projects", "schema": "public", "file": "projects.jsonl",
                   "rows": 2, "sha256": "..."}, ...]}

  ``tables`` is in foreign-key order (parents first): importing in that order
  satisfies every constraint.
* ``<table>.jsonl`` -- one JSON object per line: PostgreSQL's own
  ``row_to_json`` of the row (every column, ``tenant_id`` included), in
  primary-key order. Values round-trip through ``json_populate_recordset``,
  so import restores exactly the stored types.

Tenant tables are discovered as moves discover them (every table with a
``tenant_id`` column, in any schema but the system's and tenantctl's, a
partitioned table once; offboarding used to search ``public`` only and left
a tenant's rows in any other schema; a table outside ``public`` is
named ``schema.table`` and its manifest entry has a ``"schema"``), so a table
added by a later migration is exported without code changes. Export reads
as the owner role (BYPASSRLS) with ``row_security`` off, so anything that
would filter rows raises instead (PITFALLS), in one REPEATABLE READ snapshot.
The directory appears atomically (written as ``<id>.partial`` then renamed):
an existing manifest means a complete export.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from control_plane.moves import tables
from control_plane.moves.tables import TENANT_BATCH_DELETE, sequence_columns, stored_columns
from data_plane.dsn import libpq

FORMAT = "tenantctl-export/1"
IMPORT_CHUNK_ROWS = 500

PK_SQL = """
SELECT a.attname
  FROM pg_index i
  JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
 WHERE i.indrelid = %s::regclass AND i.indisprimary
 ORDER BY array_position(i.indkey, a.attnum)
"""


@dataclass(frozen=True)
class TableExport:
    name: str
    schema: str
    file: str
    rows: int
    sha256: str


def _schema_and_name(conn: psycopg.Connection[Any], table: str) -> tuple[str, str]:
    row = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = %s::regclass",
        (table,),
    ).fetchone()
    assert row is not None
    return str(row[0]), str(row[1])


def _label(schema: str, name: str) -> str:
    """A table as the manifest and the counts name it: bare in ``public`` (as format 1 always did)."""
    return name if schema == "public" else f"{schema}.{name}"


def _file_name(label: str) -> str:
    # Any character can be in a quoted identifier; none of them may make a path.
    return re.sub(r"[^\w.-]", "_", label) + ".jsonl"


def _primary_key(conn: psycopg.Connection[Any], table: str) -> list[str]:
    return [str(row[0]) for row in conn.execute(PK_SQL, (table,)).fetchall()]


def export_dir_for(base: Path, tenant_id: uuid.UUID) -> Path:
    return base / str(tenant_id)


def export_tenant(
    dsn: str, tenant_id: uuid.UUID, base: Path, *, slug: str, schema_revision: str | None
) -> dict[str, Any]:
    """Export every row of ``tenant_id`` from the store at ``dsn``; return the manifest.

    Idempotent: a complete export (manifest present) is returned as is.
    """
    target = export_dir_for(base, tenant_id)
    manifest_path = target / "manifest.json"
    if manifest_path.exists():
        loaded: dict[str, Any] = json.loads(manifest_path.read_text())
        return loaded
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    partial.chmod(0o700)  # tenant data: readable by the operator only
    exported: list[TableExport] = []
    with psycopg.connect(libpq(dsn)) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            conn.execute("SELECT set_config('row_security', 'off', true)")
            for number, table in enumerate(tables.tenant_tables(conn)):
                schema, name = _schema_and_name(conn, table)
                # Primary-key order; a table without one (which only an offline
                # move accepts) used to fail the export with an empty ORDER BY.
                key = _primary_key(conn, table) or ["tenant_id"]
                order = sql.SQL(", ").join(sql.Identifier(col) for col in key)
                query = sql.SQL("SELECT row_to_json(t)::text FROM {} t WHERE t.tenant_id = %s ORDER BY {}").format(
                    sql.SQL(table), order
                )
                digest = hashlib.sha256()
                rows = 0
                path = partial / _file_name(_label(schema, name))
                with path.open("w", encoding="utf-8") as handle, conn.cursor(name=f"export_{number}") as cur:
                    cur.execute(query, (tenant_id,))
                    for (line,) in cur:
                        data = f"{line}\n"
                        handle.write(data)
                        digest.update(data.encode())
                        rows += 1
                exported.append(TableExport(name, schema, path.name, rows, digest.hexdigest()))
    manifest = {
        "format": FORMAT,
        "tenant_id": str(tenant_id),
        "slug": slug,
        "exported_at": datetime.now(UTC).isoformat(),
        "schema_revision": schema_revision,
        "tables": [vars(table) for table in exported],
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return manifest


def _read_lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield line


def import_tenant(dsn: str, directory: Path) -> dict[str, int]:
    """Load an export into the store at ``dsn`` (owner role), in one transaction.

    Verifies the format and every file's checksum first; returns rows per
    table. The caller decides afterwards whether this store should serve the
    tenant (``tenantctl.claim_tenant``).
    """
    manifest = json.loads((directory / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} export: {directory}")
    for table in manifest["tables"]:
        digest = hashlib.sha256((directory / table["file"]).read_bytes()).hexdigest()
        if digest != table["sha256"]:
            raise ValueError(f"{table['file']} does not match its checksum")
    counts: dict[str, int] = {}
    with psycopg.connect(libpq(dsn)) as conn, conn.transaction():
        conn.execute("SELECT set_config('row_security', 'off', true)")
        for table in manifest["tables"]:
            schema = table.get("schema", "public")  # absent in exports made before other schemas were
            label = _label(schema, table["name"])
            name = sql.Identifier(schema, table["name"])
            qualified = name.as_string(conn)
            # The stored values, identity columns' too (OVERRIDING: an identity
            # GENERATED ALWAYS refused them); generated columns are computed again.
            columns = sql.SQL(", ").join(sql.Identifier(c) for c in stored_columns(conn, qualified))
            statement = sql.SQL(
                "INSERT INTO {t} ({c}) OVERRIDING SYSTEM VALUE "
                "SELECT {c} FROM json_populate_recordset(NULL::{t}, %s::json)"
            ).format(t=name, c=columns)
            chunk: list[str] = []
            inserted = 0
            for line in _read_lines(directory / table["file"]):
                chunk.append(line)
                if len(chunk) >= IMPORT_CHUNK_ROWS:
                    inserted += conn.execute(statement, (f"[{','.join(chunk)}]",)).rowcount
                    chunk = []
            if chunk:
                inserted += conn.execute(statement, (f"[{','.join(chunk)}]",)).rowcount
            if inserted != table["rows"]:
                raise ValueError(f"{label}: imported {inserted} rows, manifest says {table['rows']}")
            counts[label] = inserted
            _advance_sequences_past_rows(conn, qualified)
    return counts


def _advance_sequences_past_rows(conn: psycopg.Connection[Any], table: str) -> None:
    """Move each sequence of ``table`` past the largest value its column now holds (never back).

    An import writes the stored ids; the sequences stayed where they were, and
    the restored tenant's next insert collided with its own imported rows.
    """
    for column, sequence in sequence_columns(conn, table):
        conn.execute(
            sql.SQL(
                "SELECT setval(%s::regclass, m::bigint) FROM (SELECT max({c}) AS m FROM {t}) AS x "
                "WHERE m IS NOT NULL AND m > coalesce(pg_sequence_last_value(%s::regclass), 0) "
                "AND (SELECT seqincrement > 0 FROM pg_sequence WHERE seqrelid = %s::regclass)"
            ).format(c=sql.Identifier(column), t=sql.SQL(table)),
            (sequence, sequence, sequence),
        )


def delete_batch(dsn: str, table: str, tenant_id: uuid.UUID, limit: int) -> int:
    """Delete at most ``limit`` rows of the tenant from ``table`` (named as ``tables.tenant_tables`` names it)."""
    statement = sql.SQL(TENANT_BATCH_DELETE).format(t=sql.SQL(table))
    with psycopg.connect(libpq(dsn)) as conn, conn.transaction():
        conn.execute("SELECT set_config('row_security', 'off', true)")
        return conn.execute(statement, (tenant_id, tenant_id, limit)).rowcount


def count_rows(dsn: str, tenant_id: uuid.UUID) -> dict[str, int]:
    """Rows of the tenant per tenant table (owner role), keyed as ``tables.tenant_tables`` names them."""
    with psycopg.connect(libpq(dsn)) as conn, conn.transaction():
        conn.execute("SELECT set_config('row_security', 'off', true)")
        counts = {}
        for table in tables.tenant_tables(conn):
            query = sql.SQL("SELECT count(*) FROM {} WHERE tenant_id = %s").format(sql.SQL(table))
            row = conn.execute(query, (tenant_id,)).fetchone()
            counts[table] = int(row[0]) if row else 0
        return counts
