"""Fleet migration benchmark: pool + 200 local silo databases on embedded PostgreSQL.

Measures, on one machine (catalog, pool and every silo on two local clusters):

* ``status`` -- one version query per database, run concurrently (goal ≤ 5 s);
* a no-op ``upgrade`` -- interlock + status + nothing to do (goal ≤ 5 s);
* a real small migration (add a column with a default and an index, and back)
  at concurrency 1 vs 8, and the speedup;
* the same two read paths end to end through the ``tenantctl`` CLI once
  (interpreter start and imports included).

Comparison point from issue 7: a widely used tenant-migration tool spends 12
minutes on a no-op run over 900 tenants (it opens a migration context per
tenant). Run: ``python -m bench fleet`` (or ``make bench``); results go to
``bench/results/fleet.json``.
"""

from __future__ import annotations

import functools
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

from bench.common import embedded_stack
from control_plane import bootstrap, schema
from control_plane.fleet import FleetOptions, run_fleet, status_of
from control_plane.fleet.runner import mp_context
from control_plane.fleet.targets import load_targets
from control_plane.stack import Endpoints
from data_plane.dsn import libpq, with_database, with_user

SILOS = int(os.environ.get("TENANTCTL_BENCH_SILOS", "200"))
REPEAT_READS = 5
REPEAT_MIGRATIONS = 2
GOAL_S = 5.0
REFERENCE: dict[str, Any] = {
    "tool": "a widely used tenant-migration tool (per issue 7)",
    "noop_run_seconds": 720,
    "tenants": 900,
    "noop_seconds_per_tenant": round(720 / 900, 3),
}

SMALL_MIGRATION = '''
"""Bench: a small real migration.

Revision ID: {revision}
Revises: {down}
"""
import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"))
    op.create_index("ix_tasks_tenant_id_priority", "tasks", ["tenant_id", "priority"])


def downgrade() -> None:
    op.drop_index("ix_tasks_tenant_id_priority", table_name="tasks")
    op.drop_column("tasks", "priority")
'''


def _scripts(root: Path) -> str:
    dest = root / "tenant"
    shutil.copytree(schema.MIGRATIONS_DIR / "tenant", dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    # On top of the project's real head, continuing its numbering.
    head = schema.head(schema.Stream.TENANT)
    prefix, _, number = head.rpartition("_")
    revision = f"{prefix}_{int(number) + 1:0{len(number)}d}"
    body = SMALL_MIGRATION.format(revision=revision, down=head)
    (dest / "versions" / "bench_small_migration.py").write_text(textwrap.dedent(body))
    return str(dest)


def _create_silos(endpoints: Endpoints, count: int) -> float:
    roles = bootstrap.Roles()
    admin = endpoints.silo_server_url
    template = "bench_silo_tpl"
    bootstrap.ensure_database(admin, template, roles)
    schema.upgrade(schema.Stream.TENANT, with_user(with_database(admin, template), roles.owner))
    names = [f"bench_silo_{i:04d}" for i in range(count)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda n: bootstrap.ensure_database(admin, n, roles, template=template), names))
    elapsed = time.monotonic() - started
    with psycopg.connect(libpq(endpoints.catalog_url)) as cat:
        for i, name in enumerate(names):
            dsn = with_user(with_database(admin, name), roles.owner)
            row = cat.execute(
                "INSERT INTO locations (name, kind, provider, database, dsn, status) "
                "VALUES (%s, 'silo', 'local', %s, %s, 'ready') RETURNING id",
                (f"silo-{i:04d}", name, dsn),
            ).fetchone()
            assert row is not None
            cat.execute(
                "INSERT INTO tenants (slug, name, tier, status, placement, location_id) "
                "VALUES (%s, %s, 'enterprise', 'active', 'silo', %s)",
                (f"bench-silo-{i:04d}", f"bench silo {i}", row[0]),
            )
    return elapsed


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    times, last = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        last = fn()
        times.append(time.perf_counter() - started)
    return times, last


def _stats(times: list[float]) -> dict[str, Any]:
    return {"median_s": round(statistics.median(times), 3), "runs_s": [round(t, 3) for t in times]}


def _cli(endpoints: Endpoints, state_dir: str, *args: str) -> float:
    env = {
        **os.environ,
        "TENANTCTL_CATALOG_URL": endpoints.catalog_url,
        "TENANTCTL_POOL_URL": endpoints.pool_url,
        "TENANTCTL_SILO_SERVER_URL": endpoints.silo_server_url,
        "TENANTCTL_STATE_DIR": state_dir,
    }
    tenantctl = Path(sys.executable).parent / "tenantctl"
    started = time.perf_counter()
    proc = subprocess.run(
        [str(tenantctl), "migrate", *args, "--json"], env=env, capture_output=True, text=True, check=False
    )
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"tenantctl migrate {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return elapsed


