"""``POST /v1/tenants/{id}/promote`` and ``/demote`` (202 with the job)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from control_plane.catalog import idempotency
from control_plane.catalog.dependencies import AdminPrincipal, CatalogSession, State
from control_plane.catalog.router import IdempotencyKey, _idempotent, job_json
from control_plane.catalog.schemas import JobEnvelope
from control_plane.moves import service
from data_plane.exceptions import ERROR_RESPONSES

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, tags=["moves"])


class MoveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: Literal["online", "offline"] = "online"


async def _move(
    tenant: str,
    to: Literal["silo", "pool"],
    body: MoveRequest | None,
    request: Request,
    state: State,
    session: CatalogSession,
    principal: AdminPrincipal,
    idempotency_key: str | None,
) -> JSONResponse:
    mode = (body or MoveRequest()).mode

    async def call() -> idempotency.StoredResponse:
        _, job = await service.start_move(
            session=session, ref=tenant, to=to, mode=mode, actor=principal.subject, enqueuer=state.enqueuer
        )
        return idempotency.StoredResponse(202, {"job": job_json(job)}, {"Location": f"/v1/jobs/{job.id}"})

    return await _idempotent(request, session, principal, idempotency_key, call)


@router.post("/tenants/{tenant}/promote", status_code=202, response_model=JobEnvelope)
async def promote(
    tenant: str,
    request: Request,
    state: State,
    session: CatalogSession,
    principal: AdminPrincipal,
    body: MoveRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Move an active pool tenant into its own silo (online by default; ``offline``: fence, then COPY)."""
    return await _move(tenant, "silo", body, request, state, session, principal, idempotency_key)


@router.post("/tenants/{tenant}/demote", status_code=202, response_model=JobEnvelope)
async def demote(
    tenant: str,
    request: Request,
    state: State,
    session: CatalogSession,
    principal: AdminPrincipal,
    body: MoveRequest | None = None,
    idempotency_key: IdempotencyKey = None,
) -> JSONResponse:
    """Move an active silo tenant back into the pool; its silo is deprovisioned after the grace period."""
    return await _move(tenant, "pool", body, request, state, session, principal, idempotency_key)
