"""Promotion (pool -> silo) and demotion (silo -> pool) as durable DBOS workflows.

Steps (``control_plane.moves.engine`` does the database work; every step is a
DBOS step, checkpointed, and idempotent when replayed after a crash)::

    promotion: provision -> migrate -> plan -> prepare -> replicate -> catch_up -> cutover
               -> flip -> retire -> stop_replication -> cleanup
    demotion:  migrate (the silo, to the pool's revision) -> plan -> prepare -> ... (same) ... -> cleanup

``cutover`` is one step because its snapshots live in open transactions:
online, it is ``control_plane.moves.verify.verify_incremental`` (bulk checksums
of two snapshots at one replication position before the fence; inside the
fence the final catch-up and a check of only the rows changed since); offline,
it is fence -> binary COPY -> full verification. Either way it leaves the
source fenced and verified and the target activated at the new epoch (on the
connection the fence already had open: the write pause pays for no new
connection and no extra checkpoint), or fails. The target is harmless until
the flip: no router holds the new epoch before it commits. ``catch_up`` and the gate inside
``cutover`` back off and try again while the target lags (never fence with a
large backlog; the move fails only after the last attempt).

Before ``flip`` (the point of no return) the source is authoritative: a
cancel, or a failure of *any* step, runs :func:`compensate` -- an activated
target retired again (the catalog's epoch proves the route never reached it),
replication objects and change triggers dropped, source unfenced, target
emptied (and a silo provisioned for the move deprovisioned) -- and the tenant
is ``active`` at its old route again; a failed job records why. From ``flip``
on the steps only move forward (each retried on transient errors). Nothing
runs between ``cutover`` and ``flip``: each step costs the write pause a
checkpoint and a job-row update (measured ~15 ms each through the workflow,
``bench/moves_workflow.py``). ``cleanup`` waits
``move_cleanup_grace_seconds`` and then deletes the source rows (promotion) or
deprovisions the old silo (demotion): the only destructive step, refused
unless the source has been retired.

Schema revisions: a move never copies between different tenant-schema
revisions. Promotion migrates its new silo to the pool's revision; demotion
first migrates the silo (the source) to the pool's revision, and refuses
(:class:`SchemaRevisionMismatchError`, 409) a silo the pool cannot match by
upgrading it -- a silo at a newer or unknown revision. Both run while the
tenant is ``moving``, which keeps fleet migrations out (``control_plane.interlock``).

Test hook: every step ends with ``runtime.pause()`` (a no-op unless
``test_step_delay_seconds`` is set outside production), which leaves room to
cancel a job or kill its worker while any given step is the current one.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
import structlog
from dbos import DBOS
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.catalog import service
from control_plane.catalog.lifecycle import Action
from control_plane.catalog.models import locations, tenants
from control_plane.exceptions import SchemaRevisionMismatchError
from control_plane.fleet.probe import read_revision
from control_plane.fleet.runner import migrate_target_to, pool_revision
from control_plane.fleet.scripts import ScriptInfo
from control_plane.moves import engine
from control_plane.moves.engine import MovePlan, Side, replication_conninfo
from control_plane.moves.verify import verify_incremental
from control_plane.provisioning import credentials, location_for_cleanup
from control_plane.provisioning.base import LOCATION_COLUMNS, SiloLocation, SiloProvisioner, SiloSpec
from control_plane.workflows import runtime
from control_plane.workflows.jobs import JobRun
from control_plane.workflows.kinds import DEMOTION, PROMOTION
from control_plane.workflows.steps import CANCEL_DUE, job_error, job_step, job_tenant, run_job
from data_plane.dsn import database_of, password_of, server_user, with_database, with_password, without_password

StepBody = Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]]

log = structlog.get_logger(__name__)


def _move_step(name: str, **options: Any) -> Callable[[StepBody], StepBody]:
    """A DBOS step (``options``: its retry policy) that ends with the test hook's pause."""

    def wrap(fn: StepBody) -> StepBody:
        @functools.wraps(fn)
        async def body(job: dict[str, Any], outputs: dict[str, Any]) -> Any:
            result = await fn(job, outputs)
            await runtime.current().pause()  # test hook: room to cancel or kill while this step is current
            return result

        step: StepBody = job_step(name, **options)(body)
        return step

    return wrap


# -- plan ------------------------------------------------------------------------------------


