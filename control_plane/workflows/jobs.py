"""The generic job model: the catalog row, enqueueing, step bookkeeping, cancel.

Lifecycle of a job row (``jobs.status``)::

    pending ──(worker starts it)──▶ running ──▶ succeeded | failed | cancelled
       └──(cancel before it starts)──────────────────────────▶ cancelled

* :func:`create_job` inserts the row *and* enqueues its DBOS workflow (same
  id) in the caller's catalog transaction -- both or neither.
* A workflow drives its row with :class:`JobRun` (``start``, ``enter``,
  ``progress``, ``succeed``/``fail``/``cancelled``). Each call is a small
  catalog transaction, idempotent when DBOS replays it after a crash.
* :func:`cancel_job`: a pending job is cancelled at once (plus the kind's
  catalog compensation); a running job gets ``cancel_requested`` and the
  workflow compensates at its next step boundary, unless it already reached
  the kind's point of no return (409).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.catalog.models import jobs
from control_plane.exceptions import JobInProgressError, JobNotCancellableError
from control_plane.workflows.kinds import JOB_QUEUE, JobKind, kind_of
from data_plane.exceptions import NotFoundError

UNFINISHED = ("pending", "running")


@dataclass(frozen=True)
class JobRecord:
    id: uuid.UUID
    kind: str
    tenant_id: uuid.UUID | None
    status: str
    step: str | None
    progress: float
    detail: dict[str, Any]
    params: dict[str, Any]
    error: str | None
    cancel_requested: bool
    created_by: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: sa.Row[Any]) -> JobRecord:
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED


class JobEnqueuer(Protocol):
    """Starts the workflow of a job inside the caller's catalog transaction."""

    async def enqueue(self, session: AsyncSession, *, job_id: uuid.UUID, kind: JobKind) -> None: ...

    async def cancel(self, job_id: uuid.UUID) -> None: ...


class DBOSJobEnqueuer:
    """Enqueues through a :class:`dbos.DBOSClient` on the catalog's DBOS schema.

    The client never runs workflows: any executor (``tenantctl up`` or
    ``tenantctl worker``) listening on ``JOB_QUEUE`` picks them up.
    """

    def __init__(self, system_database_url: str) -> None:
        from dbos import DBOSClient

        self._client = DBOSClient(system_database_url=system_database_url, lazy=True)

    async def enqueue(self, session: AsyncSession, *, job_id: uuid.UUID, kind: JobKind) -> None:
        from dbos import EnqueueOptions

        options: EnqueueOptions = {
            "workflow_name": kind.workflow_name,
            "queue_name": JOB_QUEUE,
            "workflow_id": str(job_id),
        }
        connection = await session.connection()
        # Same database, same transaction: the workflow exists iff the job row does.
        await connection.run_sync(
            lambda sync_conn: self._client.enqueue_in_transaction(sync_conn, options, str(job_id))
        )

    async def cancel(self, job_id: uuid.UUID) -> None:
        await self._client.cancel_workflow_async(str(job_id))

    def close(self) -> None:
        self._client.destroy()


async def get_job(session: AsyncSession, job_id: uuid.UUID, *, lock: bool = False) -> JobRecord:
    query = sa.select(jobs).where(jobs.c.id == job_id)
    if lock:
        query = query.with_for_update()
    row = (await session.execute(query)).one_or_none()
    if row is None:
        raise NotFoundError("job not found")
    return JobRecord.from_row(row)


async def create_job(
    session: AsyncSession,
    *,
    enqueuer: JobEnqueuer,
    kind: JobKind,
    tenant_id: uuid.UUID | None,
    actor: str,
    params: dict[str, Any] | None = None,
) -> JobRecord:
    """Insert a pending job and enqueue its workflow, in the caller's transaction.

    The caller holds the tenant row lock (it just moved the tenant's status),
    so the unfinished-job check cannot race; the partial unique index
    ``uq_jobs_tenant_id_unfinished`` is the backstop.
    """
    if tenant_id is not None:
        busy = await session.scalar(
            sa.select(jobs.c.id).where(jobs.c.tenant_id == tenant_id, jobs.c.status.in_(UNFINISHED))
        )
        if busy is not None:
            raise JobInProgressError(f"the tenant already has an unfinished job ({busy})")
    job_id = uuid.uuid4()
    row = (
        await session.execute(
            sa.insert(jobs)
            .values(
                id=job_id,
                kind=kind.name,
                tenant_id=tenant_id,
                status="pending",
                params=params or {},
                created_by=actor,
            )
            .returning(*jobs.c)
        )
    ).one()
    await enqueuer.enqueue(session, job_id=job_id, kind=kind)
    return JobRecord.from_row(row)


