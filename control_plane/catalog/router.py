"""Admin API routes for tenants and jobs (DESIGN §5). HTTP only: logic is in ``service``."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse

from control_plane.catalog import idempotency, service
from control_plane.catalog.dependencies import AdminPrincipal, CatalogSession, State
from control_plane.catalog.schemas import (
    JobEnvelope,
    JobKindName,
    JobOut,
    JobPage,
    JobStatus,
    PlacementKind,
    TenantCreate,
    TenantOut,
    TenantPage,
    TenantStatus,
    TenantUpdate,
    Tier,
)
from control_plane.workflows.jobs import JobRecord
from data_plane.auth import Principal
from data_plane.exceptions import ERROR_RESPONSES, InvalidInputError, TenantctlError

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES)

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        description="Same key + same body: the stored response; different body: 422; in flight: 409.",
    ),
]
JOB_HEADER = "X-Tenantctl-Job"


def job_json(job: JobRecord) -> dict[str, Any]:
    return JobOut(
        id=job.id,
        kind=job.kind,
        tenant_id=job.tenant_id,
        status=job.status,
        step=job.step,
        progress=job.progress,
        error=job.error,
        detail=job.detail,
        created_at=job.created_at,
        updated_at=job.updated_at,
    ).model_dump(mode="json")


def _etag(tenant: service.TenantView) -> dict[str, str]:
    return {"ETag": f'"{tenant.version}"'}


async def _idempotent(
    request: Request,
    session: CatalogSession,
    principal: Principal,
    key: str | None,
    call: Callable[[], Awaitable[idempotency.StoredResponse]],
) -> JSONResponse:
    """Run ``call`` at most once per (caller, Idempotency-Key); replay its stored response."""
    if key is None:
        result = await call()
        return JSONResponse(result.body, status_code=result.status, headers=result.headers)
    idempotency.validate_key(key)
    fingerprint = idempotency.request_hash(request.method, request.url.path, await request.body())
    stored = await idempotency.begin(session, actor=principal.subject, key=key, fingerprint=fingerprint)
    if stored is not None:
        return JSONResponse(
            stored.body, status_code=stored.status, headers={**stored.headers, "Idempotent-Replayed": "true"}
        )
    try:
        result = await call()
    except TenantctlError as exc:
        if not idempotency.is_stored(exc):
            # A failure, or a refusal about a state that passes: the retry runs again.
            await idempotency.release(session, actor=principal.subject, key=key)
            raise
        # A refused request is an answer too: the same retry gets the same refusal.
        result = idempotency.StoredResponse(
            status=exc.status_code,
            body={"error": {"code": exc.code, "message": exc.message}},
            headers=exc.headers() or {},
        )
    except BaseException:
        with contextlib.suppress(Exception):
            await idempotency.release(session, actor=principal.subject, key=key)
        raise
    await idempotency.complete(session, actor=principal.subject, key=key, response=result)
    return JSONResponse(result.body, status_code=result.status, headers=result.headers)


# -- tenants -------------------------------------------------------------------------------------


@router.post("/tenants", status_code=201, response_model=TenantOut, tags=["tenants"])
async def create_tenant(
    body: TenantCreate,
    request: Request,
    state: State,
    session: CatalogSession,
    principal: AdminPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Onboard a tenant. Pool tenants are active at once; silo tenants are ``provisioning``
    until their onboarding job (its id in the ``X-Tenantctl-Job`` header) activates them."""

    async def call() -> idempotency.StoredResponse:
        tenant, job = await service.create_tenant(
            session=session,
            policy=state.policy,
            enqueuer=state.enqueuer,
            pool_dsn=state.endpoints.pool_url,
            actor=principal.subject,
            slug=body.slug,
            name=body.name,
            tier=body.tier,
        )
        headers = {**_etag(tenant), "Location": f"/v1/tenants/{tenant.id}"}
        if job is not None:
            headers[JOB_HEADER] = str(job.id)
        return idempotency.StoredResponse(201, tenant.to_json(), headers)

    return await _idempotent(request, session, principal, idempotency_key, call)


