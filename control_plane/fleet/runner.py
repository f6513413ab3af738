"""The fleet migration engine: pool first, a canary wave, then every silo in parallel.

Order and failure semantics (issue 7):

1. every target's revision is read with one query per database, concurrently
   (:mod:`control_plane.fleet.probe`); up-to-date targets are recorded as
   ``skipped-up-to-date`` there and never reach a migration context;
2. the pool is migrated first; if it fails, nothing else runs;
3. then a canary wave of ``canary`` silos (of those needing work); any failure
   there stops the run;
4. then the remaining silos with at most ``concurrency`` migrations at once. A
   failed silo does not stop the others.

A worker process that dies (OOM kill, SIGKILL, a crash in a C extension) is a
failure of the target it was migrating, not of the run: ``concurrent.futures``
then breaks the whole process pool and terminates its other workers, so every
target in flight in that pool is recorded ``failed`` ("worker process died";
its one transaction rolled back unless it had already committed, a re-run
finishes or skips it), a fresh pool replaces the broken one, and the run goes
on by the rules above (a death in the pool or canary wave stops the run, one
among the remaining silos does not) -- as one failing tenant's migration does
not stop a django-tenants run over the others.

When the run stops (pool or canary failure, or Ctrl-C) migrations already in
flight finish (their worker processes ignore SIGINT) and every target not
started is reported ``not-run``. Migrations execute in worker processes, one
at a time per process (see :mod:`control_plane.fleet.worker` for why).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing import forkserver, process
from multiprocessing.context import BaseContext
from pathlib import Path
from typing import Any, Protocol

import psycopg

from control_plane.exceptions import MigrationFailedError
from control_plane.fleet import forkserver_main, worker
from control_plane.fleet.models import Action, Job, Outcome, Target, TargetResult, TargetStatus
from control_plane.fleet.probe import Probe, probe_all, read_revision
from control_plane.fleet.scripts import RevisionError, ScriptInfo
from control_plane.fleet.targets import ALL, load_targets
from control_plane.interlock import FleetLock, fleet_migration_excluded, fleet_migration_lock
from data_plane.exceptions import TenantctlError

DEFAULT_CONCURRENCY = 4
DEFAULT_LOCK_TIMEOUT_S = 10.0


class Progress(Protocol):
    """Receives the run's progress (the CLI draws a rich progress bar from it)."""

    def planned(self, total: int, to_migrate: int) -> None: ...

    def finished(self, result: TargetResult) -> None: ...


class _NoProgress:
    def planned(self, total: int, to_migrate: int) -> None:
        return None

    def finished(self, result: TargetResult) -> None:
        return None


@dataclass(frozen=True)
class FleetOptions:
    action: Action = "upgrade"
    revision: str = "head"
    concurrency: int = DEFAULT_CONCURRENCY
    canary: int = 0
    lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S
    script_location: str | None = None  # None: the project's migrations/tenant (tests point elsewhere)
    app_role: str = "tenantctl_app"
    replication_role: str = "tenantctl_replicator"

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if self.canary < 0:
            raise ValueError("canary must not be negative")


@dataclass
class FleetReport:
    action: Action
    revision: str
    head: str | None
    results: list[TargetResult]
    duration_s: float
    workers: int = 0
    interrupted: bool = False
    stopped_reason: str | None = None
    lock_waited_s: float = 0.0

    @property
    def failed(self) -> bool:
        """True unless every target was migrated or already up to date.

        A run that stopped early (pool or canary failure, a lost interlock,
        Ctrl-C) leaves targets ``not-run``: it did not complete, so ``ok``, the
        exit code and ``tenantctl_fleet_migration_failed`` must say so even
        when no target itself failed -- a stopped run once reported ok/exit 0.
        """
        incomplete = (TargetStatus.FAILED, TargetStatus.NOT_RUN)
        return self.interrupted or self.stopped_reason is not None or any(r.status in incomplete for r in self.results)

    def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in TargetStatus}
        for result in self.results:
            counts[result.status.value] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "revision": self.revision,
            "head": self.head,
            "ok": not self.failed,
            "duration_s": round(self.duration_s, 4),
            "workers": self.workers,
            "interrupted": self.interrupted,
            "stopped_reason": self.stopped_reason,
            "lock_waited_s": round(self.lock_waited_s, 4),
            "summary": self.counts(),
            "targets": [r.to_json() for r in self.results],
        }


