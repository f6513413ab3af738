"""Typed FastAPI dependencies of the tenant API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from data_plane.auth import TokenVerifier, bearer_token
from data_plane.routing import EngineRegistry, RouteDirectory
from data_plane.session import TenantContext

bearer_scheme = HTTPBearer(auto_error=False, description="Tenant token (aud tenantctl-api)")


async def tenant_context(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> TenantContext:
    """Authenticate, then resolve the route of the token's tenant (and only that)."""
    state = request.app.state
    verifier: TokenVerifier = state.verifier
    directory: RouteDirectory = state.routes
    engines: EngineRegistry = state.engines
    token = bearer_token(f"Bearer {credentials.credentials}" if credentials else None)
    principal = await verifier.verify(token)
    assert principal.tenant_id is not None  # require_tenant=True guarantees it
    route = (await directory.lookup(principal.tenant_id)).require_servable()
    request.state.route = route
    return TenantContext(tenant_id=principal.tenant_id, route=route, directory=directory, engines=engines)


Tenant = Annotated[TenantContext, Depends(tenant_context)]
