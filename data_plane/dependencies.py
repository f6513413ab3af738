"""Typed FastAPI dependencies of the tenant API."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from starlette.types import Scope

from data_plane.auth import TokenVerifier, bearer_token
from data_plane.limits import Quotas, TenantRateLimiter
from data_plane.routing import EngineRegistry, RouteDirectory
from data_plane.session import TenantContext


def authorization_of(scope: Scope) -> str | None:
    """The Authorization header, read from the raw ASGI headers (no ``Headers`` object)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bytes(value).decode("latin-1")
    return None


async def tenant_context(request: Request) -> TenantContext:
    """Authenticate, then resolve the route of the token's tenant (and only that).

    Reads the Authorization header itself rather than through a nested
    ``HTTPBearer`` dependency: each dependency level costs FastAPI tens of
    microseconds per request on the hot path. The bearer scheme is declared for
    OpenAPI in ``data_plane.api``.
    """
    state = request.app.state
    verifier: TokenVerifier = state.verifier
    directory: RouteDirectory = state.routes
    engines: EngineRegistry = state.engines
    principal = await verifier.verify(bearer_token(authorization_of(request.scope)))
    assert principal.tenant_id is not None  # require_tenant=True guarantees it
    route = (await directory.lookup(principal.tenant_id)).require_servable()
    request.state.route = route
    if route.upcoming is not None:
        engines.prewarm(route)  # a move is under way: connect to its target before the flip
    # After the route: the limit depends on the tier, and a 429 is then
    # labelled (metrics, access log) with the tenant's tier and placement.
    limiter: TenantRateLimiter = state.limiter
    await limiter.check(principal.tenant_id, route.tier)
    return TenantContext(tenant_id=principal.tenant_id, route=route, directory=directory, engines=engines)


Tenant = Annotated[TenantContext, Depends(tenant_context)]


async def quotas(request: Request) -> Quotas:
    """The tier quotas (only write routes that create rows depend on this).

    ``async`` although it awaits nothing: FastAPI runs a plain ``def``
    dependency in a worker thread, a thread hop per create request (and, on a
    saturated host, a wait for that thread to be scheduled).
    """
    value: Quotas = request.app.state.quotas
    return value


TierQuotas = Annotated[Quotas, Depends(quotas)]