# A kind's catalog-only compensation for a job cancelled before it started.
PendingCompensation = Callable[[AsyncSession, JobRecord], Awaitable[None]]


async def cancel_job(
    session: AsyncSession,
    *,
    job_id: uuid.UUID,
    compensations: Mapping[str, PendingCompensation],
) -> JobRecord:
    """Cancel (pending) or request cancellation (running), in the caller's transaction."""
    job = await get_job(session, job_id, lock=True)
    kind = kind_of(job.kind)
    if job.finished:
        raise JobNotCancellableError(f"the job has already {job.status}")
    if job.status == "pending":
        compensate = compensations.get(kind.name)
        if compensate is not None:
            await compensate(session, job)
        values: dict[str, Any] = {
            "status": "cancelled",
            "cancel_requested": True,
            "finished_at": sa.func.now(),
        }
    else:
        if not kind.cancellable_at(job.step):
            raise JobNotCancellableError(f"the job is past its point of no return (step {job.step})")
        values = {"cancel_requested": True}
    row = (
        await session.execute(
            sa.update(jobs).where(jobs.c.id == job_id).values(**values, updated_at=sa.func.now()).returning(*jobs.c)
        )
    ).one()
    return JobRecord.from_row(row)


class JobRun:
    """A workflow's handle on its job row. Every method is one short transaction."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], job_id: uuid.UUID, kind: JobKind) -> None:
        self._sessions = sessions
        self.job_id = job_id
        self.kind = kind

    async def _update(self, **values: Any) -> JobRecord:
        async with self._sessions.begin() as session:
            row = (
                await session.execute(
                    sa.update(jobs)
                    .where(jobs.c.id == self.job_id)
                    .values(**values, updated_at=sa.func.now())
                    .returning(*jobs.c)
                )
            ).one()
            return JobRecord.from_row(row)

    async def start(self) -> JobRecord | None:
        """pending -> running; None when the job was cancelled or finished meanwhile."""
        async with self._sessions.begin() as session:
            job = await get_job(session, self.job_id, lock=True)
            if job.finished:
                return None
            if job.status == "pending":
                await session.execute(
                    sa.update(jobs).where(jobs.c.id == self.job_id).values(status="running", updated_at=sa.func.now())
                )
            return job

    async def enter(self, name: str) -> bool:
        """Record that step ``name`` starts; True if a cancel is due instead."""
        async with self._sessions.begin() as session:
            return await self.enter_in(session, name)

    async def enter_in(self, session: AsyncSession, name: str) -> bool:
        """:meth:`enter` inside the caller's transaction (a step that enters itself).

        One statement in the common case: the UPDATE takes the row lock that a
        cancel request takes too, and skips the row when a cancel is due.
        """
        condition = jobs.c.id == self.job_id
        if self.kind.may_stop_before(name):
            condition = condition & jobs.c.cancel_requested.is_(False)
        entered = await session.execute(
            sa.update(jobs)
            .where(condition)
            .values(
                step=name,
                progress=sa.func.greatest(jobs.c.progress, self.kind.fraction_before(name)),
                detail={},
                updated_at=sa.func.now(),
            )
            .returning(jobs.c.id)
        )
        if entered.first() is not None:
            return False
        await get_job(session, self.job_id)  # a job that does not exist is an error, not a cancel
        return True

    async def progress(self, step: str, fraction: float, detail: dict[str, Any]) -> None:
        """Progress within ``step`` (0..1) and its counters."""
        start = self.kind.fraction_before(step)
        overall = min(1.0, start + max(0.0, min(1.0, fraction)) / len(self.kind.steps))
        await self._update(progress=overall, detail=detail)

    async def succeed(self) -> None:
        await self._update(status="succeeded", progress=1.0, error=None, finished_at=sa.func.now())

    async def fail(self, error: str) -> None:
        await self._update(status="failed", error=error[:2000], finished_at=sa.func.now())

    async def cancelled(self) -> None:
        await self._update(status="cancelled", finished_at=sa.func.now())