def _pool_side(location_id: str) -> Side:
    ctx = runtime.current()
    eps = ctx.endpoints
    return Side(
        kind="pool",
        location_id=location_id,
        owner_dsn=eps.pool_url,
        admin_dsn=eps.pool_admin_url or eps.pool_url,
        replication_conninfo=replication_conninfo(eps.pool_url, ctx.settings.replication_role),
        replication_secret=ctx.settings.pool_replication_secret,
    )


def _silo_side(location: dict[str, Any]) -> Side:
    ctx = runtime.current()
    owner = str(location["dsn"])
    database = location.get("database") or database_of(owner)
    admin = with_database(ctx.endpoints.silo_server_url, database) if location["provider"] == "local" else owner
    return Side(
        kind="silo",
        location_id=str(location["id"]),
        owner_dsn=owner,
        admin_dsn=admin,
        replication_conninfo=credentials.replication_conninfo_without_password(
            location, role=ctx.settings.replication_role
        ),
        owner_secret=credentials.master_secret_ref(location),
        replication_secret=credentials.replication_secret_ref(location),
    )


def plan_of(outputs: dict[str, Any]) -> MovePlan:
    data = outputs["plan"]
    return MovePlan(
        move_id=uuid.UUID(data["move_id"]),
        tenant_id=uuid.UUID(data["tenant_id"]),
        source=_side_of(data["source"]),
        target=_side_of(data["target"]),
        epoch=int(data["epoch"]),
        mode=data["mode"],
    )


# A plan is checkpointed (DBOS step outputs in the catalog database): its DSNs are
# stored without passwords and get them back, when read, from this process's
# configured endpoints (the same server and user) -- or at connect time from a
# secret store (RDS silos, see Side).
_DSN_FIELDS = ("owner_dsn", "admin_dsn", "replication_conninfo")


def _side_json(side: Side) -> dict[str, Any]:
    data = asdict(side)
    for name in _DSN_FIELDS:
        data[name] = without_password(data[name])
    return data


def _side_of(data: dict[str, Any]) -> Side:
    eps = runtime.current().endpoints
    known = {
        server_user(dsn): password
        for dsn in (eps.pool_url, eps.pool_admin_url, eps.silo_server_url)
        if dsn is not None and (password := password_of(dsn)) is not None
    }
    restored = dict(data)
    for name in _DSN_FIELDS:
        password = known.get(server_user(restored[name]))
        if password is not None and password_of(restored[name]) is None:
            restored[name] = with_password(restored[name], password)
    return Side(**restored)


async def _tenant_row(tenant_id: uuid.UUID) -> Any:
    async with runtime.current().sessions().begin() as session:
        return (
            await session.execute(
                sa.select(tenants.c.placement, tenants.c.route_epoch, tenants.c.slug, tenants.c.tier, locations)
                .select_from(tenants.join(locations, locations.c.id == tenants.c.location_id))
                .where(tenants.c.id == tenant_id)
            )
        ).one()


def _location_json(row: Any) -> dict[str, Any]:
    return {"id": str(row.id), **{name: getattr(row, name) for name in LOCATION_COLUMNS}}


def _plan_json(plan: MovePlan, **extra: Any) -> dict[str, Any]:
    return {
        "move_id": str(plan.move_id),
        "tenant_id": str(plan.tenant_id),
        "source": _side_json(plan.source),
        "target": _side_json(plan.target),
        "epoch": plan.epoch,
        "mode": plan.mode,
        **extra,
    }


async def _announce_target(plan: MovePlan) -> None:
    """Name the move's target in the tenant's route (``next_location_id``); idempotent.

    Replicas open their connections to it ahead of the flip (catalog_0012),
    instead of inside the write pause. Only a moving tenant's route says so.
    """
    async with runtime.current().sessions().begin() as session:
        await session.execute(
            sa.update(tenants)
            .where(tenants.c.id == plan.tenant_id, tenants.c.status == "moving")
            .values(next_location_id=uuid.UUID(plan.target.location_id))
        )


async def _set_location_status(location_id: str, status: str) -> None:
    async with runtime.current().sessions().begin() as session:
        await session.execute(
            sa.update(locations)
            .where(locations.c.id == uuid.UUID(location_id))
            .values(status=status, updated_at=sa.func.now())
        )


