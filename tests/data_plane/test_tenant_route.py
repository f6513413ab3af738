"""``TenantRoute`` solves ``Tenant`` itself: the same answers as FastAPI's solver, one verification each.

Every probe endpoint is declared twice: on a ``TenantRoute`` (the tenant API's
route class) and on a plain ``APIRoute``, whose ``Tenant`` FastAPI solves. Both
must authenticate (the plain one is the fail-closed control) and answer alike.
"""

from __future__ import annotations

from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.routing import APIRoute

from data_plane.api import create_app
from data_plane.dependencies import Tenant, TenantRoute, tenant_context
from data_plane.session import TenantContext
from data_plane.settings import DataPlaneSettings
from tests.conftest import asgi_client
from tests.data_plane.conftest import World

ROUTE_CLASSES = {"fast": TenantRoute, "plain": APIRoute}


async def tenant_slug(tenant: Tenant) -> str:
    """A dependency that depends on ``Tenant`` too: it must see the endpoint's own context."""
    return str(tenant.tenant_id)


def probe_app(settings: DataPlaneSettings) -> FastAPI:
    app = create_app(settings)

    async def probe(tenant: Tenant, request: Request, seen_by_dependency: Annotated[str, Depends(tenant_slug)]) -> Any:
        return {
            "tenant_id": str(tenant.tenant_id),
            "same_context": seen_by_dependency == str(tenant.tenant_id),
            "path": request.url.path,
        }

    async def guarded() -> Any:
        return {"ok": True}

    for kind, route_class in ROUTE_CLASSES.items():
        app.router.add_api_route(f"/v1/_probe/{kind}", probe, route_class_override=route_class)
        app.router.add_api_route(
            f"/v1/_guarded/{kind}", guarded, dependencies=[Depends(tenant_context)], route_class_override=route_class
        )
    return app


@pytest.fixture
async def probe_client(dp_settings: DataPlaneSettings, world: World) -> Any:
    async for client in asgi_client(probe_app(dp_settings)):
        yield client


def test_every_tenant_route_of_the_api_is_a_tenant_route(dp_settings: DataPlaneSettings) -> None:
    """A tenant route left on a plain APIRoute would still be checked, only slower: this keeps them fast."""
    app = create_app(dp_settings)
    tenant_routes = [
        route
        for route in app.routes
        if isinstance(route, APIRoute) and any(sub.call is tenant_context for sub in route.dependant.dependencies)
    ]
    assert len(tenant_routes) >= 11  # /v1/me, projects and tasks
    assert [route.path for route in tenant_routes if not isinstance(route, TenantRoute)] == []


@pytest.mark.parametrize("kind", ROUTE_CLASSES)
async def test_both_route_classes_give_the_token_tenant_and_refuse_a_forged_token(
    probe_client: httpx.AsyncClient, world: World, kind: str
) -> None:
    a = world["A"]
    allowed = await probe_client.get(f"/v1/_probe/{kind}", headers=a.headers)
    assert allowed.status_code == 200, allowed.text
    assert allowed.json() == {"tenant_id": str(a.id), "same_context": True, "path": f"/v1/_probe/{kind}"}
    guarded = await probe_client.get(f"/v1/_guarded/{kind}", headers=a.headers)
    assert guarded.status_code == 200, guarded.text

    forged = {"Authorization": f"Bearer {a.token[:-4]}AAAA"}
    for path in (f"/v1/_probe/{kind}", f"/v1/_guarded/{kind}"):
        denied = await probe_client.get(path, headers=forged)
        assert denied.status_code == 401, denied.text
        assert set(denied.json()["error"]) == {"code", "message"}
        assert str(a.id) not in denied.text
        assert (await probe_client.get(path)).status_code == 401  # no token at all


async def test_a_dependency_on_tenant_shares_one_verification(dp_settings: DataPlaneSettings, world: World) -> None:
    """One request, one rate-limit hit, though both the endpoint and its dependency ask for ``Tenant``."""
    a = world["A"]
    app = probe_app(dp_settings.model_copy(update={"rate_limits": {"standard": "3/minute"}}))
    async for client in asgi_client(app):
        statuses = [(await client.get("/v1/_probe/fast", headers=a.headers)).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]


async def test_an_unauthenticated_request_learns_nothing_about_its_body(
    client: httpx.AsyncClient, world: World
) -> None:
    broken = {"content-type": "application/json"}
    forged = broken | {"Authorization": f"Bearer {world['A'].token[:-4]}AAAA"}
    denied = await client.post("/v1/projects", headers=forged, content=b'{"name": ')
    assert denied.status_code == 401, denied.text
    # Control: the same body from the tenant itself is a validation error.
    invalid = await client.post("/v1/projects", headers=broken | world["A"].headers, content=b'{"name": ')
    assert invalid.status_code == 422, invalid.text


