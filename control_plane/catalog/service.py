"""Catalog operations. Keyword-only, async, raising project exceptions (never HTTP).

Every status change goes through :func:`transition` (which asks the state
machine in :mod:`control_plane.catalog.lifecycle`), and every admin action
writes one ``audit_log`` row in the same transaction as its effect.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.catalog.lifecycle import Action, Status, check_editable, next_status
from control_plane.catalog.models import audit_log, jobs, locations, tenants
from control_plane.catalog.schemas import SLUG, parse_tenant_id
from control_plane.exceptions import SiloOwnershipError, VersionConflictError
from control_plane.placement import Placement, PlacementPolicy
from control_plane.workflows import jobs as jobs_mod
from control_plane.workflows.jobs import JobEnqueuer, JobRecord
from control_plane.workflows.kinds import DEMOTION, OFFBOARDING, ONBOARDING, PROMOTION, JobKind
from control_plane.workflows.stores import claim_tenant
from data_plane import pagination
from data_plane.exceptions import ConflictError, NotFoundError

POOL_LOCATION = "pool"
MAX_PAGE = 200


@dataclass(frozen=True)
class TenantView:
    id: uuid.UUID
    slug: str
    name: str
    tier: str
    status: str
    placement: str
    location: str | None
    location_id: uuid.UUID | None
    route_epoch: int
    version: int
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        """The DESIGN §5 tenant shape (plus ``version``, the ETag)."""
        return {
            "id": str(self.id),
            "slug": self.slug,
            "name": self.name,
            "tier": self.tier,
            "status": self.status,
            "placement": {"kind": self.placement, "location": self.location},
            "route_epoch": self.route_epoch,
            "version": self.version,
        }


def _tenant_select() -> sa.Select[Any]:
    return sa.select(
        tenants.c.id,
        tenants.c.slug,
        tenants.c.name,
        tenants.c.tier,
        tenants.c.status,
        tenants.c.placement,
        locations.c.name.label("location"),
        tenants.c.location_id,
        tenants.c.route_epoch,
        tenants.c.version,
        tenants.c.created_at,
    ).select_from(tenants.outerjoin(locations, locations.c.id == tenants.c.location_id))


def _view(row: sa.Row[Any]) -> TenantView:
    return TenantView(**{name: getattr(row, name) for name in TenantView.__dataclass_fields__})


async def write_audit(
    session: AsyncSession,
    *,
    actor: str,
    action: str,
    tenant_id: uuid.UUID | None,
    detail: dict[str, Any] | None = None,
) -> None:
    await session.execute(
        sa.insert(audit_log).values(actor=actor, action=action, tenant_id=tenant_id, detail=detail or {})
    )


def _ref_condition(ref: str | uuid.UUID) -> sa.ColumnElement[bool] | None:
    """An id matches only an id, a slug only a slug (no slug can have an id's form: schemas.Slug).

    None for a reference that can name no tenant (neither form), which is not
    asked at all: PostgreSQL text cannot hold NUL, so ``/v1/tenants/a%00b``
    failed in the driver (a 500).
    """
    if isinstance(ref, uuid.UUID):
        return tenants.c.id == ref
    tenant_id = parse_tenant_id(ref)
    if tenant_id is not None:
        return tenants.c.id == tenant_id
    if SLUG.fullmatch(ref) is None:
        return None
    return tenants.c.slug == ref


async def resolve_tenant(session: AsyncSession, ref: str | uuid.UUID, *, lock: bool = False) -> TenantView:
    """A tenant by id or slug; ``lock`` takes its row lock (FOR UPDATE OF tenants)."""
    condition = _ref_condition(ref)
    if condition is None:
        raise NotFoundError("tenant not found")
    query = _tenant_select().where(condition)
    if lock:
        query = query.with_for_update(of=tenants)
    row = (await session.execute(query)).one_or_none()
    if row is None:
        raise NotFoundError("tenant not found")
    return _view(row)


async def transition(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    action: Action,
    actor: str,
    previous: str | None = None,
    values: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
    current: TenantView | None = None,
) -> TenantView:
    """Apply a lifecycle action in the caller's transaction, with its audit entry; the tenant after it.

    ``current``: the tenant as the caller already read it *with its row lock*
    in this transaction (saves reading it again, e.g. inside a write pause).
    """
    await apply_transition(
        session,
        tenant_id=tenant_id,
        action=action,
        actor=actor,
        previous=previous,
        values=values,
        detail=detail,
        current=current,
    )
    return await resolve_tenant(session, tenant_id)


async def apply_transition(
    session: AsyncSession,
    *,
    tenant_id: uuid.UUID,
    action: Action,
    actor: str,
    previous: str | None = None,
    values: dict[str, Any] | None = None,
    detail: dict[str, Any] | None = None,
    current: TenantView | None = None,
) -> None:
    """:func:`transition` without reading the tenant back (one round trip less inside a move's write pause)."""
    if current is None or current.id != tenant_id:
        current = await resolve_tenant(session, tenant_id, lock=True)
    target = next_status(action, current.status, previous=previous)
    extra = dict(values or {})
    if target is Status.DELETED:
        extra["deleted_at"] = sa.func.now()
    await session.execute(
        sa.update(tenants)
        .where(tenants.c.id == tenant_id)
        .values(status=target.value, version=tenants.c.version + 1, updated_at=sa.func.now(), **extra)
    )
    await write_audit(
        session,
        actor=actor,
        action=f"tenant.{action.value}",
        tenant_id=tenant_id,
        detail={"from": current.status, "to": target.value, **(detail or {})},
    )


# -- reads ---------------------------------------------------------------------------------------


async def get_tenant(*, session: AsyncSession, ref: str) -> TenantView:
    async with session.begin():
        return await resolve_tenant(session, ref)


def encode_cursor(view: TenantView) -> str:
    raw = json.dumps([view.created_at.isoformat(), str(view.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    """The position a cursor names, in UTC; 422 ``invalid_cursor`` for anything we did not write.

    The tenant API's decoder, whose checks matter here too: a crafted time
    that is naive, or exists only with its offset (0001-01-01T00:00+01:00),
    is refused here -- the driver converting it to UTC inside the query was a 500.
    """
    decoded = pagination.decode_cursor(cursor)
    assert decoded is not None  # only None for no cursor
    return decoded


async def list_tenants(
    *,
    session: AsyncSession,
    status: str | None = None,
    tier: str | None = None,
    placement: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[TenantView], str | None]:
    """One page ordered by (created_at, id); ``next_cursor`` is None on the last page."""
    limit = max(1, min(limit, MAX_PAGE))
    query = _tenant_select().order_by(tenants.c.created_at, tenants.c.id).limit(limit + 1)
    if status is not None:
        query = query.where(tenants.c.status == status)
    if tier is not None:
        query = query.where(tenants.c.tier == tier)
    if placement is not None:
        query = query.where(tenants.c.placement == placement)
    if cursor is not None:
        after_at, after_id = decode_cursor(cursor)
        query = query.where(sa.tuple_(tenants.c.created_at, tenants.c.id) > sa.tuple_(after_at, after_id))
    async with session.begin():
        rows = (await session.execute(query)).all()
    views = [_view(row) for row in rows[:limit]]
    next_cursor = encode_cursor(views[-1]) if len(rows) > limit else None
    return views, next_cursor


# -- commands ------------------------------------------------------------------------------------


async def _pool_location_id(session: AsyncSession) -> uuid.UUID:
    location_id = await session.scalar(sa.select(locations.c.id).where(locations.c.name == POOL_LOCATION))
    if location_id is None:
        raise NotFoundError("the catalog has no pool location")
    return uuid.UUID(str(location_id))


async def create_tenant(
    *,
    session: AsyncSession,
    policy: PlacementPolicy,
    enqueuer: JobEnqueuer,
    pool_dsn: str,
    actor: str,
    slug: str,
    name: str,
    tier: str,
) -> tuple[TenantView, JobRecord | None]:
    """Onboard a tenant at the placement its tier maps to.

    Pool: the catalog row is recorded as ``provisioning`` first, then the pool
    claims the tenant, then it turns ``active`` -- so a crash in between
    leaves a visible, offboardable tenant rather than an unrecorded claim.
    Silo: the row and an onboarding job are created together; the job
    provisions, migrates and claims the silo, then activates the tenant.
    """
    placement = policy.placement_for(tier)
    tenant_id = uuid.uuid4()
    try:
        async with session.begin():
            location_id = await _pool_location_id(session) if placement is Placement.POOL else None
            await session.execute(
                sa.insert(tenants).values(
                    id=tenant_id,
                    slug=slug,
                    name=name,
                    tier=tier,
                    status=Status.PROVISIONING.value,
                    placement=placement.value,
                    location_id=location_id,
                )
            )
            await write_audit(
                session,
                actor=actor,
                action="tenant.create",
                tenant_id=tenant_id,
                detail={"slug": slug, "name": name, "tier": tier, "placement": placement.value},
            )
            job = None
            if placement is Placement.SILO:
                job = await jobs_mod.create_job(
                    session, enqueuer=enqueuer, kind=ONBOARDING, tenant_id=tenant_id, actor=actor
                )
            view = await resolve_tenant(session, tenant_id)
    except IntegrityError as exc:
        if "uq_tenants_slug" not in str(exc.orig):
            raise
        view = await _unfinished_pool_onboarding(session, slug=slug, name=name, tier=tier, placement=placement)
        job = None
    if placement is Placement.POOL:
        await claim_tenant(pool_dsn, view.id, view.route_epoch)
        async with session.begin():
            view = await transition(session, tenant_id=view.id, action=Action.ACTIVATE, actor=actor)
    return view, job


async def _unfinished_pool_onboarding(
    session: AsyncSession, *, slug: str, name: str, tier: str, placement: Placement
) -> TenantView:
    """The same pool tenant, recorded by an attempt that died before activating it (I5:
    the retry resumes it); anything else with this slug is a 409."""
    async with session.begin():
        existing = await resolve_tenant(session, slug)
    if (
        placement is Placement.POOL
        and existing.status == Status.PROVISIONING
        and existing.placement == Placement.POOL
        and (existing.name, existing.tier) == (name, tier)
    ):
        return existing
    raise ConflictError(f"slug {slug!r} is taken", code="slug_taken")


async def update_tenant(
    *,
    session: AsyncSession,
    policy: PlacementPolicy,
    ref: str,
    actor: str,
    name: str | None = None,
    tier: str | None = None,
    expected_version: int | None = None,
) -> TenantView:
    """Change name and/or tier (a tier change moves no data)."""
    if tier is not None:
        policy.validate_tier(tier)
    async with session.begin():
        current = await resolve_tenant(session, ref, lock=True)
        if expected_version is not None and expected_version != current.version:
            raise VersionConflictError(f"the tenant is at version {current.version}, not {expected_version}")
        check_editable(current.status)
        changes = {
            key: value
            for key, value in (("name", name), ("tier", tier))
            if value is not None and value != getattr(current, key)
        }
        if not changes:
            return current
        await session.execute(
            sa.update(tenants)
            .where(tenants.c.id == current.id)
            .values(**changes, version=tenants.c.version + 1, updated_at=sa.func.now())
        )
        await write_audit(
            session,
            actor=actor,
            action="tenant.update",
            tenant_id=current.id,
            detail={key: {"from": getattr(current, key), "to": value} for key, value in changes.items()},
        )
        return await resolve_tenant(session, current.id)


async def suspend_tenant(*, session: AsyncSession, ref: str, actor: str) -> TenantView:
    async with session.begin():
        current = await resolve_tenant(session, ref)
        return await transition(session, tenant_id=current.id, action=Action.SUSPEND, actor=actor)


async def resume_tenant(*, session: AsyncSession, ref: str, actor: str) -> TenantView:
    async with session.begin():
        current = await resolve_tenant(session, ref)
        return await transition(session, tenant_id=current.id, action=Action.RESUME, actor=actor)


async def start_tenant_job(
    *,
    session: AsyncSession,
    ref: str,
    action: Action,
    kind: JobKind,
    actor: str,
    enqueuer: JobEnqueuer,
    params: dict[str, Any] | None = None,
) -> tuple[TenantView, JobRecord]:
    """Move the tenant's status by ``action`` and start a ``kind`` job, in one transaction.

    The generic entry point of every tenant workflow: offboarding uses it with
    ``Action.OFFBOARD``; promotion/demotion plug in with ``Action.START_MOVE``
    and their own :class:`JobKind`. ``params`` always records the status the
    tenant had (``previous_status``), which compensations restore.
    """
    async with session.begin():
        current = await resolve_tenant(session, ref, lock=True)
        view = await transition(session, tenant_id=current.id, action=action, actor=actor)
        job = await jobs_mod.create_job(
            session,
            enqueuer=enqueuer,
            kind=kind,
            tenant_id=current.id,
            actor=actor,
            params={"previous_status": current.status, **(params or {})},
        )
        return view, job


async def offboard_tenant(
    *, session: AsyncSession, ref: str, actor: str, enqueuer: JobEnqueuer
) -> tuple[TenantView, JobRecord]:
    """Mark the tenant ``offboarding`` and start the offboarding job (export, delete, tombstone)."""
    return await start_tenant_job(
        session=session, ref=ref, action=Action.OFFBOARD, kind=OFFBOARDING, actor=actor, enqueuer=enqueuer
    )


async def _restore_after_offboarding(session: AsyncSession, job: JobRecord) -> None:
    assert job.tenant_id is not None
    await transition(
        session,
        tenant_id=job.tenant_id,
        action=Action.CANCEL_OFFBOARD,
        actor=job.created_by,
        previous=str(job.params.get("previous_status")),
        detail={"job_id": str(job.id)},
    )


async def tombstone_never_active(session: AsyncSession, *, tenant_id: uuid.UUID, actor: str, job_id: str) -> None:
    """A cancelled onboarding: the tenant that never became active is offboarded and tombstoned."""
    current = await resolve_tenant(session, tenant_id, lock=True)
    if current.status == Status.PROVISIONING:
        await transition(session, tenant_id=tenant_id, action=Action.OFFBOARD, actor=actor, detail={"job_id": job_id})
        current = await resolve_tenant(session, tenant_id)
    if current.status == Status.OFFBOARDING:
        await transition(session, tenant_id=tenant_id, action=Action.TOMBSTONE, actor=actor, detail={"job_id": job_id})


async def _cancel_pending_onboarding(session: AsyncSession, job: JobRecord) -> None:
    assert job.tenant_id is not None
    await tombstone_never_active(session, tenant_id=job.tenant_id, actor=job.created_by, job_id=str(job.id))


async def _cancel_pending_move(session: AsyncSession, job: JobRecord) -> None:
    """A promotion/demotion cancelled before its worker started: nothing moved, the tenant is active again.

    Without this the tenant would stay ``moving`` forever -- refused every
    further move and blocking every fleet migration.
    """
    assert job.tenant_id is not None
    current = await resolve_tenant(session, job.tenant_id, lock=True)
    if current.status == Status.MOVING:
        await transition(
            session,
            tenant_id=job.tenant_id,
            action=Action.FINISH_MOVE,
            actor=job.created_by,
            detail={"job_id": str(job.id), "cancelled": True},
        )


PENDING_COMPENSATIONS: dict[str, jobs_mod.PendingCompensation] = {
    OFFBOARDING.name: _restore_after_offboarding,
    ONBOARDING.name: _cancel_pending_onboarding,
    PROMOTION.name: _cancel_pending_move,
    DEMOTION.name: _cancel_pending_move,
}


async def get_job(*, session: AsyncSession, job_id: uuid.UUID) -> JobRecord:
    async with session.begin():
        return await jobs_mod.get_job(session, job_id)


def encode_job_cursor(job: JobRecord) -> str:
    """The position after ``job`` in the newest-first job list (same format as tenant cursors)."""
    raw = json.dumps([job.created_at.isoformat(), str(job.id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def record_silo_location(*, session: AsyncSession, tenant_id: uuid.UUID, values: dict[str, Any]) -> str:
    """Upsert a silo's ``locations`` row as ``provisioning``; a row left by an earlier attempt is reused.

    Refuses (:class:`SiloOwnershipError`) a name already recorded for another tenant.
    """
    statement = insert(locations).values(kind="silo", tenant_id=tenant_id, status="provisioning", **values)
    statement = statement.on_conflict_do_update(
        index_elements=[locations.c.name],
        set_={key: statement.excluded[key] for key in values} | {"status": "provisioning", "updated_at": sa.func.now()},
        where=locations.c.tenant_id == tenant_id,
    )
    async with session.begin():
        location_id = await session.scalar(statement.returning(locations.c.id))
    if location_id is None:
        raise SiloOwnershipError(f"location {values['name']} belongs to another tenant")
    return str(location_id)


async def list_jobs(
    *,
    session: AsyncSession,
    tenant_id: uuid.UUID | None = None,
    kind: str | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[JobRecord], str | None]:
    """One page, newest first, ordered by (created_at, id) descending; ``next_cursor`` is None on the last page.

    Keyset pagination: a job created while an operator pages through the list
    appears on no page rather than shifting every later page by one.
    """
    limit = max(1, min(limit, MAX_PAGE))
    query = sa.select(jobs).order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit + 1)
    if tenant_id is not None:
        query = query.where(jobs.c.tenant_id == tenant_id)
    if kind is not None:
        query = query.where(jobs.c.kind == kind)
    if status is not None:
        query = query.where(jobs.c.status == status)
    if cursor is not None:
        before_at, before_id = decode_cursor(cursor)
        query = query.where(sa.tuple_(jobs.c.created_at, jobs.c.id) < sa.tuple_(before_at, before_id))
    async with session.begin():
        rows = (await session.execute(query)).all()
    records = [JobRecord.from_row(row) for row in rows[:limit]]
    next_cursor = encode_job_cursor(records[-1]) if len(rows) > limit else None
    return records, next_cursor


async def cancel_job(*, session: AsyncSession, job_id: uuid.UUID, actor: str) -> JobRecord:
    """Cancel a job (see :func:`control_plane.workflows.jobs.cancel_job`), audited."""
    async with session.begin():
        job = await jobs_mod.cancel_job(session, job_id=job_id, compensations=PENDING_COMPENSATIONS)
        await write_audit(
            session,
            actor=actor,
            action="job.cancel",
            tenant_id=job.tenant_id,
            detail={"job_id": str(job.id), "kind": job.kind, "status": job.status},
        )
        return job