@router.get("/tenants", response_model=TenantPage, tags=["tenants"])
async def list_tenants(
    session: CatalogSession,
    _: AdminPrincipal,
    status: TenantStatus | None = None,
    tier: Tier | None = None,
    placement: PlacementKind | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    views, next_cursor = await service.list_tenants(
        session=session, status=status, tier=tier, placement=placement, limit=limit, cursor=cursor
    )
    return {"data": [view.to_json() for view in views], "next_cursor": next_cursor}


@router.get("/tenants/{tenant}", response_model=TenantOut, tags=["tenants"])
async def get_tenant(tenant: str, session: CatalogSession, _: AdminPrincipal, response: Response) -> Any:
    """A tenant by id or slug."""
    view = await service.get_tenant(session=session, ref=tenant)
    response.headers.update(_etag(view))
    return view.to_json()


_IF_MATCH = re.compile(r'^\s*(?:W/)?"?(\d+)"?\s*$')


def _parse_if_match(value: str | None) -> int | None:
    if value is None:
        return None
    match = _IF_MATCH.match(value)
    if match is None:
        raise InvalidInputError('If-Match must be a tenant version such as "3"')
    return int(match.group(1))


@router.patch("/tenants/{tenant}", response_model=TenantOut, tags=["tenants"])
async def update_tenant(
    tenant: str,
    body: TenantUpdate,
    state: State,
    session: CatalogSession,
    principal: AdminPrincipal,
    response: Response,
    if_match: Annotated[str | None, Header(alias="If-Match")] = None,
) -> Any:
    """Change name and/or tier. With ``If-Match`` or ``version``: 409 ``version_conflict`` when stale.

    A PATCH restating the current values answers the tenant as it is: no version
    bump and no audit entry -- the audit log records changes of state, and this
    one changed nothing (a stale version is still refused).
    """
    header_version = _parse_if_match(if_match)
    if header_version is not None and body.version is not None and header_version != body.version:
        raise InvalidInputError("If-Match and version disagree")
    view = await service.update_tenant(
        session=session,
        policy=state.policy,
        ref=tenant,
        actor=principal.subject,
        name=body.name,
        tier=body.tier,
        expected_version=header_version if header_version is not None else body.version,
    )
    response.headers.update(_etag(view))
    return view.to_json()


@router.post("/tenants/{tenant}/suspend", response_model=TenantOut, tags=["tenants"])
async def suspend_tenant(
    tenant: str,
    request: Request,
    session: CatalogSession,
    principal: AdminPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """active -> suspended; the data plane answers 403 ``tenant_suspended`` meanwhile."""

    async def call() -> idempotency.StoredResponse:
        view = await service.suspend_tenant(session=session, ref=tenant, actor=principal.subject)
        return idempotency.StoredResponse(200, view.to_json(), _etag(view))

    return await _idempotent(request, session, principal, idempotency_key, call)


@router.post("/tenants/{tenant}/resume", response_model=TenantOut, tags=["tenants"])
async def resume_tenant(
    tenant: str,
    request: Request,
    session: CatalogSession,
    principal: AdminPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """suspended -> active."""

    async def call() -> idempotency.StoredResponse:
        view = await service.resume_tenant(session=session, ref=tenant, actor=principal.subject)
        return idempotency.StoredResponse(200, view.to_json(), _etag(view))

    return await _idempotent(request, session, principal, idempotency_key, call)


@router.delete("/tenants/{tenant}", status_code=202, response_model=JobEnvelope, tags=["tenants"])
async def offboard_tenant(
    tenant: str,
    request: Request,
    state: State,
    session: CatalogSession,
    principal: AdminPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Offboard: export the tenant's rows, delete them (or drop the silo), tombstone."""

    async def call() -> idempotency.StoredResponse:
        _, job = await service.offboard_tenant(
            session=session, ref=tenant, actor=principal.subject, enqueuer=state.enqueuer
        )
        return idempotency.StoredResponse(202, {"job": job_json(job)}, {"Location": f"/v1/jobs/{job.id}"})

    return await _idempotent(request, session, principal, idempotency_key, call)


# -- jobs ----------------------------------------------------------------------------------------


@router.get("/jobs", response_model=JobPage, tags=["jobs"])
async def list_jobs(
    session: CatalogSession,
    _: AdminPrincipal,
    tenant_id: uuid.UUID | None = None,
    kind: JobKindName | None = None,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 50,
    cursor: str | None = None,
) -> dict[str, Any]:
    """Most recent jobs first; pass ``next_cursor`` back as ``cursor`` for the next page."""
    records, next_cursor = await service.list_jobs(
        session=session, tenant_id=tenant_id, kind=kind, status=status, limit=limit, cursor=cursor
    )
    return {"data": [job_json(job) for job in records], "next_cursor": next_cursor}


@router.get("/jobs/{job_id}", response_model=JobOut, tags=["jobs"])
async def get_job(job_id: uuid.UUID, session: CatalogSession, _: AdminPrincipal) -> dict[str, Any]:
    return job_json(await service.get_job(session=session, job_id=job_id))


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobEnvelope, tags=["jobs"])
async def cancel_job(
    job_id: uuid.UUID,
    request: Request,
    state: State,
    session: CatalogSession,
    principal: AdminPrincipal,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """A pending job is cancelled at once; a running one at its next step, if it has not
    reached its point of no return (409 ``job_not_cancellable`` then)."""

    async def call() -> idempotency.StoredResponse:
        job = await service.cancel_job(session=session, job_id=job_id, actor=principal.subject)
        if job.status == "cancelled":
            # The job row already says cancelled (the workflow would skip it);
            # cancelling the DBOS workflow too keeps a worker from picking it up.
            await state.enqueuer.cancel(job.id)
        return idempotency.StoredResponse(202, {"job": job_json(job)})

    return await _idempotent(request, session, principal, idempotency_key, call)
