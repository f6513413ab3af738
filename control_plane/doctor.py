"""``tenantctl doctor``: an RLS and role audit of the pool and every silo.

Each check names a way systems like this one have leaked data (PITFALLS):

* a table with ``tenant_id`` but RLS not enabled *and* forced;
* no policy covering every command, or a policy not in the index-friendly,
  fail-closed form (a bare ``current_setting()`` per row, an ``OR`` branch);
* the application role being superuser/BYPASSRLS or owning anything (an owner
  can disable RLS), or a member of a role that is or does (``SET ROLE`` would
  then lift every policy);
* TRUNCATE or REFERENCES granted (neither is subject to RLS; REFERENCES also
  column by column), or any grant to PUBLIC;
* no index leading with ``tenant_id``; a unique or foreign key that does not
  lead with ``tenant_id`` (a constraint error is an oracle on other tenants);
* a view over tenant tables without ``security_invoker`` or a materialized view
  (both run with the owner's rights);
* a PostgreSQL minor release older than the RLS fixes (a warning);
* a tenant table a move would refuse (partitioned, filled from a sequence, or
  without ``tenant_id`` in its replica identity: ``moves.tables.unmovable``),
  a warning, so that it is found before a promotion is asked for.

And one durability check: a move's publication, subscription or replication
slot that no unfinished move owns (its compensation failed, or its job was
removed). An orphaned slot keeps every byte of WAL written after it, until
the server's disk is full; a live move's slot past ``max_slot_wal_keep_size``
is a warning (the server drops it at its next checkpoint, and the move fails).
That includes the slots of a move's table syncs (``pg_<subscription oid>_sync_
<table oid>_<subscriber's system identifier>``), which survive their
subscription when it is dropped detached from its slot, as a move's teardown
(and the doctor's own hint) drops it: each is traced by name to its
subscription on the audited server with that system identifier.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from control_plane.fleet.models import Target
from control_plane.fleet.targets import load_targets
from control_plane.moves.engine import MOVE_OBJECT_PREFIX, move_object_name
from control_plane.moves.tables import unmovable
from data_plane.dsn import libpq, redact
from data_plane.secrets import SecretUnavailableError

FIXED_MINORS = {15: 9, 16: 5, 17: 1}  # plan reuse across roles (CVE-2024-10976)
INTERNAL_SCHEMAS = ("pg_catalog", "information_schema", "tenantctl")

TENANT_TABLES = """
SELECT c.oid, n.nspname, c.relname, c.relrowsecurity, c.relforcerowsecurity, a.attnum
  FROM pg_class c
  JOIN pg_namespace n ON n.oid = c.relnamespace
  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped
 WHERE c.relkind IN ('r', 'p') AND n.nspname <> ALL(%(internal)s) AND n.nspname NOT LIKE 'pg_%%'
 ORDER BY n.nspname, c.relname
"""

POLICIES = """
SELECT polname, polcmd, polpermissive, pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
  FROM pg_policy WHERE polrelid = %s
"""

LEADING_INDEX = "SELECT 1 FROM pg_index WHERE indrelid = %s AND indkey[0] = %s LIMIT 1"

UNIQUE_NOT_LEADING = """
SELECT i.indexrelid::regclass::text FROM pg_index i
 WHERE i.indrelid = %s AND i.indisunique AND i.indkey[0] <> %s
"""

FK_NOT_LEADING = """
SELECT conname FROM pg_constraint
 WHERE contype = 'f' AND (conrelid = %(oid)s OR confrelid = %(oid)s)
   AND NOT ((conrelid = %(oid)s AND conkey[1] = %(att)s) OR (confrelid = %(oid)s AND confkey[1] = %(att)s))
"""

GRANTS = """
SELECT grantee, privilege_type FROM information_schema.role_table_grants
 WHERE table_schema = %s AND table_name = %s
   AND (grantee = 'PUBLIC' OR (grantee = %s AND privilege_type IN ('TRUNCATE', 'REFERENCES', 'TRIGGER')))
"""

COLUMN_REFERENCES = """
SELECT a.attname FROM pg_attribute a, aclexplode(a.attacl) acl
 WHERE a.attrelid = %s AND NOT a.attisdropped AND acl.privilege_type = 'REFERENCES'
   AND acl.grantee = (SELECT oid FROM pg_roles WHERE rolname = %s)
