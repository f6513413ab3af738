"""Control-plane gauges read from the catalog at scrape time: tenants, jobs, moves, usage flushes.

Jobs (onboarding, offboarding, promotion and demotion -- the moves) are rows of
the catalog's ``jobs`` table, updated by whichever worker runs them; reading
them when Prometheus scrapes keeps every replica of the admin API truthful
without the workers exporting anything. Labels are bounded (kind, status,
step): never a tenant or job id.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, Gauge, write_to_textfile
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

if TYPE_CHECKING:
    from control_plane.fleet.runner import FleetReport

MOVE_KINDS = ("promotion", "demotion")

JOBS = sa.text("SELECT kind, status, count(*) AS n FROM jobs GROUP BY kind, status")
RUNNING = sa.text(
    """
SELECT kind, coalesce(step, '') AS step, count(*) AS n, avg(progress) AS progress,
       max(extract(epoch FROM now() - created_at)) AS oldest
  FROM jobs WHERE status IN ('pending', 'running') GROUP BY kind, coalesce(step, '')
"""
)
TENANTS = sa.text("SELECT tier, placement, status, count(*) AS n FROM tenants GROUP BY tier, placement, status")
USAGE_LAG = sa.text("SELECT extract(epoch FROM now() - max(updated_at)) FROM tenant_usage")


class CatalogMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Gauge(
            "tenantctl_jobs", "Jobs in the catalog by kind and status", ["kind", "status"], registry=registry
        )
        self.unfinished = Gauge(
            "tenantctl_jobs_unfinished", "Pending or running jobs by kind and step", ["kind", "step"], registry=registry
        )
        self.progress = Gauge(
            "tenantctl_job_progress",
            "Mean progress (0..1) of unfinished jobs by kind and step",
            ["kind", "step"],
            registry=registry,
        )
        self.oldest = Gauge(
            "tenantctl_job_oldest_unfinished_seconds",
            "Age of the oldest unfinished job by kind",
            ["kind"],
            registry=registry,
        )
        self.moves = Gauge(
            "tenantctl_moves_in_progress", "Promotions and demotions pending or running", registry=registry
        )
        self.tenants = Gauge(
            "tenantctl_tenants",
            "Tenants by tier, placement and status",
            ["tier", "placement", "status"],
            registry=registry,
        )
        self.usage_lag = Gauge(
            "tenantctl_usage_last_flush_age_seconds",
            "Seconds since any data plane last flushed usage",
            registry=registry,
        )

    async def refresh(self, sessions: async_sessionmaker[AsyncSession]) -> None:
        async with sessions() as session:
            jobs = (await session.execute(JOBS)).all()
            running = (await session.execute(RUNNING)).all()
            tenants = (await session.execute(TENANTS)).all()
            lag = (await session.execute(USAGE_LAG)).scalar()
        # clear(): a kind/status that has no row any more must not keep its last value.
        for gauge in (self.jobs, self.unfinished, self.progress, self.oldest, self.tenants):
            gauge.clear()
        for row in jobs:
            self.jobs.labels(row.kind, row.status).set(row.n)
        oldest: dict[str, float] = {}
        moves = 0
        for row in running:
            self.unfinished.labels(row.kind, row.step).set(row.n)
            self.progress.labels(row.kind, row.step).set(float(row.progress or 0))
            oldest[row.kind] = max(oldest.get(row.kind, 0.0), float(row.oldest or 0))
            if row.kind in MOVE_KINDS:
                moves += row.n
        for row in tenants:
            self.tenants.labels(row.tier, row.placement, row.status).set(row.n)
        for kind, age in oldest.items():
            self.oldest.labels(kind).set(age)
        self.moves.set(moves)
        self.usage_lag.set(float(lag) if lag is not None else float("nan"))


def write_fleet_metrics(report: FleetReport, path: Path) -> None:
    """Write a fleet migration run's results for the node_exporter textfile collector.

    ``tenantctl migrate`` is a batch job, not a server: like any Prometheus
    batch job it leaves its last result in a file that a collector scrapes
    (written atomically by prometheus_client). Labels: action, target kind and
    status -- never a tenant.
    """
    registry = CollectorRegistry()
    targets = Gauge(
        "tenantctl_fleet_migration_targets",
        "Targets of the last fleet migration run by action, kind and status",
        ["action", "kind", "status"],
        registry=registry,
    )
    for result in report.results:
        targets.labels(report.action, result.kind, result.status.value).inc()
    Gauge(
        "tenantctl_fleet_migration_failed",
        "1 if the last run failed, stopped early or was interrupted",
        registry=registry,
    ).set(int(report.failed))
    Gauge("tenantctl_fleet_migration_duration_seconds", "Duration of the last run", registry=registry).set(
        report.duration_s
    )
    Gauge(
        "tenantctl_fleet_migration_last_run_timestamp_seconds", "When the last run ended", registry=registry
    ).set_to_current_time()
    write_to_textfile(str(path), registry)
