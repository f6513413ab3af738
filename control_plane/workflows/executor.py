"""The workflow executor: DBOS launched on the catalog database, listening to the job queue.

One per process (DBOS is a singleton): ``tenantctl up`` runs one named
``up`` beside the APIs, ``tenantctl worker`` runs one named ``worker`` (or
``--name``). The name is the DBOS executor id, and that is what makes a job
survive the death of its process: DBOS marks the workflows an executor runs
with its id, and an executor launching under the same id recovers them,
resuming each from its last completed step.

Two guards make that safe:

* a *lease* -- a session advisory lock on the executor name, held on a
  dedicated catalog connection for the executor's lifetime -- so two live
  processes can never share an id (both would "recover" the same workflows);
* *adoption* -- every ``worker_adopt_interval_seconds`` an executor looks for unfinished
  workflows of other executor ids whose lease is free (their process died and
  nobody restarted it) and, holding that lease meanwhile, has DBOS re-enqueue
  them; DBOS's queue hands each to exactly one executor.

A free lease does not prove a dead process: a catalog failover or a network
cut drops the lease's connection under a live executor, and adopting then
would run its workflows twice at once (two cutovers of one move). So:

* the executor checks its lease connection every ``worker_lease_check_seconds``
  and takes the lease back on a new connection; if it cannot within
  ``worker_lease_grace_seconds`` (the catalog is unreachable, or an adopter
  holds it) it exits at once with :data:`EXIT_LEASE_LOST` -- in-flight steps
  stop as if killed, which every step survives;
* an adopter holds a free lease for :meth:`Executor.adopt_hold_seconds`
  (longer than the longest time its holder can take to give up) before it
  re-enqueues anything. Held throughout, the lease cannot be taken back
  meanwhile, so the old holder has exited by then. A process frozen for longer
  than that (SIGSTOP, a paused VM) is what this cannot see; the database-side
  guards (the fence, the flip's epoch check under the route's row lock)
  remain.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable

import psycopg
import structlog
from dbos import DBOS, DBOSConfig
from psycopg.conninfo import make_conninfo

from control_plane.api import system_database_url
from control_plane.exceptions import OperationLockedError
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.workflows import runtime
from control_plane.workflows.kinds import JOB_QUEUE
from data_plane.dsn import libpq

log = structlog.get_logger(__name__)

APP_NAME = "tenantctl"
# Pinned rather than DBOS's source hash, so every process of one release
# (API, `up`, workers) recovers and dequeues the same workflows.
APP_VERSION = "tenantctl-0.1.0"
WORKFLOW_MODULES = (
    "control_plane.workflows.onboarding",
    "control_plane.workflows.offboarding",
    "control_plane.workflows.moves",
)
LEASE_NAMESPACE = 7303  # executor lease (7301: tenant fence, 7302: local provisioner)
QUEUE_POLL_S = 0.5
# libpq's minimum: bounds how long taking the lease back can hang on a dead network.
LEASE_CONNECT_TIMEOUT_S = 2
# TCP only (ignored on Unix sockets): unacknowledged data or silent keepalives
# break the lease's connection within seconds, not the kernel's minutes.
LEASE_CONNINFO = {"keepalives_idle": 1, "keepalives_interval": 1, "keepalives_count": 2, "tcp_user_timeout": 2000}
EXIT_LEASE_LOST = 75  # EX_TEMPFAIL: a supervisor restarts the worker; its jobs resume


def exit_process(reason: str) -> None:
    """The default reaction to a lost lease: stop every in-flight step now, as a kill would."""
    log.error("executor_lease_lost", reason=reason)
    os._exit(EXIT_LEASE_LOST)


PENDING_EXECUTORS_SQL = """
SELECT DISTINCT executor_id FROM dbos.workflow_status
 WHERE status = 'PENDING' AND executor_id IS NOT NULL AND executor_id <> %s AND application_version = %s
