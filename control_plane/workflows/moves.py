"""Promotion (pool -> silo) and demotion (silo -> pool) as durable DBOS workflows.

Steps (``control_plane.moves.engine`` does the database work; every step is a
DBOS step, checkpointed, and idempotent when replayed after a crash)::

    promotion: provision -> migrate -> plan -> prepare -> replicate -> catch_up -> cutover
               -> activate -> flip -> retire -> stop_replication -> cleanup
    demotion:                          plan -> prepare -> ... (same) ... -> cleanup

``cutover`` is one step because its snapshots live in open transactions:
online, it is ``control_plane.moves.verify.verify_incremental`` (bulk checksums
of two snapshots at one replication position before the fence; inside the
fence the final catch-up and a check of only the rows changed since); offline,
it is fence -> binary COPY -> full verification. Either way it leaves the
source fenced and verified, or aborts the move.

Before ``activate`` (the point of no return) the source is authoritative: a
cancel, or a failure of any step, aborts the move -- replication objects
dropped, source unfenced, target emptied (and a silo provisioned for the move
deprovisioned) -- and the tenant is ``active`` at its old route again. After
``activate`` the steps only move forward (each retried on transient errors).
``cleanup`` waits ``move_cleanup_grace_seconds`` and then deletes the source
rows (promotion) or deprovisions the old silo (demotion): the only destructive
step, refused unless the source has been retired.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from dbos import DBOS

from control_plane.catalog import service
from control_plane.catalog.lifecycle import Action
from control_plane.catalog.models import locations, tenants
from control_plane.fleet.runner import migrate_target_to, pool_revision
from control_plane.moves import engine
from control_plane.moves.engine import MovePlan, Side, replication_conninfo
from control_plane.moves.verify import verify_incremental
from control_plane.provisioning.base import SiloLocation, SiloSpec
from control_plane.workflows import runtime
from control_plane.workflows.kinds import DEMOTION, PROMOTION
from control_plane.workflows.steps import job_tenant, run_job
from data_plane.dsn import database_of, with_database

StepBody = Callable[[dict[str, Any], dict[str, Any]], Awaitable[Any]]


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
        replication_conninfo=replication_conninfo(owner, ctx.settings.replication_role),
    )


def plan_of(outputs: dict[str, Any]) -> MovePlan:
    data = outputs["plan"]
    return MovePlan(
        move_id=uuid.UUID(data["move_id"]),
        tenant_id=uuid.UUID(data["tenant_id"]),
        source=Side(**data["source"]),
        target=Side(**data["target"]),
        epoch=int(data["epoch"]),
        mode=data["mode"],
    )


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
    return {
        "id": str(row.id),
        "name": row.name,
        "provider": row.provider,
        "database": row.database,
        "dsn": row.dsn,
        "app_dsn": row.app_dsn,
        "secret_ref": row.secret_ref,
        "stack_name": row.stack_name,
        "detail": row.detail,
    }


def _plan_json(plan: MovePlan, **extra: Any) -> dict[str, Any]:
    return {
        "move_id": str(plan.move_id),
        "tenant_id": str(plan.tenant_id),
        "source": asdict(plan.source),
        "target": asdict(plan.target),
        "epoch": plan.epoch,
        "mode": plan.mode,
        **extra,
    }


@DBOS.step(name="tenantctl.promotion.provision")
async def provision(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Provision the silo (idempotent names) and record it in the catalog before anything else (I5)."""
    ctx = runtime.current()
    tenant_id = await job_tenant(job)
    row = await _tenant_row(tenant_id)
    spec = SiloSpec(tenant_id=tenant_id, slug=row.slug, tier=row.tier)
    location: SiloLocation = await asyncio.to_thread(ctx.provisioner().provision, spec)
    values = {
        "name": location.name,
        "provider": location.provider,
        "database": location.database,
        "dsn": location.dsn,
        "app_dsn": location.app_dsn,
        "secret_ref": location.secret_ref,
        "stack_name": location.stack_name,
        "detail": dict(location.detail),
    }
    async with ctx.sessions().begin() as session:
        existing = await session.scalar(sa.select(locations.c.id).where(locations.c.name == location.name))
        if existing is None:
            existing = await session.scalar(
                sa.insert(locations)
                .values(kind="silo", tenant_id=tenant_id, status="provisioning", **values)
                .returning(locations.c.id)
            )
    return {**values, "id": str(existing)}