async def _location_status(location_id: str) -> str | None:
    async with runtime.current().sessions().begin() as session:
        status = await session.scalar(sa.select(locations.c.status).where(locations.c.id == uuid.UUID(location_id)))
    return None if status is None else str(status)


async def _drop_unrecorded_silo(provisioner: SiloProvisioner, spec: SiloSpec) -> None:
    """After a failed ``provision``: drop what it may have created, found by its deterministic name.

    Nothing in the catalog knows that silo yet, so no compensation could find
    it later (I5). ``deprovision`` still checks that the silo is this
    tenant's; a refusal (someone else's database of that name, which is
    likely why provisioning failed) is logged, the provisioning error reported.
    """
    try:
        await asyncio.to_thread(provisioner.deprovision, location_for_cleanup(spec, provider=provisioner.kind))
    except Exception as exc:  # noqa: BLE001  # the provisioning error is the one the job must report
        log.warning("move_provision_cleanup_failed", tenant_id=str(spec.tenant_id), error=job_error(exc))


@_move_step("tenantctl.promotion.provision")
async def provision(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Provision the silo (idempotent names) and record it in the catalog before anything else (I5)."""
    ctx = runtime.current()
    tenant_id = await job_tenant(job)
    row = await _tenant_row(tenant_id)
    spec = SiloSpec(tenant_id=tenant_id, slug=row.slug, tier=row.tier)
    provisioner = ctx.provisioner()
    try:
        location: SiloLocation = await asyncio.to_thread(provisioner.provision, spec)
        values = location.values()
        async with ctx.sessions()() as session:
            location_id = await service.record_silo_location(session=session, tenant_id=tenant_id, values=values)
    except Exception:
        await _drop_unrecorded_silo(provisioner, spec)
        raise
    return {**values, "id": location_id}


@_move_step("tenantctl.promotion.migrate")
async def migrate(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """The new silo gets exactly the pool's revision (Alembic runs in a subprocess)."""
    ctx = runtime.current()
    revision = await asyncio.to_thread(pool_revision, ctx.endpoints.pool_url)
    result = await asyncio.to_thread(
        migrate_target_to,
        await asyncio.to_thread(credentials.owner_dsn, outputs["provision"]),
        revision,
        app_role=ctx.settings.app_role,
        replication_role=ctx.settings.replication_role,
    )
    return {"revision": revision, "status": str(getattr(result, "status", ""))}


def check_upgradable(script: ScriptInfo, *, source: str | None, target: str | None) -> None:
    """Raise :class:`SchemaRevisionMismatchError` unless upgrading ``source`` reaches ``target``.

    A copy between two revisions would fail half-way or, worse, drop what one
    side has and the other lacks; the only safe repair a move may make on its
    own is an upgrade of the source to the target's revision.
    """
    if not script.knows(target):
        raise SchemaRevisionMismatchError(
            f"the pool is at tenant-schema revision {target!r}, unknown to this code; refusing to move into it"
        )
    if not script.knows(source) or script.index(source) > script.index(target):
        raise SchemaRevisionMismatchError(
            f"the silo is at tenant-schema revision {source!r} ({script.classify(source).value}), the pool at "
            f"{target!r}: a demotion never downgrades a silo; migrate the pool first (`tenantctl migrate upgrade`)"
        )


@_move_step("tenantctl.demotion.migrate")
async def migrate_source(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Bring the silo (the source) to the pool's revision before anything is copied, or refuse.

    The tenant is ``moving``, so no fleet migration runs meanwhile (the
    interlock); the silo keeps serving while it is upgraded, as in a fleet run.
    """
    ctx = runtime.current()
    row = await _tenant_row(await job_tenant(job))
    silo_dsn = await asyncio.to_thread(credentials.owner_dsn, {"dsn": row.dsn, "name": row.name, "detail": row.detail})
    target = await asyncio.to_thread(pool_revision, ctx.endpoints.pool_url)
    source = await asyncio.to_thread(read_revision, silo_dsn)
    check_upgradable(await asyncio.to_thread(ScriptInfo.load), source=source, target=target)
    result = await asyncio.to_thread(
        migrate_target_to,
        silo_dsn,
        target,
        app_role=ctx.settings.app_role,
        replication_role=ctx.settings.replication_role,
        name=str(row.name),
    )
    return {"from": source, "revision": target, "status": str(getattr(result, "status", ""))}


@_move_step("tenantctl.promotion.plan")
async def plan_promotion(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    tenant_id = await job_tenant(job)
    row = await _tenant_row(tenant_id)
    plan = MovePlan(
        move_id=uuid.UUID(job["id"]),
        tenant_id=tenant_id,
        source=_pool_side(str(row.id)),
        target=_silo_side(outputs["provision"]),
        epoch=int(row.route_epoch),
        mode=str(job["params"].get("mode") or "online"),
    )
    await _announce_target(plan)
    return _plan_json(plan, placement="silo")


@_move_step("tenantctl.demotion.plan")
async def plan_demotion(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    tenant_id = await job_tenant(job)
    row = await _tenant_row(tenant_id)
    async with runtime.current().sessions().begin() as session:
        pool_id = await session.scalar(sa.select(locations.c.id).where(locations.c.kind == "pool"))
    plan = MovePlan(
        move_id=uuid.UUID(job["id"]),
        tenant_id=tenant_id,
        source=_silo_side(_location_json(row)),
        target=_pool_side(str(pool_id)),
        epoch=int(row.route_epoch),
        mode=str(job["params"].get("mode") or "online"),
    )
    await _announce_target(plan)
    return _plan_json(plan, placement="pool", old_location=_location_json(row))


# -- data movement (before the point of no return: a failure is compensated by run_job) ------------


def _before_flip(name: str, fn: Callable[[MovePlan], Any]) -> StepBody:
    async def body(job: dict[str, Any], outputs: dict[str, Any]) -> Any:
        result = await asyncio.to_thread(fn, plan_of(outputs))
        return result if isinstance(result, dict | int | float | str | type(None)) else None

    return _move_step(f"tenantctl.move.{name}")(body)


def _online_only(fn: Callable[[MovePlan], Any]) -> Callable[[MovePlan], Any]:
    def run(plan: MovePlan) -> Any:
        return fn(plan) if plan.mode == "online" else None

    return run


def _replicate(plan: MovePlan) -> None:
    engine.start_replication(plan)
    engine.wait_initial_sync(plan, stall_timeout=runtime.current().settings.move_initial_copy_stall_seconds)


def _catch_up(plan: MovePlan) -> int:
    settings = runtime.current().settings
    return engine.catch_up_gate(
        plan,
        max_lag_bytes=settings.move_max_lag_bytes,
        timeout=settings.move_catch_up_timeout_seconds,
        backoff=settings.move_catch_up_backoff_seconds,
    )


def _cutover(
    plan: MovePlan, stage_flip: Callable[[], None], activated: Callable[[], None], *, route_epoch: int
) -> dict[str, Any]:
    """Fence, verify, activate the target; ``activated`` in the checkpoint lets ``flip`` skip activating.

    A target that an earlier attempt activated (the process died before the
    flip; ``route_epoch`` proves the route never named it) is taken back
    first: the verification starts again from a target that does not serve
    the tenant, whose change triggers record every write (migration tenant_0006).

    ``stage_flip`` (blocking, bounded) lets the flip's statements go in:
    online, just before the fence, whose length is then bounded by its own
    timeouts (drain, final catch-up); offline, after the copy and its
    verification, since the fenced copy itself may take minutes.
    ``activated`` is called once the target is verified and activated: the
    flip may commit.
    """
    if engine.take_back_target(plan, route_epoch=route_epoch):
        log.info("move_cutover_target_taken_back", move_id=str(plan.move_id))
    if plan.mode == "online":
        settings = runtime.current().settings
        details = verify_incremental(
            plan,
            activate=True,
            max_lag_bytes=settings.move_max_lag_bytes,
            catch_up_timeout=settings.move_catch_up_timeout_seconds,
            backoff=settings.move_catch_up_backoff_seconds,
            before_fence=stage_flip,
            on_activated=activated,
        )
        return {**details, "activated": True}
    fenced_at = time.monotonic()
    engine.fence_source(plan)
    copied = engine.copy_offline(plan)
    verified = engine.verify(plan)
    stage_flip()
    engine.activate_target(plan)
    activated()
    return {"copied": copied, "verified": verified, "activated": True, "fenced_at": fenced_at}


prepare = _before_flip("prepare", engine.prepare_target)
replicate = _before_flip("replicate", _online_only(_replicate))
# Fence only with a small backlog: bounded waits, backing off 5 s, 20 s, 80 s by default (never fail open).
catch_up = _before_flip("catch_up", _online_only(_catch_up))


# How long the cutover's thread waits for the flip's statements before it fences
# (they take milliseconds; the test hook may hold them for about a second).
STAGE_WAIT_SECONDS = 10.0


@_move_step("tenantctl.move.cutover")
async def cutover(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Fence, verify, activate the target -- and flip the route at once, in this step.

    The flip's catalog statements (10-50 ms through the ORM on a busy host)
    go in *before* the fence, in a transaction that commits as soon as the
    target is verified and activated (the thread closes the verification's
    reads after that, outside the pause); a failed verification rolls them
    back. What is left of them in the write pause is the commit. The cutover's
    thread waits for them (bounded by ``STAGE_WAIT_SECONDS``) after its early
    pass, once everything the fence needs is open. The transaction then holds
    the tenant's and the job's row locks through the fence: a cancel request
    made meanwhile waits for the fence's outcome (bounded by the drain and
    final catch-up timeouts) and is refused if the flip committed. A step
    boundary inside the pause would cost a checkpoint and the next step's
    start, so none is. ``flip`` stays the point of no return and its own
    step: if the flip here fails, for any reason, even an ambiguous commit,
    nothing is compensated; ``flip`` reads the catalog and finishes it (or
    finds it done). A cancel that is due is honoured by the same check as in
    ``flip``, in the flip's own transaction.

    Replayed after its flip committed (the process died before this step's
    checkpoint), it touches nothing: re-running the verification would unfence
    the source, which must stay fenced once the route names the target.
    """
    plan = plan_of(outputs)
    route_epoch = int((await _tenant_row(plan.tenant_id)).route_epoch)
    if route_epoch >= plan.new_epoch:
        log.info("move_cutover_replayed_after_flip", job_id=job["id"])
        return {"activated": True, "flipped": True}
    loop = asyncio.get_running_loop()
    ready, activated = asyncio.Event(), asyncio.Event()
    staged = threading.Event()

    def stage_flip() -> None:  # called in the cutover's thread
        loop.call_soon_threadsafe(ready.set)
        # Bounded: a slow catalog delays the fence but never wedges the move;
        # past the bound the fence goes ahead and the statements run alongside.
        staged.wait(STAGE_WAIT_SECONDS)

    def signal_activated() -> None:  # called in the cutover's thread
        loop.call_soon_threadsafe(activated.set)

    work = asyncio.ensure_future(
        asyncio.to_thread(functools.partial(_cutover, plan, stage_flip, signal_activated, route_epoch=route_epoch))
    )

    async def until(event: asyncio.Event) -> None:
        """Until ``event`` is set; raises the cutover's failure if it ends first."""
        waiting = asyncio.ensure_future(event.wait())
        await asyncio.wait({work, waiting}, return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not event.is_set():
            work.result()  # the step's failure (nothing to flip), raised here and again below
            raise RuntimeError("the cutover ended without reaching the flip")

    async def flip_due() -> None:
        await until(ready)
        await runtime.current().pause()  # test hook: room to cancel or kill before the flip

    async def verified() -> None:
        await until(activated)
        await runtime.current().pause()  # test hook: room to kill between the activation and the flip

    try:
        # A failure before the fence, or of the verification, surfaces
        # here too (the flip's statements, if any ran, roll back); below,
        # ``work`` raises it as the step's.
        flipped = await _flip_route(job, outputs, verified=verified(), due=flip_due(), staged=staged.set)
    except Exception as exc:  # noqa: BLE001  # the flip step finishes it with forward retries, never a compensation
        result: dict[str, Any] = await work
        log.warning("move_flip_deferred", job_id=job["id"], error=job_error(exc))
        return result
    flipped_at = time.monotonic()
    if flipped == CANCEL_DUE:
        return await work  # the flip step answers the same, and the job compensates
    try:
        result = await work
    except Exception as exc:  # noqa: BLE001  # the flip committed: what failed is closing the verification's reads
        log.warning("move_cutover_cleanup_failed", job_id=job["id"], error=job_error(exc))
        result = {"activated": True}
    # time.monotonic() instants of this host, like fenced_at: where benchmarks
    # place the pause, and when the flip's statements were in, waiting to commit.
    return {**result, "flipped": True, "flipped_at": flipped_at, "flip_staged_at": flipped.get("staged_at")}


# -- cutover and after (past the point of no return: only forward) ---------------------------------


FORWARD_RETRIES: dict[str, Any] = {"retries_allowed": True, "interval_seconds": 1.0, "max_attempts": 5}


def _forward(name: str, fn: Callable[[MovePlan], Any]) -> StepBody:
    async def body(job: dict[str, Any], outputs: dict[str, Any]) -> None:
        await asyncio.to_thread(fn, plan_of(outputs))

    return _move_step(f"tenantctl.move.{name}", **FORWARD_RETRIES)(body)


retire = _forward("retire", engine.retire_source)
stop_replication = _forward("stop_replication", _online_only(engine.stop_replication))


@_move_step("tenantctl.move.flip", **FORWARD_RETRIES)
async def flip(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Route epoch + 1 to the target (the trigger NOTIFYs every replica); tenant active again.

    Normally the cutover has flipped already, and this finds the new epoch and
    returns. It flips when the cutover's attempt failed or found a cancel due
    (then it answers CANCEL_DUE too). The cutover normally activated the
    target inside the fence; one that did not -- a workflow resumed from a
    cutover of older code -- is activated here first; activation is idempotent.
    """
    return await _flip_route(job, outputs)


async def _flip_route(
    job: dict[str, Any],
    outputs: dict[str, Any],
    *,
    verified: Coroutine[Any, Any, None] | None = None,
    due: Coroutine[Any, Any, None] | None = None,
    staged: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """The flip's transaction; with ``verified`` (the cutover's), it commits only once that returned.

    With ``due``, the catalog connection is checked out first and the
    statements wait for ``due``: the pool's pre-ping (three round trips, up
    to 14 ms measured on a loaded host) is then spent before the fence, not
    inside the write pause. The connection holds no transaction and no lock
    while it waits (the driver sends BEGIN with the first statement).
    ``staged`` is called once the statements are in, or have failed, or
    found nothing to flip: the cutover's thread waits for it to fence.
    """
    try:
        async with runtime.current().sessions().begin() as session:
            answer = await _staged_flip(session, job, outputs, due=due, staged=staged, activate=verified is None)
            if verified is not None and "staged_at" in answer:
                # Nothing above is visible until the commit: it waits for the
                # target to be verified and activated, and a failure rolls it back.
                await verified
        return answer
    finally:
        if verified is not None:
            verified.close()  # not awaited when there was nothing to commit, or on a failure


async def _staged_flip(
    session: AsyncSession,
    job: dict[str, Any],
    outputs: dict[str, Any],
    *,
    due: Coroutine[Any, Any, None] | None,
    staged: Callable[[], None] | None,
    activate: bool,
) -> dict[str, Any]:
    """:func:`_flip_statements` once ``due`` (the connection checked out first); ``staged`` whatever the outcome."""
    try:
        if due is not None:
            try:
                await session.connection()
            finally:
                await due  # always awaited; a failed checkout is then the flip's failure
        return await _flip_statements(session, job, outputs, activate=activate)
    finally:
        if staged is not None:
            staged()


async def _flip_statements(
    session: AsyncSession, job: dict[str, Any], outputs: dict[str, Any], *, activate: bool
) -> dict[str, Any]:
    """The flip, uncommitted: CANCEL_DUE, the epoch of a flip already done, or ``staged_at``."""
    plan = plan_of(outputs)
    placement = outputs["plan"]["placement"]
    current = await service.resolve_tenant(session, plan.tenant_id, lock=True)
    if current.route_epoch >= plan.new_epoch:
        return {"route_epoch": current.route_epoch}  # replayed after the commit
    # The step's entry (and the last chance for a cancel requested during
    # the cutover), in this transaction: no separate step inside the pause.
    kind = PROMOTION if placement == "silo" else DEMOTION
    if await JobRun(runtime.current().sessions(), uuid.UUID(job["id"]), kind).enter_in(session, "flip"):
        return CANCEL_DUE
    if activate and not (outputs.get("cutover") or {}).get("activated"):
        await asyncio.to_thread(engine.activate_target, plan)
    await service.apply_transition(
        session,
        tenant_id=plan.tenant_id,
        action=Action.FINISH_MOVE,
        actor=job["created_by"],
        current=current,
        values={
            "placement": placement,
            "location_id": uuid.UUID(plan.target.location_id),
            "route_epoch": tenants.c.route_epoch + 1,
            "next_location_id": None,
        },
        detail={"job_id": job["id"], "to": placement, "location_id": plan.target.location_id},
    )
    if plan.target.kind == "silo":
        await session.execute(
            sa.update(locations).where(locations.c.id == uuid.UUID(plan.target.location_id)).values(status="ready")
        )
    return {"route_epoch": plan.new_epoch, "staged_at": time.monotonic()}


@job_step("tenantctl.move.cleanup", **FORWARD_RETRIES)
async def cleanup(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    ctx = runtime.current()
    plan = plan_of(outputs)
    await asyncio.sleep(ctx.settings.move_cleanup_grace_seconds)
    if plan.source.kind == "pool":
        deleted = await asyncio.to_thread(engine.cleanup_source, plan)
        return {"deleted_rows": deleted}
    old = outputs["plan"]["old_location"]
    await deprovision_retired_silo(plan, old)
    return {"deprovisioned": old["name"]}


async def deprovision_retired_silo(plan: MovePlan, old: dict[str, Any]) -> None:
    """Deprovision a demoted tenant's old silo -- only once it has been retired (answers "moved").

    The same guard as the promotion's row cleanup: a silo that still serves, or
    is fenced for, the tenant may be authoritative and is never dropped. The
    check runs before the location is marked ``deleting``; a replay that finds
    ``deleting`` (the database perhaps already gone) skips it and finishes.
    """
    status = await _location_status(old["id"])
    if status not in ("deleting", "deleted"):
        await asyncio.to_thread(engine.require_retired, plan.source, plan.tenant_id)
        await _set_location_status(old["id"], "deleting")
    provisioner = runtime.current().provisioner()
    await asyncio.to_thread(provisioner.deprovision, SiloLocation.from_values(plan.tenant_id, old))
    await _set_location_status(old["id"], "deleted")


# -- cancel / failure before the point of no return -----------------------------------------------


@job_step("tenantctl.move.compensate", retries_allowed=True, interval_seconds=1.0, max_attempts=3)
async def compensate(job: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Source authoritative and untouched; nothing of the move left behind; tenant active.

    Runs for a cancel and for a failure before ``flip``. Idempotent: a
    replay after the silo was (being) deprovisioned does not touch it again.
    """
    tenant_id = await job_tenant(job)
    provisioned = outputs.get("provision")
    silo_status = None if provisioned is None else await _location_status(provisioned["id"])
    if "plan" in outputs and silo_status not in ("deleting", "deleted"):
        # The catalog's epoch decides whether an activated target may be taken back:
        # it may only while the route still names the source (no flip committed).
        route_epoch = int((await _tenant_row(tenant_id)).route_epoch)
        # Target retired; publication, subscription, slots and change triggers dropped; source unfenced;
        # target emptied.
        await asyncio.to_thread(functools.partial(engine.abort, plan_of(outputs), route_epoch=route_epoch))
    if provisioned is not None:
        await _set_location_status(provisioned["id"], "deleting")
        provisioner = runtime.current().provisioner()
        await asyncio.to_thread(provisioner.deprovision, SiloLocation.from_values(tenant_id, provisioned))
        await _set_location_status(provisioned["id"], "deleted")
    async with runtime.current().sessions().begin() as session:
        current = await service.resolve_tenant(session, tenant_id, lock=True)
        if current.status == "moving":
            await service.transition(
                session,
                tenant_id=tenant_id,
                action=Action.FINISH_MOVE,
                actor=job["created_by"],
                values={"next_location_id": None},
                detail={"job_id": job["id"], "aborted": True},
            )


COMMON: dict[str, StepBody] = {
    "prepare": prepare,
    "replicate": replicate,
    "catch_up": catch_up,
    "cutover": cutover,
    "flip": flip,
    "retire": retire,
    "stop_replication": stop_replication,
    "cleanup": cleanup,
}


@DBOS.workflow(name=PROMOTION.workflow_name)
async def promotion_workflow(job_id: str) -> str:
    bodies = {"provision": provision, "migrate": migrate, "plan": plan_promotion, **COMMON}
    return await run_job(job_id, PROMOTION, bodies, compensate, compensate_failures=True)


@DBOS.workflow(name=DEMOTION.workflow_name)
async def demotion_workflow(job_id: str) -> str:
    bodies = {"migrate": migrate_source, "plan": plan_demotion, **COMMON}
    return await run_job(job_id, DEMOTION, bodies, compensate, compensate_failures=True)