_forkserver_lock = threading.Lock()


def _start_forkserver(main_path: str | None) -> None:
    """Start the fork server now (once per process), with the main path in its environment only.

    The variable is removed again at once so that no other child process (a
    ``tenantctl`` run by a test, say) inherits it.
    """
    with _forkserver_lock:
        multiprocessing.get_context("forkserver").set_forkserver_preload(
            ["control_plane.fleet.forkserver_main", "control_plane.fleet.worker"]
        )
        previous = os.environ.get(forkserver_main.MAIN_ENV)
        if main_path is not None:
            os.environ[forkserver_main.MAIN_ENV] = main_path
        try:
            forkserver.ensure_running()
        finally:
            if previous is None:
                os.environ.pop(forkserver_main.MAIN_ENV, None)
            else:
                os.environ[forkserver_main.MAIN_ENV] = previous


def mp_context() -> BaseContext:
    """``forkserver`` where available (cheap workers, no fork of a threaded parent), else ``spawn``.

    Plain ``fork`` is avoided: the parent runs probe threads and psycopg
    connections, and forking a threaded process can deadlock the child.
    The parent's main script is imported once into the fork server (see
    :mod:`control_plane.fleet.forkserver_main`); otherwise every worker
    re-imports it (for ``tenantctl`` the whole CLI stack), which measured ~2 s
    per worker and made concurrency 8 slower than concurrency 1.
    """
    if sys.platform.startswith("linux") and "forkserver" in multiprocessing.get_all_start_methods():
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None)
        main_path: str | None = None
        # Only a main *script* is re-run in workers; ``python -m pkg`` mains are
        # re-imported by name (and skipped for ``__main__`` modules).
        if path and getattr(getattr(main, "__spec__", None), "name", None) is None:
            # The same normalisation spawn.get_preparation_data applies, so the
            # workers' "main already imported?" check matches.
            original_dir = getattr(process, "ORIGINAL_DIR", None)  # untyped in typeshed
            if not Path(path).is_absolute() and original_dir is not None:
                path = str(Path(original_dir) / path)
            main_path = os.path.normpath(path)
        _start_forkserver(main_path)
        return multiprocessing.get_context("forkserver")
    return multiprocessing.get_context("spawn")


@dataclass
class _Run:
    targets: Sequence[Target]
    options: FleetOptions
    progress: Progress
    script: ScriptInfo
    results: dict[str, TargetResult] = field(default_factory=dict)
    executor: ProcessPoolExecutor | None = None
    workers: int = 0
    # Asked before each target starts: None to go on, else why to stop (the interlock was lost).
    may_start: Callable[[], str | None] | None = None
    halted: str | None = None

    def record(self, result: TargetResult) -> None:
        self.results[result.target] = result
        self.progress.finished(result)

    def not_run(self, jobs: Sequence[tuple[Target, Job]], reason: str) -> None:
        for target, _ in jobs:
            if target.name not in self.results:
                self.record(_result(target, TargetStatus.NOT_RUN, None, None, 0.0, reason))

    def start_workers(self, jobs: int) -> None:
        """One process pool for the whole run, sized for all of its jobs (not the first wave's)."""
        self.workers = max(1, min(self.options.concurrency, jobs))
        self.executor = self._new_executor()

    def _new_executor(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=self.workers, mp_context=mp_context(), initializer=worker.init_worker)

    def replace_workers(self, running: dict[Future[Outcome], Target]) -> None:
        """Record every target of a broken pool's in-flight futures, then start a fresh pool.

        Once one worker dies, the pool fails all its pending futures and
        terminates its other workers, and every later ``submit`` raises
        ``BrokenProcessPool`` -- which used to abort the run with a traceback
        and no report. Shutting the broken pool down waits for its manager
        thread, so by then each of its futures has its outcome.
        """
        assert self.executor is not None
        self.executor.shutdown(wait=True, cancel_futures=True)
        for future, target in list(running.items()):
            self.record(TargetResult.of(target, _outcome(future)))
        running.clear()
        self.executor = self._new_executor()

    def submit(self, job: Job, running: dict[Future[Outcome], Target]) -> Future[Outcome]:
        """Submit ``job``; on a pool that broke since the last completion, on a fresh pool."""
        assert self.executor is not None, "start_workers() first"
        try:
            return self.executor.submit(worker.migrate_one, job)
        except BrokenProcessPool:
            self.replace_workers(running)  # this job never started: it goes to the new pool
        try:
            return self.executor.submit(worker.migrate_one, job)
        except BrokenProcessPool as exc:  # a brand-new pool refusing work: fail this target, not the run
            failed: Future[Outcome] = Future()
            failed.set_result(Outcome(TargetStatus.FAILED, None, None, 0.0, _worker_died(exc)))
            return failed

    def wave(self, jobs: Sequence[tuple[Target, Job]]) -> bool:
        """Run ``jobs`` concurrently; return True if all succeeded (or were skipped)."""
        if not jobs:
            return True
        waiting = list(reversed(jobs))
        running: dict[Future[Outcome], Target] = {}
        try:
            while waiting or running:
                # Submitted one by one, as workers free up, so that a lost
                # interlock stops the run before the next target, not after the wave.
                while waiting and len(running) < self.workers and self.halted is None:
                    self.halted = self.may_start() if self.may_start is not None else None
                    if self.halted is None:
                        target, job = waiting.pop()
                        running[self.submit(job, running)] = target
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                broken = False
                for future in done:
                    broken = broken or (not future.cancelled() and isinstance(future.exception(), BrokenProcessPool))
                    self.record(TargetResult.of(running.pop(future), _outcome(future)))
                if broken:
                    self.replace_workers(running)
        except KeyboardInterrupt:
            # Unstarted jobs are never submitted; running ones finish (workers
            # ignore SIGINT) and are recorded, so the report says where each target is.
            for future, target in running.items():
                self.record(TargetResult.of(target, _outcome(future)))
            self.not_run(jobs, "interrupted before it started")
            raise
        if self.halted is not None:
            return False
        return all(self.results[t.name].status is not TargetStatus.FAILED for t, _ in jobs)


