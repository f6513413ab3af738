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
"""

from __future__ import annotations

import importlib
import threading
import time

import psycopg
import structlog
from dbos import DBOS, DBOSConfig

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
        lease_wait_s: float = 10.0,
    ) -> None:
        self.settings = settings
        self.endpoints = endpoints
        self.name = name
        self._context = runtime.WorkerContext(settings, endpoints, provisioner_factory or runtime.default_provisioner)
        self._adopt_interval_s = adopt_interval_s or settings.worker_adopt_interval_seconds
        self._lease_wait_s = lease_wait_s
        self._lease: psycopg.Connection[tuple[object, ...]] | None = None
        self._stop = threading.Event()
        self._adopter: threading.Thread | None = None

    @property
    def context(self) -> runtime.WorkerContext:
        """What this executor's workflows see (settings, endpoints, provisioner)."""
        return self._context

    def _take_lease(self) -> None:
        conn = psycopg.connect(libpq(self.endpoints.catalog_url), autocommit=True)
        deadline = time.monotonic() + self._lease_wait_s
        while True:
            row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LEASE_NAMESPACE, self.name)).fetchone()
            if row and row[0]:
                break
            if time.monotonic() >= deadline:
                conn.close()
                raise OperationLockedError(
                    f"an executor named {self.name!r} is already running against this catalog; "
                    "stop it or pick another --name"
                )
            # A predecessor killed a moment ago holds it until the server notices.
            time.sleep(0.2)
        self._lease = conn

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
        self._adopter = threading.Thread(target=self._adopt_loop, name="tenantctl-adopter", daemon=True)
        self._adopter.start()
        log.info("executor_started", executor=self.name)

    def adopt_orphans(self) -> list[str]:
        """Re-enqueue unfinished workflows of executors whose process is gone."""
        adopted: list[str] = []
        with psycopg.connect(libpq(self.endpoints.catalog_url), autocommit=True) as conn:
            others = [str(row[0]) for row in conn.execute(PENDING_EXECUTORS_SQL, (self.name, APP_VERSION)).fetchall()]
            for other in others:
                row = conn.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (LEASE_NAMESPACE, other)).fetchone()
                if not row or not row[0]:
                    continue  # alive: its own process runs them
                try:
                    # DBOS has no public API for recovering another executor's
                    # workflows; this internal one re-enqueues them atomically.
                    DBOS._recover_pending_workflows([other])
                    adopted.append(other)
                finally:
                    conn.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (LEASE_NAMESPACE, other))
        return adopted

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
        if self._adopter is not None:
            self._adopter.join(timeout=5)
            self._adopter = None
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