@DBOS.step(name="tenantctl.promotion.migrate")
async def migrate(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """The new silo gets exactly the pool's revision (Alembic runs in a subprocess)."""
    ctx = runtime.current()
    revision = await asyncio.to_thread(pool_revision, ctx.endpoints.pool_url)
    result = await asyncio.to_thread(
        migrate_target_to,
        outputs["provision"]["dsn"],
        revision,
        app_role=ctx.settings.app_role,
        replication_role=ctx.settings.replication_role,
    )
    return {"revision": revision, "status": str(getattr(result, "status", ""))}


@DBOS.step(name="tenantctl.promotion.plan")
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
    return _plan_json(plan, placement="silo")


@DBOS.step(name="tenantctl.demotion.plan")
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
    return _plan_json(plan, placement="pool", old_location=_location_json(row))


# -- data movement (before the point of no return: failures abort) ------------------------------


def _aborting(name: str, fn: Callable[[MovePlan], Any]) -> StepBody:
    async def body(job: dict[str, Any], outputs: dict[str, Any]) -> Any:
        plan = plan_of(outputs)
        try:
            result = await asyncio.to_thread(fn, plan)
            await runtime.current().pause()  # test hook: room to cancel or kill between steps
        except Exception:
            # Source stays authoritative: undo everything, then let the job fail with the reason.
            await compensate(job, outputs)
            raise
        return result if isinstance(result, dict | int | float | str | type(None)) else None

    return DBOS.step(name=f"tenantctl.move.{name}")(body)


def _online_only(fn: Callable[[MovePlan], Any]) -> Callable[[MovePlan], Any]:
    def run(plan: MovePlan) -> Any:
        return fn(plan) if plan.mode == "online" else None

    return run


def _replicate(plan: MovePlan) -> None:
    engine.start_replication(plan)
    engine.wait_initial_sync(plan)


def _cutover(plan: MovePlan) -> dict[str, Any]:
    if plan.mode == "online":
        details = verify_incremental(plan)
        return {k: v for k, v in details.items() if k != "fenced_at"}
    engine.fence_source(plan)
    copied = engine.copy_offline(plan)
    return {"copied": copied, "verified": engine.verify(plan)}


prepare = _aborting("prepare", engine.prepare_target)
replicate = _aborting("replicate", _online_only(_replicate))
cutover = _aborting("cutover", _cutover)


@DBOS.step(name="tenantctl.move.catch_up", retries_allowed=True, interval_seconds=5.0, max_attempts=4, backoff_rate=4.0)
async def catch_up(job: dict[str, Any], outputs: dict[str, Any]) -> int | None:
    """Fence only with a small backlog: bounded waits, backing off 5 s, 20 s, 80 s (never fail open)."""
    plan = plan_of(outputs)
    if plan.mode != "online":
        return None
    max_lag = runtime.current().settings.move_max_lag_bytes
    return await asyncio.to_thread(engine.wait_caught_up, plan, max_lag_bytes=max_lag, timeout=30.0)


# -- cutover and after (past the point of no return: only forward) ---------------------------------


def _forward(name: str, fn: Callable[[MovePlan], Any]) -> StepBody:
    async def body(job: dict[str, Any], outputs: dict[str, Any]) -> None:
        await asyncio.to_thread(fn, plan_of(outputs))

    return DBOS.step(name=f"tenantctl.move.{name}", retries_allowed=True, interval_seconds=1.0, max_attempts=5)(body)


activate = _forward("activate", engine.activate_target)
retire = _forward("retire", engine.retire_source)
stop_replication = _forward("stop_replication", _online_only(engine.stop_replication))


@DBOS.step(name="tenantctl.move.flip", retries_allowed=True, interval_seconds=1.0, max_attempts=5)
async def flip(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    """Route epoch + 1 to the target (the trigger NOTIFYs every replica); tenant active again."""
    plan = plan_of(outputs)
    placement = outputs["plan"]["placement"]
    async with runtime.current().sessions().begin() as session:
        current = await service.resolve_tenant(session, plan.tenant_id, lock=True)
        if current.route_epoch >= plan.new_epoch:
            return {"route_epoch": current.route_epoch}  # replayed after the commit
        await service.transition(
            session,
            tenant_id=plan.tenant_id,
            action=Action.FINISH_MOVE,
            actor=job["created_by"],
            values={
                "placement": placement,
                "location_id": uuid.UUID(plan.target.location_id),
                "route_epoch": tenants.c.route_epoch + 1,
            },
            detail={"job_id": job["id"], "to": placement, "location_id": plan.target.location_id},
        )
        if plan.target.kind == "silo":
            await session.execute(
                sa.update(locations).where(locations.c.id == uuid.UUID(plan.target.location_id)).values(status="ready")
            )
    return {"route_epoch": plan.new_epoch}


@DBOS.step(name="tenantctl.move.cleanup", retries_allowed=True, interval_seconds=1.0, max_attempts=5)
async def cleanup(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    ctx = runtime.current()
    plan = plan_of(outputs)
    await asyncio.sleep(ctx.settings.move_cleanup_grace_seconds)
    if plan.source.kind == "pool":
        deleted = await asyncio.to_thread(engine.cleanup_source, plan)
        return {"deleted_rows": deleted}
    old = outputs["plan"]["old_location"]
    location = SiloLocation(
        name=old["name"],
        provider=old["provider"],
        tenant_id=plan.tenant_id,
        database=old["database"],
        dsn=old["dsn"],
        app_dsn=old["app_dsn"],
        secret_ref=old["secret_ref"],
        stack_name=old["stack_name"],
        detail=old["detail"] or {},
    )
    await asyncio.to_thread(ctx.provisioner().deprovision, location)
    async with ctx.sessions().begin() as session:
        await session.execute(
            sa.update(locations).where(locations.c.id == uuid.UUID(old["id"])).values(status="deleted")
        )
    return {"deprovisioned": old["name"]}


# -- cancel / failure before the point of no return -----------------------------------------------


@DBOS.step(name="tenantctl.move.compensate")
async def compensate(job: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Source authoritative and untouched; nothing of the move left behind; tenant active."""
    ctx = runtime.current()
    tenant_id = await job_tenant(job)
    if "plan" in outputs:
        await asyncio.to_thread(engine.abort, plan_of(outputs))
    provisioned = outputs.get("provision")
    if provisioned is not None:
        location = SiloLocation(
            name=provisioned["name"],
            provider=provisioned["provider"],
            tenant_id=tenant_id,
            database=provisioned["database"],
            dsn=provisioned["dsn"],
            app_dsn=provisioned["app_dsn"],
            secret_ref=provisioned["secret_ref"],
            stack_name=provisioned["stack_name"],
            detail=provisioned["detail"] or {},
        )
        await asyncio.to_thread(ctx.provisioner().deprovision, location)
        async with ctx.sessions().begin() as session:
            await session.execute(
                sa.update(locations).where(locations.c.id == uuid.UUID(provisioned["id"])).values(status="deleted")
            )
    async with ctx.sessions().begin() as session:
        current = await service.resolve_tenant(session, tenant_id, lock=True)
        if current.status == "moving":
            await service.transition(
                session,
                tenant_id=tenant_id,
                action=Action.FINISH_MOVE,
                actor=job["created_by"],
                detail={"job_id": job["id"], "aborted": True},
            )


COMMON: dict[str, StepBody] = {
    "prepare": prepare,
    "replicate": replicate,
    "catch_up": catch_up,
    "cutover": cutover,
    "activate": activate,
    "flip": flip,
    "retire": retire,
    "stop_replication": stop_replication,
    "cleanup": cleanup,
}


@DBOS.workflow(name=PROMOTION.workflow_name)
async def promotion_workflow(job_id: str) -> str:
    bodies = {"provision": provision, "migrate": migrate, "plan": plan_promotion, **COMMON}
    return await run_job(job_id, PROMOTION, bodies, compensate)


@DBOS.workflow(name=DEMOTION.workflow_name)
async def demotion_workflow(job_id: str) -> str:
    return await run_job(job_id, DEMOTION, {"plan": plan_demotion, **COMMON}, compensate)
