"""Typed FastAPI dependencies of the admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from control_plane.placement import PlacementPolicy
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.workflows.jobs import JobEnqueuer
from data_plane.auth import Principal, TokenVerifier, bearer_token
from data_plane.exceptions import AuthenticationError, ForbiddenError

ADMIN_SCOPE = "tenantctl:admin"


@dataclass
class CatalogState:
    """What the admin API's requests share; built in the app's lifespan."""

    settings: ControlPlaneSettings
    endpoints: Endpoints
    sessions: async_sessionmaker[AsyncSession]
    policy: PlacementPolicy
    enqueuer: JobEnqueuer
    verifier: TokenVerifier


async def catalog_state(request: Request) -> CatalogState:
    """The app's catalog state (``async``: FastAPI would run a ``def`` in a worker thread)."""
    state: CatalogState = request.app.state.catalog
    return state


State = Annotated[CatalogState, Depends(catalog_state)]


async def catalog_session(state: State) -> AsyncIterator[AsyncSession]:
    async with state.sessions() as session:
        yield session


def _scopes(claims: dict[str, object]) -> set[str]:
    scope = claims.get("scope")
    scopes = set(scope.split()) if isinstance(scope, str) else set()
    scp = claims.get("scp")
    if isinstance(scp, list):
        scopes.update(str(item) for item in scp)
    return scopes


async def admin_principal(
    state: State, authorization: Annotated[str | None, Header(include_in_schema=False)] = None
) -> Principal:
    """A verified admin: ``aud`` tenantctl-admin (401 otherwise) with the admin scope (403 otherwise)."""
    principal = await state.verifier.verify(bearer_token(authorization))
    if "tenant_id" in principal.claims:
        # A tenant's token must never administer tenants, whatever else it claims.
        raise AuthenticationError("tenant tokens are refused by the admin API", code="tenant_token")
    if ADMIN_SCOPE not in _scopes(principal.claims):
        raise ForbiddenError(f"the token lacks the {ADMIN_SCOPE!r} scope", code="insufficient_scope")
    return principal


CatalogSession = Annotated[AsyncSession, Depends(catalog_session)]
AdminPrincipal = Annotated[Principal, Depends(admin_principal)]