"""

# The release, and the system identifier a table-sync slot's name refers to.
SERVER = "SELECT current_setting('server_version_num')::int, system_identifier FROM pg_control_system()"

ROLE = "SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s"

# Every role the app role can SET ROLE to (directly or through other roles),
# with what makes it dangerous here.
MEMBER_OF = """
WITH RECURSIVE granted(oid) AS (
    SELECT m.roleid FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = %(r)s
    UNION
    SELECT m.roleid FROM pg_auth_members m JOIN granted g ON m.member = g.oid
)
SELECT r.rolname, r.rolsuper, r.rolbypassrls,
       EXISTS (SELECT 1 FROM pg_class c WHERE c.relowner = r.oid) AS owns
  FROM granted g JOIN pg_roles r ON r.oid = g.oid
 ORDER BY r.rolname
"""

OWNED = """
WITH r AS (SELECT oid FROM pg_roles WHERE rolname = %(r)s)
SELECT 'relation ' || c.oid::regclass::text FROM pg_class c, r WHERE c.relowner = r.oid
UNION ALL SELECT 'function ' || p.oid::regprocedure::text FROM pg_proc p, r WHERE p.proowner = r.oid
UNION ALL SELECT 'schema ' || n.nspname FROM pg_namespace n, r WHERE n.nspowner = r.oid
"""

VIEWS = """
SELECT DISTINCT v.oid::regclass::text, v.relkind, coalesce(v.reloptions::text, '') LIKE '%%security_invoker=true%%'
  FROM pg_class v
  JOIN pg_rewrite rw ON rw.ev_class = v.oid
  JOIN pg_depend d ON d.objid = rw.oid AND d.classid = 'pg_rewrite'::regclass
 WHERE v.relkind IN ('v', 'm') AND d.refobjid = ANY(%s) AND d.refobjid <> v.oid
"""

# A move's objects in this database (slots of other databases on the same
# server are theirs to report). Readable without superuser: the subscription
# columns named here are granted to PUBLIC.
MOVE_OBJECTS = """
SELECT 'replication slot', slot_name::text, wal_status,
       pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn))
  FROM pg_replication_slots WHERE database = current_database() AND starts_with(slot_name::text, %(prefix)s)
UNION ALL
SELECT 'table-sync slot', slot_name::text, wal_status,
       pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn))
  FROM pg_replication_slots WHERE database = current_database() AND slot_name::text ~ %(sync)s
UNION ALL
SELECT 'publication', pubname::text, NULL, NULL FROM pg_publication WHERE starts_with(pubname::text, %(prefix)s)
UNION ALL
SELECT 'subscription', subname::text, NULL, NULL FROM pg_subscription
 WHERE subdbid = (SELECT oid FROM pg_database WHERE datname = current_database())
   AND starts_with(subname::text, %(prefix)s)
 ORDER BY 2, 1
"""

# How PostgreSQL names a table sync's slot (ReplicationSlotNameForTablesync).
TABLE_SYNC_SLOT = re.compile(r"^pg_(\d+)_sync_(\d+)_(\d+)$")

# The server's system identifier and every subscription on it: pg_subscription
# is shared by all databases of a server (oid and subname are readable by all).
SUBSCRIPTIONS = """
SELECT c.system_identifier::text, s.oid::bigint, s.subname::text
  FROM pg_control_system() c LEFT JOIN pg_subscription s ON true