async def test_an_override_of_tenant_context_is_honoured(dp_settings: DataPlaneSettings, world: World) -> None:
    app = create_app(dp_settings)

    async def refuse_everyone() -> TenantContext:
        raise HTTPException(418, "overridden")

    app.dependency_overrides[tenant_context] = refuse_everyone
    async for client in asgi_client(app):
        assert (await client.get("/v1/me", headers=world["A"].headers)).status_code == 418
        app.dependency_overrides.clear()
        # Control: without the override the tenant's own request is served.
        assert (await client.get("/v1/me", headers=world["A"].headers)).status_code == 200


async def test_a_tenant_route_included_with_include_router_verifies_once(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    """``include_router`` builds the handler from FastAPI's own copy: still one verification a request."""
    a = world["A"]
    app = create_app(dp_settings.model_copy(update={"rate_limits": {"standard": "3/minute"}}))
    router = APIRouter(route_class=TenantRoute)

    @router.get("/v1/_included")
    async def included(tenant: Tenant) -> Any:
        return {"tenant_id": str(tenant.tenant_id)}

    app.include_router(router)
    async for client in asgi_client(app):
        responses = [await client.get("/v1/_included", headers=a.headers) for _ in range(4)]
        assert [r.status_code for r in responses] == [200, 200, 200, 429]
        assert responses[0].json() == {"tenant_id": str(a.id)}
        assert (await client.get("/v1/_included")).status_code == 401


def _answer(response: httpx.Response) -> tuple[int, bytes, str | None, str | None]:
    return (
        response.status_code,
        response.content,
        response.headers.get("content-type"),
        response.headers.get("content-length"),
    )


async def test_the_lean_handler_answers_byte_for_byte_as_fastapis_own(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    """Each request is sent twice: to the lean app of simple routes, and to FastAPI's app.

    An override of ``tenant_context`` with itself sends a request down FastAPI's
    own path (the override is honoured), with the same tenant: the control.
    """
    app = create_app(dp_settings)
    lean = {route.path for route in app.routes if isinstance(route, TenantRoute) and route.lean}
    assert lean >= {
        "/v1/me",
        "/v1/projects",
        "/v1/projects/{project_id}",
        "/v1/projects/{project_id}/tasks",
        "/v1/tasks/{task_id}",
    }
    # A route with a body is FastAPI's: POST and PATCH share their paths with lean GETs.
    assert all(not route.lean for route in app.routes if isinstance(route, TenantRoute) and route.body_field)
    a, b = world["A"], world["B"]
    paths = [
        f"/v1/projects/{a.project_id}",
        f"/v1/projects/{b.project_id}",  # another tenant's: 404
        "/v1/projects/not-a-uuid",
        "/v1/projects?limit=1",
        "/v1/projects?limit=0",
        "/v1/projects?limit=abc",
        "/v1/projects?cursor=not-a-cursor",
        f"/v1/projects/{a.project_id}/tasks?limit=1",
        f"/v1/projects/{a.project_id}/tasks?limit=-1",
        f"/v1/tasks/{a.task_id}",
        f"/v1/tasks/{b.task_id}",
        "/v1/me",
    ]

    async def both(client: httpx.AsyncClient, method: str, path: str) -> tuple[httpx.Response, httpx.Response]:
        lean_answer = await client.request(method, path, headers=a.headers)
        app.dependency_overrides[tenant_context] = tenant_context
        try:
            fastapi_answer = await client.request(method, path, headers=a.headers)
        finally:
            app.dependency_overrides.clear()
        return lean_answer, fastapi_answer

    async for client in asgi_client(app):
        statuses = set()
        for path in paths:
            lean_answer, fastapi_answer = await both(client, "GET", path)
            assert _answer(lean_answer) == _answer(fastapi_answer), path
            statuses.add(lean_answer.status_code)
            assert b.canary not in lean_answer.text
        assert statuses == {200, 404, 422}
        # A delete, once each way, of a project made for it.
        made = [
            (await client.post("/v1/projects", headers=a.headers, json={"name": f"doomed-{n}"})).json()["id"]
            for n in range(2)
        ]
        lean_delete = await client.delete(f"/v1/projects/{made[0]}", headers=a.headers)
        app.dependency_overrides[tenant_context] = tenant_context
        try:
            fastapi_delete = await client.delete(f"/v1/projects/{made[1]}", headers=a.headers)
        finally:
            app.dependency_overrides.clear()
        assert _answer(lean_delete) == _answer(fastapi_delete)
        assert lean_delete.status_code == 204
        for project_id in made:
            assert (await client.get(f"/v1/projects/{project_id}", headers=a.headers)).status_code == 404


async def test_a_request_with_invalid_parameters_handed_to_fastapi_is_counted_once(
    dp_settings: DataPlaneSettings, world: World
) -> None:
    """The lean app hands an invalid request to FastAPI's app with the tenant already solved."""
    a = world["A"]
    app = create_app(dp_settings.model_copy(update={"rate_limits": {"standard": "3/minute"}}))
    async for client in asgi_client(app):
        paths = [f"/v1/projects/{a.project_id}", "/v1/projects/not-a-uuid", f"/v1/projects/{a.project_id}"] * 2
        statuses = [(await client.get(path, headers=a.headers)).status_code for path in paths]
        assert statuses == [200, 422, 200, 429, 429, 429]
