"""Starting a move from the admin API: preconditions, interlock, job -- one catalog transaction."""

from __future__ import annotations

from typing import Literal

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.catalog import service
from control_plane.catalog.lifecycle import Action
from control_plane.exceptions import IllegalTransitionError, MigrationInProgressError
from control_plane.interlock import FLEET_MIGRATION_KEY, FLEET_RUNNING_MESSAGE, INTERLOCK_NAMESPACE
from control_plane.workflows import jobs as jobs_mod
from control_plane.workflows.jobs import JobEnqueuer, JobRecord
from control_plane.workflows.kinds import DEMOTION, PROMOTION

Mode = Literal["online", "offline"]


async def start_move(
    *,
    session: AsyncSession,
    ref: str,
    to: Literal["silo", "pool"],
    mode: Mode,
    actor: str,
    enqueuer: JobEnqueuer,
) -> tuple[service.TenantView, JobRecord]:
    """``active`` -> ``moving`` and a promotion/demotion job, or a 409 explaining why not.

    Any active tenant can be promoted whatever its tier (changing the tier moves
    nothing by itself). A tenant already in the target placement, not active
    (suspended, already moving ...): 409 ``illegal_transition``; a fleet
    migration in progress: 409 ``migration_in_progress`` at once (no waiting
    behind a run that may take minutes; the caller retries when it is over).
    """
    kind = PROMOTION if to == "silo" else DEMOTION
    async with session.begin():
        current = await service.resolve_tenant(session, ref, lock=True)
        if current.placement == to:
            raise IllegalTransitionError(f"tenant {current.slug} is already placed in the {to}")
        # Same interlock as control_plane.interlock.mark_tenant_moving: a fleet
        # migration holds it exclusively; this transaction's shared hold makes a
        # runner that starts now wait for our commit and then see 'moving'.
        locked = await session.execute(
            sa.text("SELECT pg_try_advisory_xact_lock_shared(:ns, :key)"),
            {"ns": INTERLOCK_NAMESPACE, "key": FLEET_MIGRATION_KEY},
        )
        if not locked.scalar_one():
            raise MigrationInProgressError(FLEET_RUNNING_MESSAGE)
        # The job first, so the audit entry of the transition can name it (the
        # log is append-only: it cannot be added afterwards). One transaction.
        job = await jobs_mod.create_job(
            session,
            enqueuer=enqueuer,
            kind=kind,
            tenant_id=current.id,
            actor=actor,
            params={"previous_status": current.status, "mode": mode},
        )
        view = await service.transition(
            session,
            tenant_id=current.id,
            action=Action.START_MOVE,
            actor=actor,
            detail={"placement": to, "mode": mode, "job_id": str(job.id), "kind": kind.name},
        )
        return view, job