def _outcome(future: Future[Outcome]) -> Outcome:
    try:
        return future.result()
    except BrokenProcessPool as exc:
        return Outcome(TargetStatus.FAILED, None, None, 0.0, _worker_died(exc))
    except CancelledError:
        return Outcome(TargetStatus.NOT_RUN, None, None, 0.0, "cancelled")


def _worker_died(exc: BrokenProcessPool) -> str:
    return (
        "worker process died (killed, out of memory or crashed) while this target or one beside it "
        f"was migrating ({exc}); its migration rolled back unless it had committed: re-run to finish it"
    )


def _result(
    target: Target,
    status: TargetStatus,
    before: str | None,
    after: str | None,
    duration_s: float,
    error: str | None = None,
) -> TargetResult:
    return TargetResult.of(target, Outcome(status, before, after, duration_s, error))


def _plan(run: _Run, probes: dict[str, Probe]) -> list[tuple[Target, Job]]:
    """Skipped and unreachable targets are recorded now; the rest become jobs, in target order."""
    opts = run.options
    jobs: list[tuple[Target, Job]] = []
    for target in run.targets:
        probe = probes[target.name]
        if not probe.reachable:
            run.record(
                _result(target, TargetStatus.FAILED, None, None, probe.duration_s, f"unreachable: {probe.error}")
            )
            continue
        try:
            destination = run.script.destination(opts.revision, probe.revision, upgrade=opts.action == "upgrade")
        except RevisionError as exc:
            run.record(_result(target, TargetStatus.FAILED, probe.revision, probe.revision, 0.0, exc.message))
            continue
        if destination == probe.revision:
            run.record(_result(target, TargetStatus.SKIPPED, probe.revision, probe.revision, probe.duration_s))
            continue
        job = Job(
            target=target.name,
            dsn=target.connect_dsn(),  # the probe just read the same secret: cached
            action=opts.action,
            destination=destination,
            app_role=opts.app_role,
            replication_role=opts.replication_role,
            script_location=run.script.location,
            lock_timeout_s=opts.lock_timeout_s,
        )
        jobs.append((target, job))
    return jobs


