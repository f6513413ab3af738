"""DBOS steps every job kind shares, and :func:`run_job`, the skeleton of a job workflow.

Each step's result is checkpointed by DBOS, so a replay after a crash takes
the same path (including the decision to cancel) and never re-runs a step
that completed.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import structlog
from dbos import DBOS

from control_plane.exceptions import StepFailedError
from control_plane.workflows import runtime
from control_plane.workflows.jobs import JobRun, get_job
from control_plane.workflows.kinds import JobKind, kind_of
from data_plane.logs import describe_exception

log = structlog.get_logger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

# What a step that enters itself (JobKind.enters_itself) returns when a cancel
# is due at its entry: it has done nothing, and the job compensates.
CANCEL_DUE: dict[str, Any] = {"cancel_due": True}

# One step body: receives the job's row (as a dict: id, tenant_id, params,
# created_by ...) and the outputs of the previous steps; returns its own output.
StepBody = Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]]
Compensation = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]


def job_step(name: str, **options: Any) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """``DBOS.step(name=name, **options)`` whose failure is checkpointed without the data it may quote.

    An exception whose message :func:`describe_exception` rewrites (a
    database or validation error) leaves the step as a
    :class:`StepFailedError` carrying the description instead. Its cause is
    not chained (any logger printing the traceback would print the cause's
    message) but logged here, through the safe rendering. DBOS retries it
    like any other error.
    """

    def decorate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def scrubbed(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return await fn(*args, **kwargs)
            except Exception as exc:
                described = describe_exception(exc)
                if described == str(exc):
                    raise
                # The frames stay findable: logged here, rendered without the quoted data.
                log.warning("job_step_failed", step=name, error_type=type(exc).__name__, exc_info=exc)
                raise StepFailedError(f"{type(exc).__name__}: {described}") from None

        step: Callable[P, Awaitable[R]] = DBOS.step(name=name, **options)(scrubbed)
        return step

    return decorate


def job_error(exc: BaseException) -> str:
    """How a job row names the exception that ended it."""
    if isinstance(exc, StepFailedError):
        return exc.message
    return f"{type(exc).__name__}: {describe_exception(exc)}"


def _run(job_id: str, kind: str) -> JobRun:
    return JobRun(runtime.current().sessions(), uuid.UUID(job_id), kind_of(kind))


@job_step("tenantctl.job.start")
async def start_job(job_id: str, kind: str) -> dict[str, Any] | None:
    """pending -> running; the job as a dict, or None when it must not run."""
    job = await _run(job_id, kind).start()
    if job is None:
        return None
    return {
        "id": str(job.id),
        "tenant_id": None if job.tenant_id is None else str(job.tenant_id),
        "params": job.params,
        "created_by": job.created_by,
    }


@job_step("tenantctl.job.enter")
async def enter_step(job_id: str, kind: str, step: str) -> bool:
    """Record the step; True when a cancel is due instead."""
    return await _run(job_id, kind).enter(step)


@job_step("tenantctl.job.finish")
async def finish_job(job_id: str, kind: str, status: str, error: str | None) -> None:
    run = _run(job_id, kind)
    if status == "succeeded":
        await run.succeed()
    elif status == "cancelled":
        await run.cancelled()
    else:
        await run.fail(error or "failed")


async def report_progress(job_id: str, kind: JobKind, step: str, fraction: float, detail: dict[str, Any]) -> None:
    """Progress inside a step (call from within a step body)."""
    await JobRun(runtime.current().sessions(), uuid.UUID(job_id), kind).progress(step, fraction, detail)


async def run_job(
    job_id: str,
    kind: JobKind,
    bodies: Mapping[str, Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]]],
    compensate: Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]],
    *,
    compensate_failures: bool = False,
) -> str:
    """Run ``kind.steps`` in order; each body must itself be a DBOS step.

    Returns the final job status. A cancel before the point of no return runs
    ``compensate`` (also a DBOS step) and ends ``cancelled``. A failing step
    fails the job with its message recorded on the row; by default it leaves
    every recorded resource for an operator (or the offboarding job) to clean
    up. With ``compensate_failures`` (moves), a step failing *before* the
    point of no return is compensated first, exactly like a cancel -- a move
    that failed in provisioning or catch-up must not leave its tenant
    ``moving`` (which also blocks fleet migrations) or its replication slot
    filling the source's disk.
    """
    job = await start_job(job_id, kind.name)
    if job is None:
        return "skipped"
    outputs: dict[str, Any] = {}
    step: str | None = None
    cancelling = False
    try:
        for step in kind.steps:
            if step in kind.enters_itself:
                # The body records its entry in its own first transaction and
                # answers CANCEL_DUE (checkpointed like any output) instead of running.
                outputs[step] = await bodies[step](job, outputs)
                cancel_due = outputs[step] == CANCEL_DUE
            else:
                cancel_due = await enter_step(job_id, kind.name, step)
                if not cancel_due:
                    outputs[step] = await bodies[step](job, outputs)
            if cancel_due:
                cancelling = True
                await compensate(job, outputs)
                await finish_job(job_id, kind.name, "cancelled", None)
                return "cancelled"
    except Exception as exc:  # noqa: BLE001  # any step failure must end on the job row, not vanish
        log.warning("job_failed", job_id=job_id, kind=kind.name, step=step, error_type=type(exc).__name__)
        # A job's error is shown to operators: never the row a database error quotes.
        error = job_error(exc)
        if cancelling:
            error = f"cancel requested, but its compensation failed: {error}"
        elif compensate_failures and kind.cancellable_at(step):
            error = await _compensate_failure(job, outputs, compensate, error)
        await finish_job(job_id, kind.name, "failed", error)
        return "failed"
    await finish_job(job_id, kind.name, "succeeded", None)
    return "succeeded"


async def _compensate_failure(
    job: dict[str, Any],
    outputs: dict[str, Any],
    compensate: Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]],
    error: str,
) -> str:
    """Undo a failed job before its point of no return; the job's error says whether that worked."""
    try:
        await compensate(job, outputs)
    except Exception as exc:  # noqa: BLE001  # both failures belong on the job row for the operator
        log.error("job_compensation_failed", job_id=job["id"], error_type=type(exc).__name__)
        return f"{error}; compensation FAILED, resources left for an operator: {job_error(exc)}"
    return f"{error} (compensated: what the job had done was undone)"


async def job_tenant(job: dict[str, Any]) -> uuid.UUID:
    tenant_id = job.get("tenant_id")
    if tenant_id is None:
        raise ValueError("this job has no tenant")
    return uuid.UUID(str(tenant_id))


__all__ = ["CANCEL_DUE", "enter_step", "finish_job", "get_job", "report_progress", "run_job", "start_job"]
