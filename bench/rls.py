"""RLS-scoped indexed queries vs the same queries with an explicit ``WHERE tenant_id``, no RLS.

The pool's real ``projects`` table (its real policy and indexes) is filled
with ``BENCH_RLS_ROWS`` rows (default 5M) over ``BENCH_RLS_TENANTS`` tenants
(default 10k), skewed: one tenant holds a fifth of the rows, nine hold 2% each,
the rest share what is left. For a large, a medium and a few small tenants we
time each query three ways, taking turns run by run, on long-lived connections:

* ``service``: the statement the tenant API runs, as the application role, in a
  transaction whose tenant context was bound with
  ``set_config('app.current_tenant_id', $1, true)``: the policy plus the
  service's own predicate on the bound setting;
* ``policy_only``: the same, naming no tenant at all: only the policy scopes it;
* ``explicit``: the owner role (BYPASSRLS: no policy applies) with
  ``WHERE tenant_id = $n``.

All go through asyncpg's prepared-statement cache and the large tenant is
queried first on each connection, which is the order that exposes the
cached-plan trap (PITFALLS.md: a plan built for the first tenant kept for the
next). Client-side latency is the headline; server-side execution time from
``EXPLAIN (ANALYZE)`` is reported as well, since a loopback round trip is most
of a sub-millisecond query. Goal (issue 3): service / explicit <= 1.1 (median over tenants and queries).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any

import asyncpg
import psycopg

from bench.common import embedded_stack, median
from data_plane.dsn import libpq
from data_plane.resources.projects import service as projects

ROWS = int(os.environ.get("BENCH_RLS_ROWS", "5000000"))
TENANTS = int(os.environ.get("BENCH_RLS_TENANTS", "10000"))
ROUNDS = int(os.environ.get("BENCH_RLS_ROUNDS", "5"))
ITERATIONS = int(os.environ.get("BENCH_RLS_ITERATIONS", "200"))
GOAL = 1.1
COLUMNS = projects.COLUMNS

PAGE = 51  # the API's default page size (50) plus the one row that tells whether a next page exists

# name -> {side: SQL}. ``service`` is the statement the tenant API runs (RLS plus
# a predicate on the bound setting, data_plane.resources.projects.service);
# ``policy_only`` names no tenant at all; ``explicit`` is the no-RLS baseline,
# its tenant always the last parameter.
QUERIES: dict[str, dict[str, str]] = {
    "list_page": {
        "service": projects.LIST_FIRST,
        "policy_only": f"SELECT {COLUMNS} FROM projects ORDER BY created_at, id LIMIT $1",
        "explicit": f"SELECT {COLUMNS} FROM projects WHERE tenant_id = $2 ORDER BY created_at, id LIMIT $1",
    },
    "get_by_id": {
        "service": projects.GET,
        "policy_only": f"SELECT {COLUMNS} FROM projects WHERE id = $1",
        "explicit": f"SELECT {COLUMNS} FROM projects WHERE tenant_id = $2 AND id = $1",
    },
    "next_page": {
        "service": projects.LIST_AFTER,
        "policy_only": f"SELECT {COLUMNS} FROM projects WHERE (created_at, id) > ($2, $3) "
        "ORDER BY created_at, id LIMIT $1",
        "explicit": f"SELECT {COLUMNS} FROM projects WHERE tenant_id = $4 AND (created_at, id) > ($2, $3) "
        "ORDER BY created_at, id LIMIT $1",
    },
}
SIDES = ("service", "policy_only", "explicit")


def _tenant_sizes() -> list[int]:
    """Row count per tenant: 20% for one, 2% for each of nine, the rest spread evenly."""
    large = ROWS // 5
    medium = ROWS // 50
    rest = ROWS - large - 9 * medium
    small_count = TENANTS - 10
    return (
        [large]
        + [medium] * 9
        + [rest // small_count + (1 if i < rest % small_count else 0) for i in range(small_count)]
    )


def _seed(pool_url: str) -> list[tuple[uuid.UUID, int]]:
    sizes = _tenant_sizes()
    tenants = [(uuid.uuid4(), n) for n in sizes]
    with psycopg.connect(libpq(pool_url), autocommit=True) as conn:
        conn.execute("SET synchronous_commit = off")
        conn.execute("SET maintenance_work_mem = '512MB'")
        conn.execute("CREATE TEMP TABLE bench_sizes (tenant_id uuid, n int)")
        with conn.cursor().copy("COPY bench_sizes FROM STDIN") as copy:
            for row in tenants:
                copy.write_row(row)
        # Rows arrive interleaved across tenants (ordered by a random key), as
        # they would in a live pool, so no tenant's rows sit contiguously.
        conn.execute(
            "INSERT INTO projects (tenant_id, id, name, created_at, updated_at) "
            "SELECT s.tenant_id, gen_random_uuid(), 'project ' || g, "
            "       now() - make_interval(secs => g), now() - make_interval(secs => g) "
            "FROM bench_sizes s CROSS JOIN LATERAL generate_series(1, s.n) g ORDER BY random()"
        )
        conn.execute("VACUUM ANALYZE projects")
    return tenants


def _pick(tenants: list[tuple[uuid.UUID, int]]) -> dict[str, uuid.UUID]:
    return {
        "large": tenants[0][0],
        "medium": tenants[1][0],
        "small_1": tenants[10][0],
        "small_2": tenants[len(tenants) // 2][0],
        "small_3": tenants[-1][0],
    }


async def _args(owner: asyncpg.Connection, tenant: uuid.UUID) -> dict[str, tuple[Any, ...]]:
    """Parameters of each query for one tenant: a row in the middle of its first page."""
    rows = await owner.fetch(
        "SELECT id, created_at FROM projects WHERE tenant_id = $1 ORDER BY created_at, id LIMIT 25", tenant
    )
    mid = rows[-1]
    return {"list_page": (PAGE,), "get_by_id": (mid["id"],), "next_page": (PAGE, mid["created_at"], mid["id"])}


async def _time(conn: asyncpg.Connection, tenant: uuid.UUID, sql: str, args: tuple[Any, ...], *, rls: bool) -> float:
    """Client-side latency (ms) of one run of ``sql`` in its own transaction."""
    async with conn.transaction():
        if rls:
            await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant))
        start = time.perf_counter()
        rows = await conn.fetch(sql, *args)
        elapsed = (time.perf_counter() - start) * 1000
    # A query that found nothing would be fast for the wrong reason.
    assert rows, f"no rows for {tenant}: tenant context not applied?"
    return elapsed


async def _execution_ms(
    conn: asyncpg.Connection, tenant: uuid.UUID, sql: str, args: tuple[Any, ...], *, rls: bool
) -> float:
    """Server-side execution time from EXPLAIN (ANALYZE); median of 21 runs."""
    times = []
    for _ in range(21):
        async with conn.transaction():
            if rls:
                await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant))
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        times.append(float(json.loads(plan)[0]["Execution Time"]))
    return median(times)


async def _plan(conn: asyncpg.Connection, tenant: uuid.UUID, sql: str, args: tuple[Any, ...]) -> str:
    """The scan of the plan built for these values (a prepared statement may later run a generic one)."""
    async with conn.transaction():
        await conn.execute("SELECT set_config('app.current_tenant_id', $1, true)", str(tenant))
        lines = [str(r[0]) for r in await conn.fetch(f"EXPLAIN {sql}", *args)]
    return next((line.strip().lstrip("-> ") for line in lines if "Scan" in line), lines[0])


async def _measure(app_url: str, owner_url: str, picked: dict[str, uuid.UUID]) -> dict[str, Any]:
    # One connection per side, as a server's pool would keep them: the
    # prepared-statement cache (and any generic plan) carries across tenants.
    conns = {
        "service": await asyncpg.connect(libpq(app_url)),
        "policy_only": await asyncpg.connect(libpq(app_url)),
        "explicit": await asyncpg.connect(libpq(owner_url)),
    }
    try:
        args = {label: await _args(conns["explicit"], tenant) for label, tenant in picked.items()}

        def call(label: str, qname: str, side: str) -> tuple[asyncpg.Connection, str, tuple[Any, ...], bool]:
            a = args[label][qname]
            if side == "explicit":
                return conns[side], QUERIES[qname][side], (*a, picked[label]), False
            return conns[side], QUERIES[qname][side], a, True

        samples: dict[str, dict[str, dict[str, list[float]]]] = {
            label: {q: {side: [] for side in SIDES} for q in QUERIES} for label in picked
        }
        for round_no in range(ROUNDS):
            order = SIDES if round_no % 2 == 0 else tuple(reversed(SIDES))  # alternate who goes first
            for label, tenant in picked.items():  # "large" first: the cached-plan trap order
                for qname in QUERIES:
                    # The sides take turns query by query, so a noisy moment hits all of them.
                    runs: dict[str, list[float]] = {side: [] for side in SIDES}
                    for _ in range(ITERATIONS):
                        for side in order:
                            conn, sql, a, rls = call(label, qname, side)
                            runs[side].append(await _time(conn, tenant, sql, a, rls=rls))
                    for side in SIDES:
                        samples[label][qname][side].append(median(runs[side]))
        client: dict[str, dict[str, dict[str, float]]] = {}
        server: dict[str, dict[str, dict[str, float]]] = {}
        plans: dict[str, str] = {}
        for label, tenant in picked.items():
            client[label], server[label] = {}, {}
            for qname in QUERIES:
                med = {side: median(samples[label][qname][side]) for side in SIDES}
                client[label][qname] = {
                    **{f"{side}_ms": round(ms, 4) for side, ms in med.items()},
                    "service_ratio": round(med["service"] / med["explicit"], 3),
                    "policy_only_ratio": round(med["policy_only"] / med["explicit"], 3),
                }
                server[label][qname] = {}
                for side in SIDES:
                    conn, sql, a, rls = call(label, qname, side)
                    server[label][qname][side] = round(await _execution_ms(conn, tenant, sql, a, rls=rls), 4)
                for side in ("service", "policy_only"):
                    conn, sql, a, _ = call(label, qname, side)
                    plans[f"{label}/{qname}/{side}"] = await _plan(conn, tenant, sql, a)
    finally:
        for conn in conns.values():
            await conn.close()
    return {"client_median_ms": client, "server_execution_ms": server, "custom_plans": plans}


def _ratios(client: dict[str, dict[str, dict[str, float]]], key: str) -> list[float]:
    return [q[key] for per_q in client.values() for q in per_q.values()]


def run() -> dict[str, Any]:
    with embedded_stack() as (_stack, endpoints):
        start = time.monotonic()
        tenants = _seed(endpoints.pool_url)
        seed_seconds = time.monotonic() - start
        picked = _pick(tenants)
        sizes = dict(tenants)
        result = asyncio.run(_measure(endpoints.app_pool_url, endpoints.pool_url, picked))
    service = _ratios(result["client_median_ms"], "service_ratio")
    policy = _ratios(result["client_median_ms"], "policy_only_ratio")
    return {
        "benchmark": "RLS-scoped indexed queries vs explicit WHERE tenant_id without RLS (pool projects table)",
        "setup": {
            "rows": ROWS,
            "tenants": TENANTS,
            "tenant_rows": {label: sizes[t] for label, t in picked.items()},
            "rounds": ROUNDS,
            "iterations_per_round": ITERATIONS,
            "page": PAGE,
            "seed_seconds": round(seed_seconds, 1),
            "postgres": "embedded pgserver 16, unix socket, asyncpg prepared statements",
        },
        **result,
        "service_ratio": {"median": round(median(service), 3), "worst": round(max(service), 3)},
        "policy_only_ratio": {"median": round(median(policy), 3), "worst": round(max(policy), 3)},
        "goals": {"ratio_max": GOAL, "applies_to": "median over tenants and queries, service form"},
        "goals_met": median(service) <= GOAL,
        "summary": f"RLS/explicit (API's queries) median {median(service):.3f}x, worst {max(service):.3f}x; "
        f"policy alone median {median(policy):.3f}x, worst {max(policy):.3f}x "
        f"({ROWS:,} rows, {TENANTS:,} tenants)",
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2, default=str))
