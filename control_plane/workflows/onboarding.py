"""Onboarding of a silo tenant (kind ``onboarding``).

Pool tenants need no job: :func:`control_plane.catalog.service.create_tenant`
records them, has the pool claim them and activates them in the request.

Silo: ``provision`` (the configured :class:`SiloProvisioner`; deterministic
names make a retried call converge) -> ``record_location`` (the catalog knows
the silo before anything else happens, I5) -> ``migrate`` (to the *pool's*
current tenant-schema revision, read and applied under the fleet interlock, in
a separate process: Alembic is process-global) -> ``claim`` (the silo serves the tenant at its route epoch)
-> ``activate`` (location ready, tenant placed and ``active``, NOTIFY).

A failure leaves the tenant ``provisioning`` with its location recorded; an
operator can retry or offboard it (offboarding drops the silo). Cancel before
``activate`` drops whatever was provisioned and tombstones the tenant.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import sqlalchemy as sa
import structlog
from dbos import DBOS
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay, wait_exponential

from control_plane.catalog import service
from control_plane.catalog.lifecycle import Action
from control_plane.catalog.models import locations
from control_plane.exceptions import OperationLockedError
from control_plane.fleet.runner import migrate_new_silo
from control_plane.provisioning import credentials
from control_plane.provisioning.base import SiloLocation, SiloSpec
from control_plane.workflows import runtime, stores
from control_plane.workflows.kinds import ONBOARDING
from control_plane.workflows.steps import job_step, job_tenant, report_progress, run_job

KIND = ONBOARDING
# How long the migrate step waits for a running fleet migration before failing
# the job (a fleet run over hundreds of silos takes minutes, not hours).
FLEET_WAIT_S = 900.0

log = structlog.get_logger(__name__)


@job_step("tenantctl.onboarding.provision")
async def provision(job: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    ctx = runtime.current()
    tenant_id = await job_tenant(job)
    async with ctx.sessions().begin() as session:
        tenant = await service.resolve_tenant(session, tenant_id)
    spec = SiloSpec(tenant_id=tenant_id, slug=tenant.slug, tier=tenant.tier)
    location = await asyncio.to_thread(ctx.provisioner().provision, spec)
    if location.dsn is None:
        raise RuntimeError(f"the provisioner returned no owner DSN for {location.name}")
    return {**location.values(), "route_epoch": tenant.route_epoch}


@job_step("tenantctl.onboarding.record_location")
async def record_location(job: dict[str, Any], outputs: dict[str, Any]) -> str:
    tenant_id = await job_tenant(job)
    values = SiloLocation.from_values(tenant_id, outputs["provision"]).values()
    async with runtime.current().sessions()() as session:
        return await service.record_silo_location(session=session, tenant_id=tenant_id, values=values)


@job_step("tenantctl.onboarding.migrate")
async def migrate(job: dict[str, Any], outputs: dict[str, Any]) -> str | None:
    """Migrate the new silo to the pool's revision, with fleet runs locked out meanwhile.

    Reading the pool's revision and migrating the silo happen under the
    interlock (``migrate_new_silo``): otherwise a fleet run in between moves
    the pool on while the silo lands on the old revision. From here until
    ``activate`` the silo is ``provisioning`` and fleet runs include it (see
    ``control_plane.fleet.targets``). While a fleet run holds the interlock
    the step waits for it (up to ``FLEET_WAIT_S``) instead of failing the job.
    """
    ctx = runtime.current()
    loc = outputs["provision"]

    async def waiting(_state: RetryCallState) -> None:
        # Visible on the job (GET /v1/jobs/{id}): why it does not progress.
        log.info("onboarding_waits_for_fleet_migration", job_id=job["id"])
        await report_progress(job["id"], KIND, "migrate", 0.0, {"waiting_for": "fleet_migration"})

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(OperationLockedError),
        wait=wait_exponential(multiplier=0.5, max=10),
        stop=stop_after_delay(FLEET_WAIT_S),
        before_sleep=waiting,
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            result = await asyncio.to_thread(
                migrate_new_silo,
                await asyncio.to_thread(credentials.owner_dsn, loc),
                ctx.endpoints.pool_url,
                catalog_dsn=ctx.endpoints.catalog_url,
                app_role=ctx.settings.app_role,
                replication_role=ctx.settings.replication_role,
                name=loc["name"],
            )
    revision = result.to_revision
    await report_progress(job["id"], KIND, "migrate", 1.0, {"revision": revision})
    return revision


@job_step("tenantctl.onboarding.claim")
async def claim(job: dict[str, Any], outputs: dict[str, Any]) -> None:
    loc = outputs["provision"]
    owner = await asyncio.to_thread(credentials.owner_dsn, loc)
    await stores.claim_tenant(owner, await job_tenant(job), int(loc["route_epoch"]))


@job_step("tenantctl.onboarding.activate")
async def activate(job: dict[str, Any], outputs: dict[str, Any]) -> None:
    tenant_id = await job_tenant(job)
    location_id = uuid.UUID(outputs["record_location"])
    async with runtime.current().sessions().begin() as session:
        current = await service.resolve_tenant(session, tenant_id, lock=True)
        if current.status == "active" and current.location_id == location_id:
            return  # replayed after the commit
        await session.execute(
            sa.update(locations).where(locations.c.id == location_id).values(status="ready", updated_at=sa.func.now())
        )
        await service.transition(
            session,
            tenant_id=tenant_id,
            action=Action.ACTIVATE,
            actor=job["created_by"],
            values={"location_id": location_id},
            detail={"job_id": job["id"], "location": outputs["provision"]["name"]},
        )


@job_step("tenantctl.onboarding.compensate")
async def compensate(job: dict[str, Any], outputs: dict[str, Any]) -> None:
    """Drop what was provisioned; the never-active tenant is tombstoned."""
    ctx = runtime.current()
    tenant_id = await job_tenant(job)
    loc = outputs.get("provision")
    if loc is not None:
        location = SiloLocation.from_values(tenant_id, loc)
        await asyncio.to_thread(ctx.provisioner().deprovision, location)
    async with ctx.sessions().begin() as session:
        if loc is not None:
            await session.execute(
                sa.update(locations)
                .where(locations.c.name == loc["name"], locations.c.tenant_id == tenant_id)
                .values(status="deleted", updated_at=sa.func.now())
            )
        await service.tombstone_never_active(session, tenant_id=tenant_id, actor=job["created_by"], job_id=job["id"])


@DBOS.workflow(name=KIND.workflow_name)
async def onboarding_workflow(job_id: str) -> str:
    return await run_job(
        job_id,
        KIND,
        {
            "provision": provision,
            "record_location": record_location,
            "migrate": migrate,
            "claim": claim,
            "activate": activate,
        },
        compensate,
    )