def migrate_targets(
    targets: Sequence[Target],
    options: FleetOptions,
    *,
    progress: Progress | None = None,
    may_start: Callable[[], str | None] | None = None,
) -> FleetReport:
    """Migrate ``targets`` (pool first if present) without taking the catalog interlock.

    Callers that run against a catalog use :func:`run_fleet`, which holds the
    interlock; this function is the engine underneath. ``may_start`` is asked
    before each target starts: a reason stops the run there (in-flight
    migrations finish, unstarted targets are reported not run).
    """
    started = time.monotonic()
    script = ScriptInfo.load(options.script_location)
    if not ScriptInfo.is_relative(options.revision):
        script.absolute(options.revision)  # an unknown revision fails the whole run up front
    run = _Run(targets=targets, options=options, progress=progress or _NoProgress(), script=script, may_start=may_start)
    probes = probe_all(targets)
    jobs = _plan(run, probes)
    run.progress.planned(len(targets), len(jobs))
    pool_jobs = [(t, j) for t, j in jobs if t.kind == "pool"]
    silo_jobs = [(t, j) for t, j in jobs if t.kind != "pool"]
    canary, rest = silo_jobs[: options.canary], silo_jobs[options.canary :]
    stopped: str | None = None
    interrupted = False
    if jobs:
        run.start_workers(len(jobs))
    try:
        pool_failed = any(r.kind == "pool" and r.status is TargetStatus.FAILED for r in run.results.values())
        if pool_failed or not run.wave(pool_jobs):
            stopped = "the pool failed; silos were not migrated"
        elif not run.wave(canary):
            stopped = f"a canary silo failed; the remaining {len(rest)} silo(s) were not migrated"
        else:
            run.wave(rest)
        if run.halted is not None:
            stopped = f"the migration/move interlock was lost: {run.halted}; unstarted targets were not migrated"
        if stopped:
            run.not_run(jobs, stopped)
    except KeyboardInterrupt:
        interrupted = True
        stopped = "interrupted (Ctrl-C); migrations in flight completed"
        run.not_run(jobs, stopped)
    finally:
        if run.executor is not None:
            run.executor.shutdown(wait=True, cancel_futures=True)
    ordered = [run.results[t.name] for t in targets]
    return FleetReport(
        action=options.action,
        revision=options.revision,
        head=script.head,
        results=ordered,
        duration_s=time.monotonic() - started,
        workers=run.workers,
        interrupted=interrupted,
        stopped_reason=stopped,
    )


@dataclass
class _Exclusion:
    """Before each target (and once at the end): does the run still exclude moves and new silos?

    :meth:`FleetLock.lost` takes a dropped interlock back when no move started,
    but an onboarding may have provisioned and migrated a silo in that gap --
    to the pool's revision *before* this run's pool migration committed. The
    run's targets were loaded once at its start, so such a silo used to be
    neither migrated nor reported while the run said ok. So after every
    re-take the targets are re-read, and any new one stops the run and is
    reported ``not-run``.
    """

    lock: FleetLock
    catalog_dsn: str
    pool_dsn: str
    selector: str
    known: set[str]
    seen_retakes: int = 0
    added: list[Target] = field(default_factory=list)

    def may_start(self) -> str | None:
        reason = self.lock.lost()
        if reason is not None or self.lock.retakes == self.seen_retakes:
            return reason
        self.seen_retakes = self.lock.retakes
        try:
            current = load_targets(self.catalog_dsn, self.pool_dsn, self.selector)
        except (psycopg.Error, TenantctlError) as exc:
            return f"its catalog session ended and the targets could not be re-read ({exc})"
        new = [t for t in current if t.name not in self.known]
        if not new:
            return None
        self.known.update(t.name for t in new)
        self.added.extend(new)
        names = ", ".join(t.name for t in new)
        return f"its catalog session ended and meanwhile {len(new)} target(s) were added ({names})"

    def finish(self, report: FleetReport, progress: Progress) -> None:
        """The last check: a drop during the final migrations would otherwise go unseen."""
        if report.stopped_reason is None:
            reason = self.may_start()
            if reason is not None:
                report.stopped_reason = f"the migration/move interlock was lost: {reason}; re-run the migration"
        for target in self.added:
            result = _result(
                target,
                TargetStatus.NOT_RUN,
                None,
                None,
                0.0,
                "added while the run's interlock session was down; not migrated by this run, re-run",
            )
            report.results.append(result)
            progress.finished(result)