"""

LIVE_MOVES = "SELECT id FROM jobs WHERE kind IN ('promotion', 'demotion') AND status IN ('pending', 'running')"

DROP_HINTS = {
    "replication slot": "SELECT pg_drop_replication_slot('{name}')",
    "table-sync slot": "SELECT pg_drop_replication_slot('{name}')",
    "publication": "DROP PUBLICATION {name}",
    # SET (slot_name = NONE) first: DROP SUBSCRIPTION would otherwise need the
    # source to answer, and drop the slot there itself.
    "subscription": "ALTER SUBSCRIPTION {name} DISABLE; ALTER SUBSCRIPTION {name} SET (slot_name = NONE); "
    "DROP SUBSCRIPTION {name}",
}


AT_RISK = {
    "unreserved": "replication slot is unreserved ({0.retained} behind, past max_slot_wal_keep_size): the server "
    "drops its WAL at the next checkpoint and the move fails; raise max_slot_wal_keep_size now to keep it",
    "lost": "replication slot is lost (past max_slot_wal_keep_size, its WAL removed): the move fails and has to be "
    "started again",
}


@dataclass(frozen=True)
class MoveObject:
    kind: str  # 'replication slot' | 'table-sync slot' | 'publication' | 'subscription'
    name: str
    wal_status: str | None = None  # slots only
    retained: str | None = None  # slots only: WAL the slot keeps, e.g. "12 MB"


@dataclass
class Finding:
    check: str
    object: str
    message: str


@dataclass
class TargetReport:
    name: str
    kind: str
    dsn: str
    server_version: str | None = None
    system_identifier: str | None = None  # of the server: what a table-sync slot's name refers to
    tenant_tables: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    warnings: list[Finding] = field(default_factory=list)
    move_objects: list[MoveObject] = field(default_factory=list)


def _policy_is_index_friendly(expression: str | None) -> bool:
    if not expression:
        return False
    text = " ".join(expression.split()).lower()
    return (
        "tenant_id =" in text
        and "select" in text
        and "current_setting('app.current_tenant_id'" in text
        and "nullif(" in text
        and "::uuid" in text
        and " or " not in text
    )


def _check_table(conn: psycopg.Connection[Any], report: TargetReport, row: tuple[Any, ...], app_role: str) -> None:
    oid, schema, table, enabled, forced, attnum = row
    name = f"{schema}.{table}"
    report.tenant_tables.append(name)

    def finding(check: str, message: str, obj: str = name) -> None:
        report.findings.append(Finding(check, obj, message))

    if not enabled or not forced:
        finding("rls_forced", "row-level security must be ENABLEd and FORCEd")
    policies = conn.execute(POLICIES, (oid,)).fetchall()
    commands = {cmd for _, cmd, permissive, _, _ in policies if permissive}
    if "*" not in commands and not {"r", "a", "w", "d"} <= commands:
        finding("policy_coverage", "no permissive policy covers SELECT, INSERT, UPDATE and DELETE")
    for policy, cmd, _, qual, check in policies:
        if cmd in ("*", "r", "w", "d") and not _policy_is_index_friendly(qual):
            finding("policy_form", f"policy {policy} USING is not the fail-closed sub-select form: {qual}")
        if cmd in ("*", "a", "w") and not _policy_is_index_friendly(check or qual):
            finding("policy_form", f"policy {policy} WITH CHECK is not the fail-closed sub-select form")
    if conn.execute(LEADING_INDEX, (oid, attnum)).fetchone() is None:
        finding("tenant_index", "no index leads with tenant_id")
    for (index,) in conn.execute(UNIQUE_NOT_LEADING, (oid, attnum)).fetchall():
        finding("unique_oracle", "unique index does not lead with tenant_id", index)
    for (constraint,) in conn.execute(FK_NOT_LEADING, {"oid": oid, "att": attnum}).fetchall():
        finding("fk_oracle", "foreign key does not lead with tenant_id", constraint)
    for grantee, privilege in conn.execute(GRANTS, (schema, table, app_role)).fetchall():
        finding("grant", f"{privilege} granted to {grantee}")
    for (column,) in conn.execute(COLUMN_REFERENCES, (oid, app_role)).fetchall():
        finding("grant", f"REFERENCES on column {column} granted to {app_role}")


def _check_memberships(conn: psycopg.Connection[Any], report: TargetReport, app_role: str) -> None:
    for granted, superuser, bypassrls, owns in conn.execute(MEMBER_OF, {"r": app_role}).fetchall():
        if superuser or bypassrls:
            report.findings.append(
                Finding("app_role", granted, f"{app_role} is a member of {granted}, which is SUPERUSER or BYPASSRLS")
            )
        if owns:
            report.findings.append(
                Finding("app_role", granted, f"{app_role} is a member of {granted}, which owns relations here")
            )


def audit_database(*, name: str, kind: str, dsn: str, app_role: str) -> TargetReport:
    report = TargetReport(name=name, kind=kind, dsn=redact(dsn))
    try:
        conn = psycopg.connect(libpq(dsn), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError as exc:
        report.findings.append(Finding("reachable", name, f"cannot connect: {exc}".splitlines()[0]))
        return report
    with conn:
        server = conn.execute(SERVER).fetchone()
        assert server is not None
        version_num, report.system_identifier = int(server[0]), str(server[1])
        major, minor = version_num // 10000, version_num % 100
        report.server_version = f"{major}.{minor}"
        if major in FIXED_MINORS and minor < FIXED_MINORS[major]:
            report.warnings.append(
                Finding(
                    "server_version",
                    report.server_version,
                    f"PostgreSQL {major}.{minor} predates the RLS plan-reuse fix ({major}.{FIXED_MINORS[major]})",
                )
            )
        role = conn.execute(ROLE, (app_role,)).fetchone()
        if role is None:
            report.findings.append(Finding("app_role", app_role, "application role does not exist"))
        elif role[0] or role[1]:
            report.findings.append(Finding("app_role", app_role, "application role is SUPERUSER or BYPASSRLS"))
        _check_memberships(conn, report, app_role)
        for (owned,) in conn.execute(OWNED, {"r": app_role}).fetchall():
            report.findings.append(Finding("app_owns", owned, "application role owns an object"))
        rows = conn.execute(TENANT_TABLES, {"internal": list(INTERNAL_SCHEMAS)}).fetchall()
        for row in rows:
            _check_table(conn, report, row, app_role)
        oids = [row[0] for row in rows]
        for view, relkind, invoker in conn.execute(VIEWS, (oids,)).fetchall():
            if relkind == "m":
                report.findings.append(Finding("view", view, "materialized view over tenant tables"))
            elif not invoker:
                report.findings.append(Finding("view", view, "view over tenant tables without security_invoker"))
        if not rows:
            report.findings.append(Finding("tenant_tables", name, "no table with tenant_id found"))
        for table, reason in unmovable(conn, online=True):
            report.warnings.append(Finding("not_movable", table, f"a move would refuse this table: {reason}"))
        report.move_objects = _move_objects(conn)
    return report


def _move_objects(conn: psycopg.Connection[Any]) -> list[MoveObject]:
    params = {"prefix": MOVE_OBJECT_PREFIX, "sync": TABLE_SYNC_SLOT.pattern}
    return [MoveObject(*row) for row in conn.execute(MOVE_OBJECTS, params).fetchall()]


# Subscriptions by server (system identifier), then by oid.
Subscribers = dict[str, dict[int, str]]


def _subscribers(dsns: dict[str, str]) -> Subscribers:
    """Every subscription of each audited server (one database per server: ``dsns`` by system identifier).

    A server that cannot be read now is left out: its table-sync slots are
    then unattributed (a warning), never orphans on a guess.
    """
    found: Subscribers = {}
    for dsn in dsns.values():
        try:
            with psycopg.connect(libpq(dsn), autocommit=True, connect_timeout=10) as conn:
                rows = conn.execute(SUBSCRIPTIONS).fetchall()
        except psycopg.Error:
            continue
        for server, oid, name in rows:
            subscriptions = found.setdefault(server, {})
            if oid is not None:
                subscriptions[int(oid)] = name
    return found


def _live_move_names(catalog_dsn: str) -> set[str]:
    with psycopg.connect(libpq(catalog_dsn), autocommit=True, connect_timeout=10) as conn:
        return {move_object_name(row[0]) for row in conn.execute(LIVE_MOVES).fetchall()}


def _still_there(dsn: str, objects: list[MoveObject]) -> list[MoveObject]:
    """Those of ``objects`` the database still has (on error: all of them, so nothing goes unreported)."""
    try:
        with psycopg.connect(libpq(dsn), autocommit=True, connect_timeout=10) as conn:
            now = {(o.kind, o.name) for o in _move_objects(conn)}
    except psycopg.Error:
        return objects
    return [o for o in objects if (o.kind, o.name) in now]


def _table_sync_owner(name: str, subscribers: Subscribers, live: set[str]) -> tuple[str, str]:
    """Whose table-sync slot ``name`` is: a verdict and, for a slot no live move owns, its description.

    ``live``: a running move's subscription owns it; ``foreign``: a subscription
    that is not a move's; ``orphan``: a move's subscription, of no unfinished
    move; ``gone``: its subscription no longer exists; ``unknown``: its
    subscriber is a server the doctor does not audit.
    """
    match = TABLE_SYNC_SLOT.match(name)
    assert match is not None  # the query selects only names of this form
    oid, server = int(match.group(1)), match.group(3)
    subscriptions = subscribers.get(server)
    if subscriptions is None:
        return "unknown", f"of a subscription on a server the doctor does not audit (system identifier {server})"
    subscription = subscriptions.get(oid)
    if subscription is None:
        return "gone", f"of a subscription that no longer exists (oid {oid} on the server {server})"
    if not subscription.startswith(MOVE_OBJECT_PREFIX):
        return "foreign", ""
    if subscription in live:
        return "live", ""
    return "orphan", f"of subscription {subscription}, of no unfinished move"


def _check_move_objects(report: TargetReport, dsn: str | None, live: set[str], subscribers: Subscribers) -> None:
    """Orphaned move objects are findings; a live move's slot the server is about to drop is a warning.

    The catalog is read after the databases, and an orphan candidate is looked
    for again after that: a move's objects exist only after its job row, and
    are dropped before the job is marked finished, so a move that starts or
    ends while the doctor runs is never reported as an orphan. A table-sync
    slot whose subscription is gone, or is on a server not audited, cannot be
    traced to a move: while any move runs it is a warning (it may be that
    move's, being dropped), otherwise a finding.
    """
    candidates: list[tuple[MoveObject, str]] = []
    owned: list[MoveObject] = []
    for item in report.move_objects:
        if item.kind != "table-sync slot":
            if item.name in live:
                owned.append(item)
            else:
                candidates.append((item, f"{item.kind} of no unfinished move"))
            continue
        verdict, whose = _table_sync_owner(item.name, subscribers, live)
        if verdict == "live":
            owned.append(item)
        elif verdict == "orphan" or (verdict in ("gone", "unknown") and not live):
            candidates.append((item, f"table-sync slot {whose}"))
        elif verdict != "foreign":
            drop = DROP_HINTS[item.kind].format(name=item.name)
            report.warnings.append(
                Finding(
                    "table_sync_slot_unattributed",
                    item.name,
                    f"table-sync slot {whose}, seen while a move runs: if it is still there once no move runs, "
                    f"drop it with: {drop}",
                )
            )
    if candidates and dsn is not None:
        still = set(_still_there(dsn, [item for item, _ in candidates]))
        candidates = [(item, what) for item, what in candidates if item in still]
    for item, what in candidates:
        retained = f" and retains {item.retained} of WAL" if item.retained else ""
        drop = DROP_HINTS[item.kind].format(name=item.name)
        report.findings.append(Finding("move_orphan", item.name, f"{what}{retained}; drop it with: {drop}"))
    for item in owned:
        if item.wal_status in AT_RISK:
            report.warnings.append(Finding("move_slot_at_risk", item.name, AT_RISK[item.wal_status].format(item)))


def _audit_target(target: Target, *, app_role: str) -> tuple[TargetReport, str | None]:
    try:
        dsn = target.connect_dsn()
    except SecretUnavailableError as exc:
        report = TargetReport(name=target.name, kind=target.kind, dsn=redact(target.dsn))
        report.findings.append(Finding("reachable", target.name, f"credentials unavailable: {exc}"))
        return report, None
    return audit_database(name=target.name, kind=target.kind, dsn=dsn, app_role=app_role), dsn


def run_doctor(*, catalog_dsn: str, pool_dsn: str, app_role: str) -> dict[str, Any]:
    """Audit the pool and every ready silo; return the JSON-able report."""
    audited = [_audit_target(t, app_role=app_role) for t in load_targets(catalog_dsn, pool_dsn)]
    # After the databases, whose slots name the subscriptions: a subscription
    # seen missing here was dropped after its slot was listed. Only when there
    # is a table-sync slot to trace (usually none): a connection per server.
    syncing = any(o.kind == "table-sync slot" for r, _ in audited for o in r.move_objects)
    servers = {r.system_identifier: dsn for r, dsn in audited if r.system_identifier and dsn} if syncing else {}
    subscribers = _subscribers(servers)
    live = _live_move_names(catalog_dsn)  # after the databases: see _check_move_objects
    for report, dsn in audited:
        _check_move_objects(report, dsn, live, subscribers)
    reports = [report for report, _ in audited]
    findings = sum(len(r.findings) for r in reports)
    return {"ok": findings == 0, "findings": findings, "targets": [asdict(r) for r in reports]}