"""


class Executor:
    """Start with :meth:`start`, stop with :meth:`stop` (or use it as a context manager)."""

    def __init__(
        self,
        settings: ControlPlaneSettings,
        endpoints: Endpoints,
        *,
        name: str,
        provisioner_factory: runtime.ProvisionerFactory | None = None,
        adopt_interval_s: float | None = None,
        lease_wait_s: float | None = None,
        on_lease_lost: Callable[[str], None] = exit_process,
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.name = name
        self._context = runtime.WorkerContext(settings, endpoints, provisioner_factory or runtime.default_provisioner)
        self._adopt_interval_s = adopt_interval_s or settings.worker_adopt_interval_seconds
        # A restart under this name may find an adopter holding the lease through its hold.
        self._lease_wait_s = self.adopt_hold_seconds + 5.0 if lease_wait_s is None else lease_wait_s
        self._on_lease_lost = on_lease_lost
        self._lease: psycopg.Connection[tuple[object, ...]] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    @property
    def adopt_hold_seconds(self) -> float:
        """How long an adopter holds a free lease before it re-enqueues the holder's workflows.

        Longer than a holder can take to give up: the check that finds the
        connection gone, then tries to take the lease back (each bounded by
        the connect timeout) every check for the grace period.
        """
        check, grace = self.settings.worker_lease_check_seconds, self.settings.worker_lease_grace_seconds
        return 2 * (check + grace + LEASE_CONNECT_TIMEOUT_S)

    @property
    def context(self) -> runtime.WorkerContext:
        """What this executor's workflows see (settings, endpoints, provisioner)."""
        return self._context

    def _try_lease(self) -> psycopg.Connection[tuple[object, ...]] | None:
        """A new catalog connection holding this executor's lease, or None if another session holds it."""
        conninfo = make_conninfo(
            libpq(self.endpoints.catalog_url),
            connect_timeout=LEASE_CONNECT_TIMEOUT_S,
            application_name=f"tenantctl-lease-{self.name}"[:63],
            **LEASE_CONNINFO,
        )
        conn = psycopg.connect(conninfo, autocommit=True)
        try:
            if self._try_lock(conn, self.name):
                return conn
        except psycopg.Error:
            conn.close()
            raise
        conn.close()
        return None

    def _take_lease(self) -> None:
        deadline = time.monotonic() + self._lease_wait_s
        while (lease := self._try_lease()) is None:
            if time.monotonic() >= deadline:
                raise OperationLockedError(
                    f"an executor named {self.name!r} is already running against this catalog; "
                    "stop it or pick another --name"
                )
            # A predecessor killed a moment ago holds it until the server
            # notices, or an adopter holds it through its hold.
            time.sleep(0.2)
        self._lease = lease

    def _lease_alive(self) -> bool:
        lease = self._lease
        if lease is None:
            return False
        try:
            lease.execute("SELECT 1")
        except psycopg.Error:
            lease.close()
            self._lease = None
            return False
        return True

    def _keep_lease(self) -> None:
        """Check the lease; take it back when its connection drops; give up after the grace."""
        lost_at: float | None = None
        while not self._stop.wait(self.settings.worker_lease_check_seconds):
            if self._lease_alive():
                continue
            now = time.monotonic()
            if lost_at is None:
                lost_at = now
                log.warning("executor_lease_interrupted", executor=self.name)
            try:
                self._lease = self._try_lease()
                reason = "another session holds it"
            except psycopg.Error as exc:
                reason = f"catalog unreachable: {exc}".strip()
            if self._lease is not None:
                log.info("executor_lease_restored", executor=self.name, after_s=round(now - lost_at, 3))
                lost_at = None
            elif time.monotonic() - lost_at >= self.settings.worker_lease_grace_seconds:
                self._on_lease_lost(f"executor {self.name!r} could not take its lease back: {reason}")
                return

    def start(self) -> None:
        for module in WORKFLOW_MODULES:
            importlib.import_module(module)  # registers the workflows with DBOS
        self._take_lease()
        runtime.install(self._context)
        config: DBOSConfig = {
            "name": APP_NAME,
            "system_database_url": system_database_url(self.endpoints.catalog_url),
            "executor_id": self.name,
            "application_version": APP_VERSION,
            "log_level": "WARNING",
            "sys_db_pool_size": 10,
        }
        try:
            DBOS(config=config)
            DBOS.launch()
            DBOS.register_queue(
                JOB_QUEUE,
                worker_concurrency=self.settings.worker_concurrency,
                polling_interval_sec=QUEUE_POLL_S,
                on_conflict="always_update",
            )
        except BaseException:
            self.stop()
            raise
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._keep_lease, name="tenantctl-lease", daemon=True),
            threading.Thread(target=self._adopt_loop, name="tenantctl-adopter", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        log.info("executor_started", executor=self.name)

    def adopt_orphans(self) -> list[str]:
        """Re-enqueue unfinished workflows of executors whose process is gone."""
        with psycopg.connect(libpq(self.endpoints.catalog_url), autocommit=True) as conn:
            others = [str(row[0]) for row in conn.execute(PENDING_EXECUTORS_SQL, (self.name, APP_VERSION)).fetchall()]
            held = [other for other in others if self._try_lock(conn, other)]  # the others are alive
            try:
                # A free lease may be a live executor's dropped connection: held
                # this long, it is one that has given up and exited (see the
                # module docstring). A stop request ends the wait and adopts nothing.
                if not held or self._stop.wait(self.adopt_hold_seconds):
                    return []
                # This session still alive proves the locks were held throughout
                # (a dropped one raises here, and nothing is re-enqueued).
                conn.execute("SELECT 1")
                # DBOS has no public API for recovering another executor's
                # workflows; this internal one re-enqueues them atomically.
                DBOS._recover_pending_workflows(held)
                return held
            finally:
                for other in held:
                    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (LEASE_NAMESPACE, other))

    @staticmethod
    def _try_lock(conn: psycopg.Connection[tuple[object, ...]], name: str) -> bool:
        row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LEASE_NAMESPACE, name)).fetchone()
        return bool(row and row[0])

    def _adopt_loop(self) -> None:
        while not self._stop.wait(self._adopt_interval_s):
            try:
                adopted = self.adopt_orphans()
            except (psycopg.Error, RuntimeError) as exc:
                log.warning("adoption_failed", error=str(exc))
                continue
            if adopted:
                log.info("adopted_workflows", executors=adopted)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self._threads = []
        self._context.close()
        DBOS.destroy(destroy_registry=False)
        runtime.install(None)
        if self._lease is not None:
            self._lease.close()
            self._lease = None

    def __enter__(self) -> Executor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