def run_fleet(
    catalog_dsn: str,
    pool_dsn: str,
    options: FleetOptions,
    *,
    selector: str = ALL,
    progress: Progress | None = None,
) -> FleetReport:
    """``tenantctl migrate upgrade|downgrade``: hold the interlock, load targets, migrate.

    Raises :class:`~control_plane.exceptions.OperationLockedError` when another
    runner or a move holds the interlock past ``options.lock_timeout_s`` or a
    tenant is ``'moving'``. A target that appeared while the interlock's
    session was down stops the run and is reported ``not-run`` (see :class:`_Exclusion`).
    """
    shown = progress or _NoProgress()
    with fleet_migration_lock(catalog_dsn, timeout_s=options.lock_timeout_s) as lock:
        targets = load_targets(catalog_dsn, pool_dsn, selector)
        exclusion = _Exclusion(lock, catalog_dsn, pool_dsn, selector, known={t.name for t in targets})
        report = migrate_targets(targets, options, progress=shown, may_start=exclusion.may_start)
        exclusion.finish(report, shown)
    report.lock_waited_s = lock.waited_s
    return report


def pool_revision(pool_dsn: str) -> str | None:
    """The pool's tenant-schema revision (one query; None when unversioned)."""
    return read_revision(pool_dsn)


def migrate_target_to(
    dsn: str,
    revision: str | None,
    *,
    app_role: str = "tenantctl_app",
    replication_role: str = "tenantctl_replicator",
    script_location: str | None = None,
    lock_timeout_s: float = 30.0,
    name: str = "silo",
) -> TargetResult:
    """Upgrade ONE database (a newly provisioned silo) to exactly ``revision``.

    For the provisioning and move workflows: pass :func:`pool_revision` so a
    new silo lands on the pool's revision, never on a different one. The
    migration runs in a separate worker process (Alembic's globals must not be
    shared with whatever else the calling process runs) under the target's
    advisory lock, in one transaction. Idempotent: a database already at
    ``revision`` is reported ``skipped-up-to-date``. Only upgrades: a database
    at a newer or unknown revision raises :class:`MigrationFailedError` (a
    workflow must never downgrade a silo implicitly), as does any failure.
    Blocking: from async code call it through ``asyncio.to_thread``.
    """
    script = ScriptInfo.load(script_location)
    target = Target(name=name, kind="silo", dsn=dsn)
    try:
        current = read_revision(dsn)
        destination = script.destination(revision or "base", current, upgrade=True)
    except RevisionError as exc:
        raise MigrationFailedError(f"cannot migrate {name} to {revision}: {exc.message}") from None
    except psycopg.Error as exc:
        raise MigrationFailedError(f"cannot read the revision of {name}: {exc}") from None
    if destination == current:
        return _result(target, TargetStatus.SKIPPED, current, current, 0.0)
    job = Job(
        target=name,
        dsn=dsn,
        action="upgrade",
        destination=destination,
        app_role=app_role,
        replication_role=replication_role,
        script_location=script.location,
        lock_timeout_s=lock_timeout_s,
    )
    with ProcessPoolExecutor(max_workers=1, mp_context=mp_context(), initializer=worker.init_worker) as pool:
        outcome = _outcome(pool.submit(worker.migrate_one, job))
    result = TargetResult.of(target, outcome)
    if result.status is TargetStatus.FAILED:
        raise MigrationFailedError(f"migrating {name} to {revision} failed: {result.error}")
    return result


def migrate_new_silo(
    silo_dsn: str,
    pool_dsn: str,
    *,
    catalog_dsn: str,
    app_role: str = "tenantctl_app",
    replication_role: str = "tenantctl_replicator",
    script_location: str | None = None,
    lock_timeout_s: float = 30.0,
    name: str = "silo",
) -> TargetResult:
    """Migrate a newly provisioned silo to the pool's current revision, excluding fleet runs.

    Reads the pool's revision and migrates the silo while holding the catalog
    interlock shared (:func:`control_plane.interlock.fleet_migration_excluded`),
    so a fleet run cannot move the pool to another revision in between. Raises
    :class:`~control_plane.exceptions.OperationLockedError` if a fleet run is in
    progress (retry later) and :class:`MigrationFailedError` if the migration fails.
    """
    with fleet_migration_excluded(catalog_dsn):
        try:
            revision = pool_revision(pool_dsn)
        except psycopg.Error as exc:
            raise MigrationFailedError(f"cannot read the pool's revision: {exc}") from None
        return migrate_target_to(
            silo_dsn,
            revision,
            app_role=app_role,
            replication_role=replication_role,
            script_location=script_location,
            lock_timeout_s=lock_timeout_s,
            name=name,
        )