def run() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="tcbench-fleet-") as tmp, embedded_stack() as (_, endpoints):
        scripts = _scripts(Path(tmp))
        create_s = _create_silos(endpoints, SILOS)
        catalog, pool = endpoints.catalog_url, endpoints.pool_url
        targets = load_targets(catalog, pool)
        assert len(targets) == SILOS + 1

        status_times, status_report = _timed(lambda: status_of(load_targets(catalog, pool)), REPEAT_READS)
        assert status_report.exit_code == 0, status_report.counts()

        def noop() -> Any:
            report = run_fleet(catalog, pool, FleetOptions())
            assert report.counts()["skipped-up-to-date"] == SILOS + 1 and report.workers == 0
            return report

        noop_times, _ = _timed(noop, REPEAT_READS)

        # The fork server imports the worker stack once per process (a CLI run
        # pays it once); measured apart so the first timed run does not carry it.
        fork_started = time.perf_counter()
        with ProcessPoolExecutor(max_workers=1, mp_context=mp_context()) as warm:
            warm.submit(os.getpid).result()
        fork_server_s = time.perf_counter() - fork_started

        migrations: dict[int, list[float]] = {1: [], 8: []}
        downgrades: list[float] = []
        for _ in range(REPEAT_MIGRATIONS):
            for concurrency in (1, 8):
                up = FleetOptions(concurrency=concurrency, script_location=scripts)
                times, report = _timed(functools.partial(run_fleet, catalog, pool, up), 1)
                assert report.counts()["succeeded"] == SILOS + 1, report.counts()
                migrations[concurrency] += times
                down = FleetOptions(action="downgrade", revision="-1", concurrency=8, script_location=scripts)
                times, report = _timed(functools.partial(run_fleet, catalog, pool, down), 1)
                assert report.counts()["succeeded"] == SILOS + 1, report.counts()
                downgrades += times

        state_dir = str(Path(tmp) / "state")
        cli_status_s = _cli(endpoints, state_dir, "status")
        cli_noop_s = _cli(endpoints, state_dir, "upgrade")

    c1 = statistics.median(migrations[1])
    c8 = statistics.median(migrations[8])
    status_med = statistics.median(status_times)
    noop_med = statistics.median(noop_times)
    per_target_noop = noop_med / (SILOS + 1)
    result: dict[str, Any] = {
        "targets": SILOS + 1,
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "setup": {"create_silo_databases_s": round(create_s, 1), "fork_server_warmup_s": round(fork_server_s, 3)},
        "status": {**_stats(status_times), "goal_s": GOAL_S, "meets_goal": status_med <= GOAL_S},
        "noop_upgrade": {
            **_stats(noop_times),
            "goal_s": GOAL_S,
            "meets_goal": noop_med <= GOAL_S,
            "per_target_ms": round(per_target_noop * 1000, 2),
            "extrapolated_900_targets_s": round(per_target_noop * 900, 2),
        },
        "cli_end_to_end": {"status_s": round(cli_status_s, 3), "noop_upgrade_s": round(cli_noop_s, 3)},
        "small_migration": {
            "description": "add a NOT NULL column with a default and an index on tasks, pool + every silo",
            "concurrency_1": _stats(migrations[1]),
            "concurrency_8": _stats(migrations[8]),
            "speedup_8_vs_1": round(c1 / c8, 2),
            "downgrade_concurrency_8": _stats(downgrades),
        },
        "reference": {
            **REFERENCE,
            "tenantctl_noop_speedup_per_tenant": round(REFERENCE["noop_seconds_per_tenant"] / per_target_noop, 1),
        },
    }
    result["summary"] = (
        f"{SILOS + 1} targets: status {status_med:.2f}s, no-op upgrade {noop_med:.2f}s "
        f"(goal ≤ {GOAL_S:g}s; reference tool: 720s for 900 tenants), "
        f"small migration c=1 {c1:.1f}s vs c=8 {c8:.1f}s (speedup {c1 / c8:.2f}x)"
    )
    return result


if __name__ == "__main__":
    import json

    document = run()
    out = Path(__file__).resolve().parent / "results" / "fleet.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(document["summary"])
