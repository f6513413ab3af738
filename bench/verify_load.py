"""What a move's bulk checksums cost the tenants still writing: with and without parallel workers.

Incremental verification (``control_plane.moves.verify``) starts with a full
count and checksum of the moving tenant's rows on both sides at once, in two
pinned snapshots. This benchmark runs that pair of scans on a 1M-row tenant
of the pool while the open-loop writer of ``bench.moves`` posts 200
projects/s through the tenant API, alternately as the product runs it
(``max_parallel_workers_per_gather = 0`` in the snapshot's transaction) and
with PostgreSQL's default of 2 parallel workers per scan (the baseline), and
reports each run's duration and the latency of the writes sent while it ran
(and up to 0.5 s after). Medians over the rounds, and their ratios.
"""

from __future__ import annotations

import statistics
import threading
import time
import uuid
from typing import Any

from bench.common import embedded_stack, free_port, server_process, tenant_api
from bench.moves import _percentile, _seed, writer_process
from bench.seed import add_pool_tenants
from control_plane.moves import verify
from control_plane.moves.tables import row_digest

ROUNDS = 4
SETTLE_SECONDS = 3.0  # between scans: the writer's latency back to normal


def _scan(dsn: str, tenant_id: uuid.UUID, workers: int | None) -> None:
    """One side's bulk checksums in the product's snapshot; with ``workers``, that many put back."""
    with verify.pinned_snapshot(dsn) as conn:
        if workers is not None:
            conn.execute("SELECT set_config('max_parallel_workers_per_gather', %s, true)", (str(workers),))
        tables = ["projects", "tasks"]
        verify._checksums(conn, tables, {table: row_digest(conn, table) for table in tables}, tenant_id)


def _both_sides(dsn: str, tenant_id: uuid.UUID, workers: int | None) -> tuple[float, float]:
    threads = [threading.Thread(target=_scan, args=(dsn, tenant_id, workers)) for _ in range(2)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return start, time.monotonic()


def _latencies(log: list[dict[str, Any]], start: float, end: float) -> list[float]:
    return sorted((e["acked"] - e["sent"]) * 1000 for e in log if start <= e["sent"] <= end + 0.5)


def run() -> dict[str, Any]:
    with embedded_stack() as (stack, endpoints):
        tenant_id = add_pool_tenants(endpoints, 5)[0]
        _seed(endpoints, tenant_id)
        token, env = tenant_api(stack, endpoints, tenant_id)
        port = free_port()
        windows: list[tuple[str, float, float]] = []
        with (
            server_process(["-m", "bench.servers", "tenantctl", str(port)], port=port, env=env),
            writer_process(port, token) as log,
        ):
            time.sleep(2.0)
            for _ in range(ROUNDS):
                for name, workers in (("baseline", 2), ("tenantctl", None)):
                    windows.append((name, *_both_sides(endpoints.pool_url, tenant_id, workers)))
                    time.sleep(SETTLE_SECONDS)
    runs: dict[str, list[dict[str, float | None]]] = {"baseline": [], "tenantctl": []}
    for name, start, end in windows:
        latency = _latencies(log, start, end)
        runs[name].append(
            {
                "seconds": round(end - start, 3),
                "write_p50_ms": _percentile(latency, 0.5),
                "write_p99_ms": _percentile(latency, 0.99),
                "write_max_ms": latency[-1] if latency else None,
            }
        )

    def median(name: str, key: str) -> float:
        return statistics.median(float(r[key] or 0.0) for r in runs[name])

    medians = {name: {key: median(name, key) for key in runs[name][0]} for name in runs}
    ratio = {
        key: round(medians["tenantctl"][key] / medians["baseline"][key], 3) if medians["baseline"][key] else None
        for key in medians["tenantctl"]
    }
    return {
        "benchmark": "bulk checksums of a 1M-row tenant on both sides at once, under 200 writes/s of the tenant API",
        "rounds": ROUNDS,
        "runs": runs,
        "medians": medians,
        "tenantctl_over_baseline": ratio,
        "summary": (
            f"no parallel workers: scans {medians['tenantctl']['seconds']:.2f} s, concurrent writes p99 "
            f"{medians['tenantctl']['write_p99_ms']:.0f} ms; with 2 workers per scan: "
            f"{medians['baseline']['seconds']:.2f} s, p99 {medians['baseline']['write_p99_ms']:.0f} ms "
            f"(medians of {ROUNDS})"
        ),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2, default=str))
