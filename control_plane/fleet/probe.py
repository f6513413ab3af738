"""Read every target's schema revision: one query per database, many databases at once.

Read-only, so threads are safe here (no Alembic context is involved; psycopg
releases the GIL while it waits on the network). This is what makes a no-op
run cheap: PITFALLS "Migrations across many databases" -- tools that open a
full migration context per tenant spend minutes on a no-op run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psycopg
from psycopg import errors

from control_plane.fleet.models import Target
from data_plane.dsn import libpq
from data_plane.secrets import SecretUnavailableError

APPLICATION_NAME = "tenantctl migrate status"
CONNECT_TIMEOUT_S = 5
DEFAULT_PROBE_CONCURRENCY = 32


@dataclass(frozen=True)
class Probe:
    """A target's revision (None: unversioned) or why it could not be read."""

    revision: str | None
    duration_s: float
    error: str | None = None

    @property
    def reachable(self) -> bool:
        return self.error is None


def read_revision(dsn: str) -> str | None:
    """The revision recorded in ``public.alembic_version`` with a single query.

    A missing version table is "unversioned", detected from the error of that
    same query rather than from a second catalog lookup. More than one row
    (a branched history) is returned joined with ``+`` so it shows as unknown.
    """
    with psycopg.connect(
        libpq(dsn), autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, application_name=APPLICATION_NAME
    ) as conn:
        try:
            rows = conn.execute("SELECT version_num FROM public.alembic_version ORDER BY 1").fetchall()
        except errors.UndefinedTable:
            return None
    if not rows:
        return None
    return "+".join(str(r[0]) for r in rows)


def _probe(target: Target) -> Probe:
    started = time.monotonic()
    try:
        revision = read_revision(target.connect_dsn())
    except (psycopg.Error, SecretUnavailableError) as exc:
        return Probe(revision=None, duration_s=time.monotonic() - started, error=_one_line(exc))
    return Probe(revision=revision, duration_s=time.monotonic() - started)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


def probe_all(targets: Sequence[Target], *, concurrency: int = DEFAULT_PROBE_CONCURRENCY) -> dict[str, Probe]:
    """Probe every target concurrently; keyed by target name, in target order."""
    if not targets:
        return {}
    workers = max(1, min(concurrency, len(targets)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tenantctl-probe") as pool:
        probes = list(pool.map(_probe, targets))
    return {target.name: probe for target, probe in zip(targets, probes, strict=True)}
