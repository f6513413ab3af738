"""Offboarding: fence -> export -> delete -> tombstone (kind ``offboarding``).

* ``fence``: the tenant's store drains in-flight transactions and refuses new
  ones (``tenantctl.fence_tenant``), so the export below is complete and no
  acknowledged write can land after it (I2).
* ``export``: every row to ``<state_dir>/exports/<tenant_id>/`` (format in
  :mod:`control_plane.workflows.export`).
* ``delete`` (point of no return): pool -- the tenant's rows, children first,
  in batches of ``offboard_batch_size`` rows, one transaction each, then its
  ownership row; silo -- the provisioner drops the database, and the location
  is marked deleted.
* ``tombstone``: status ``deleted``, ``route_epoch`` + 1 (NOTIFY tells every
  replica), audit ``tenant.tombstone``.

Every step is idempotent; a replay after a crash resumes with the step that
was running (a half-done delete just deletes what is left).
Cancel before ``delete``: the store is unfenced, the export removed and the
tenant returns to the status it had.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from typing import Any

import sqlalchemy as sa
from dbos import DBOS

from control_plane.catalog import service
from control_plane.catalog.lifecycle import Action
from control_plane.catalog.models import locations, tenants
from control_plane.fleet.runner import pool_revision
from control_plane.provisioning import credentials
from control_plane.provisioning.base import LOCATION_COLUMNS, SiloLocation
from control_plane.workflows import export, runtime, stores
from control_plane.workflows.kinds import OFFBOARDING
from control_plane.workflows.steps import job_step, job_tenant, report_progress, run_job

KIND = OFFBOARDING


async def _store(tenant_id: uuid.UUID) -> dict[str, Any]:
    """Where the tenant's rows are: {"kind": pool|silo|none, "dsn", "location": {...}}.

    ``dsn`` is None when there are no rows to fence or export: a silo whose
    onboarding failed (its location is still dropped), or none at all.
    """
    ctx = runtime.current()
    async with ctx.sessions().begin() as session:
        row = (
            await session.execute(
                sa.select(tenants.c.placement, tenants.c.slug, tenants.c.route_epoch, locations)
                .select_from(tenants.outerjoin(locations, locations.c.id == tenants.c.location_id))
                .where(tenants.c.id == tenant_id)
            )
        ).one()
        base = {"slug": row.slug, "route_epoch": int(row.route_epoch)}
        if row.placement == "pool":
            return {**base, "kind": "pool", "dsn": ctx.endpoints.pool_url}
        if row.id is not None and row.dsn is not None:
            location = {"id": str(row.id), **{name: getattr(row, name) for name in LOCATION_COLUMNS}}
            return {**base, "kind": "silo", "dsn": row.dsn, "location": location}
        # Never activated (onboarding's last step sets tenants.location_id): a
        # failed silo onboarding, which served nothing, so there is nothing to
        # fence or export (its silo may not even be migrated). But a silo it
        # recorded is dropped: looked up through the tenant's id, it used to be
        # left behind, "provisioning" forever (on AWS, an RDS instance billing on).
        recorded = (
            await session.execute(
                sa.select(locations)
                .where(locations.c.tenant_id == tenant_id, locations.c.kind == "silo", locations.c.status != "deleted")
                .order_by(locations.c.created_at.desc())
                .limit(1)
            )
        ).one_or_none()
    if recorded is None:
        return {**base, "kind": "none", "dsn": None}
    location = {"id": str(recorded.id), **{name: getattr(recorded, name) for name in LOCATION_COLUMNS}}
    return {**base, "kind": "silo", "dsn": None, "location": location}


async def _owner(store: dict[str, Any]) -> str:
    """The store's owner DSN, with the silo's master password read now (steps record none)."""
    if store["kind"] == "silo":
        return await asyncio.to_thread(credentials.owner_dsn, store["location"])
    return str(store["dsn"])


@job_step("tenantctl.offboarding.fence")
async def fence(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    tenant_id = await job_tenant(job)
    store = await _store(tenant_id)
    if store["dsn"] is not None:
        await stores.fence_tenant(await _owner(store), tenant_id)
    return store


@job_step("tenantctl.offboarding.export")
async def export_rows(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    ctx = runtime.current()
    tenant_id = await job_tenant(job)
    store = outputs["fence"]
    base = ctx.settings.export_dir
    if store["dsn"] is None:
        return {"path": None, "rows": 0}
    owner = await _owner(store)
    revision = await asyncio.to_thread(pool_revision, owner)
    manifest = await asyncio.to_thread(
        export.export_tenant, owner, tenant_id, base, slug=store["slug"], schema_revision=revision
    )
    rows = sum(int(table["rows"]) for table in manifest["tables"])
    await report_progress(job["id"], KIND, "export", 1.0, {"rows": rows, "tables": len(manifest["tables"])})
    await ctx.pause()
    return {"path": str(export.export_dir_for(base, tenant_id)), "rows": rows}


async def _delete_pool_rows(job: dict[str, Any], dsn: str, tenant_id: uuid.UUID) -> int:
    ctx = runtime.current()
    batch = ctx.settings.offboard_batch_size
    remaining = await asyncio.to_thread(export.count_rows, dsn, tenant_id)
    total = sum(remaining.values())
    deleted = 0
    # Children first: a parent's ON DELETE CASCADE would otherwise delete
    # children in one unbounded statement.
    for table in reversed(list(remaining)):
        while True:
            count = await asyncio.to_thread(export.delete_batch, dsn, table, tenant_id, batch)
            if count == 0:
                break
            deleted += count
            fraction = deleted / total if total else 1.0
            await report_progress(
                job["id"],
                KIND,
                "delete",
                fraction,
                {"rows_deleted": deleted, "rows_total": total, "table": table},
            )
            await ctx.pause()
    await stores.release_tenant(dsn, tenant_id)
    return deleted


@job_step("tenantctl.offboarding.delete")
async def delete_rows(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    ctx = runtime.current()
    tenant_id = await job_tenant(job)
    store = outputs["fence"]
    if store["kind"] == "pool":
        return {"rows_deleted": await _delete_pool_rows(job, store["dsn"], tenant_id)}
    if store["kind"] == "silo":
        loc = store["location"]
        location = SiloLocation.from_values(tenant_id, loc)
        await asyncio.to_thread(ctx.provisioner().deprovision, location)
        async with ctx.sessions().begin() as session:
            await session.execute(
                sa.update(locations)
                .where(locations.c.id == uuid.UUID(loc["id"]))
                .values(status="deleted", updated_at=sa.func.now())
            )
        await report_progress(job["id"], KIND, "delete", 1.0, {"silo": loc["name"], "dropped": True})
        return {"silo_dropped": loc["name"]}
    return {}


@job_step("tenantctl.offboarding.tombstone")
async def tombstone(job: dict[str, Any], outputs: dict[str, Any]) -> None:
    tenant_id = await job_tenant(job)
    async with runtime.current().sessions().begin() as session:
        current = await service.resolve_tenant(session, tenant_id, lock=True)
        if current.status == "deleted":
            return  # replayed after the commit: done already
        await service.transition(
            session,
            tenant_id=tenant_id,
            action=Action.TOMBSTONE,
            actor=job["created_by"],
            values={"route_epoch": tenants.c.route_epoch + 1},
            detail={"job_id": job["id"], "export": outputs["export"]["path"]},
        )


@job_step("tenantctl.offboarding.compensate")
async def compensate(job: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Undo fence and export; the tenant gets its previous status back."""
    ctx = runtime.current()
    tenant_id = await job_tenant(job)
    store = outputs.get("fence")
    if (
        store is not None
        and store["dsn"] is not None
        and await stores.ownership_state(await _owner(store), tenant_id) == "fenced"
    ):
        await stores.claim_tenant(await _owner(store), tenant_id, store["route_epoch"], "active")
    shutil.rmtree(export.export_dir_for(ctx.settings.export_dir, tenant_id), ignore_errors=True)
    async with ctx.sessions().begin() as session:
        current = await service.resolve_tenant(session, tenant_id, lock=True)
        if current.status != "offboarding":
            return
        await service.transition(
            session,
            tenant_id=tenant_id,
            action=Action.CANCEL_OFFBOARD,
            actor=job["created_by"],
            previous=str(job["params"].get("previous_status")),
            detail={"job_id": job["id"]},
        )


@DBOS.workflow(name=KIND.workflow_name)
async def offboarding_workflow(job_id: str) -> str:
    return await run_job(
        job_id,
        KIND,
        {"fence": fence, "export": export_rows, "delete": delete_rows, "tombstone": tombstone},
        compensate,
    )
