"""Typed FastAPI dependencies of the tenant API."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

from fastapi import Depends, Request, Response
from fastapi.datastructures import DefaultPlaceholder
from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import request_params_to_args
from fastapi.routing import APIRoute, _extract_endpoint_context, serialize_response
from fastapi.telemetry import get_telemetry_data
from fastapi.utils import is_body_allowed_for_status_code
from starlette._exception_handler import wrap_app_handling_exceptions
from starlette.types import ASGIApp, Receive, Scope, Send

from data_plane.auth import TokenVerifier, bearer_token
from data_plane.limits import Quotas, TenantRateLimiter
from data_plane.routing import EngineRegistry, RouteDirectory
from data_plane.session import TenantContext

# Where TenantRoute keeps the tenant it solved (the ASGI scope is the server's, never the client's).
_PRESOLVED = "tenantctl.tenant"
_REQUEST = "_tenantctl_request"


def authorization_of(scope: Scope) -> str | None:
    """The Authorization header, read from the raw ASGI headers (no ``Headers`` object)."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bytes(value).decode("latin-1")
    return None


@dataclasses.dataclass(frozen=True, slots=True)
class Tenancy:
    """What :func:`tenant_context` needs, kept in ``app.state.tenancy`` once the app has started.

    One object rather than four ``app.state`` entries: starlette's ``State``
    finds its entries through ``__getattr__``, which Python calls only after
    the ordinary lookup has failed, so every entry read raises and clears an
    ``AttributeError`` (~2,000 instructions each, counted with callgrind) on
    every tenant request.
    """

    verifier: TokenVerifier
    directory: RouteDirectory
    engines: EngineRegistry
    limiter: TenantRateLimiter


async def tenant_context(request: Request) -> TenantContext:
    """Authenticate, then resolve the route of the token's tenant (and only that).

    Reads the Authorization header itself rather than through a nested
    ``HTTPBearer`` dependency: each dependency level costs FastAPI tens of
    microseconds per request on the hot path. The bearer scheme is declared for
    OpenAPI in ``data_plane.api``.
    """
    scope = request.scope
    presolved: TenantContext | None = scope.get(_PRESOLVED)
    if presolved is not None:
        return presolved  # solved by TenantRoute for this request
    tenancy: Tenancy = request.app.state.tenancy
    principal = await tenancy.verifier.verify(bearer_token(authorization_of(scope)))
    assert principal.tenant_id is not None  # require_tenant=True guarantees it
    route = (await tenancy.directory.lookup(principal.tenant_id)).require_servable()
    # What request.state.route would set, without building a State (and its
    # AttributeError, see Tenancy): the metrics middleware and log lines read it.
    scope.setdefault("state", {})["route"] = route
    if route.upcoming is not None:
        tenancy.engines.prewarm(route)  # a move is under way: connect to its target before the flip
    # After the route: the limit depends on the tier, and a 429 is then
    # labelled (metrics, access log) with the tenant's tier and placement.
    await tenancy.limiter.check(principal.tenant_id, route.tier)
    return TenantContext(
        tenant_id=principal.tenant_id, route=route, directory=tenancy.directory, engines=tenancy.engines
    )


Tenant = Annotated[TenantContext, Depends(tenant_context)]

Handler = Callable[[Request], Coroutine[Any, Any, Response]]
SimpleHandler = Callable[[Request], Coroutine[Any, Any, Response | None]]


class TenantRoute(APIRoute):
    """An ``APIRoute`` that solves its endpoint's ``Tenant`` itself, before FastAPI's solver runs.

    FastAPI solves a sub-dependency by recursing into its solver, which walks
    the sub-dependency's (empty) parameter lists and recomputes its cache key
    on every request: ~54,000 of the ~840,000 instructions of
    ``GET /v1/projects/{id}`` (``bench api_instructions``), for a dependency
    whose only parameter is the request. This route class hands FastAPI a
    copy of the endpoint's dependant without that sub-dependency, solves the
    tenant first and passes it to the endpoint as the same parameter.

    Resources keep declaring ``tenant: Tenant``; nothing else changes:

    * it fails closed: an endpoint on a router without this class, or one
      this class does not take over (a plain ``def`` endpoint, or a route
      included with ``include_router``, whose handler FastAPI builds from its
      own copy of the dependant), has its ``Tenant`` solved by FastAPI as
      before -- slower, equally checked, and never verified twice;
    * the tenant is solved before anything else of the request, as FastAPI
      solves sub-dependencies first; that now includes reading the body, so an
      unauthenticated request learns nothing from a 422 about its body;
    * a dependency that itself depends on ``Tenant`` gets this same context
      (``tenant_context`` returns the one solved for the request), just as
      FastAPI's per-request dependency cache would give it: one verification,
      one rate-limit hit;
    * ``app.dependency_overrides[tenant_context]`` is honoured: with an
      override the request takes FastAPI's own path.

    A *simple* endpoint -- path and query parameters, ``Tenant``, a response
    model and nothing else (the reads and deletes of every resource) -- gets a
    lean ASGI app (:attr:`lean` is true). FastAPI's app prepares, on every
    request, for all that such an endpoint does not have: two exit stacks for
    dependencies with ``yield``, a body, headers, cookies, sub-dependencies, a
    sub-response, background tasks, telemetry, streaming: ~130,000 of the
    ~752,000 instructions of ``GET /v1/projects/{id}`` (``bench
    api_instructions``). The lean app validates the parameters and serializes
    the response with FastAPI's own functions (``request_params_to_args``,
    ``serialize_response``), so values and bytes are FastAPI's. FastAPI's app
    takes the request whole while ``tenant_context`` is overridden or FastAPI's
    telemetry records the request, and takes over a request whose parameters
    are invalid (its 422 is FastAPI's own).
    """

    lean: bool = False

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        self._simple: SimpleHandler | None = None
        super().__init__(path, endpoint, **kwargs)  # builds the handler: get_route_handler
        if self._simple is not None and self.max_body_size is None:
            self.app = self._lean_app(self.app, self._simple)
            self.lean = True

    def get_route_handler(self) -> Handler:
        full = super().get_route_handler()
        served = self.dependant
        lean = _without_tenant(served)
        if lean is None:
            return full
        self.dependant = lean  # the handler is built from it; routing and OpenAPI keep the full one
        try:
            handler = super().get_route_handler()
        finally:
            self.dependant = served
        provider = self.dependency_overrides_provider
        self._simple = self._simple_handler(lean)

        async def handle(request: Request) -> Response:
            if _overridden(provider):
                return await full(request)
            request.scope[_PRESOLVED] = await tenant_context(request)
            return await handler(request)

        return handle

    def _lean_app(self, fastapi_app: ASGIApp, simple: SimpleHandler) -> ASGIApp:
        """The route's ASGI app: the lean handler, or FastAPI's app whenever it is not enough.

        FastAPI's app opens two ``AsyncExitStack`` per request for dependencies
        with ``yield``, which a simple endpoint does not have. Errors raised
        here reach the app's exception handlers as they would from FastAPI's
        app (``wrap_app_handling_exceptions``, what FastAPI's own wrapper calls).
        """
        provider = self.dependency_overrides_provider

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if _overridden(provider) or get_telemetry_data() is not None:
                await fastapi_app(scope, receive, send)
                return
            request = Request(scope, receive, send)

            async def respond(scope: Scope, receive: Receive, send: Send) -> None:
                scope[_PRESOLVED] = await tenant_context(request)
                response = await simple(request)
                if response is None:
                    # Invalid parameters: FastAPI's handler solves them again and
                    # raises its own RequestValidationError (the endpoint's
                    # context included), so the 422 is FastAPI's byte for byte.
                    # The tenant stays solved: one verification, one rate-limit hit.
                    await fastapi_app(scope, receive, send)
                    return
                await response(scope, receive, send)

            await wrap_app_handling_exceptions(respond, request)(scope, receive, send)

        return app

    def _simple_handler(self, lean: Dependant) -> SimpleHandler | None:
        """The lean handler of a simple endpoint (see the class), or None: FastAPI's handler it is.

        The handler answers None when the parameters are invalid.
        """
        if (
            lean.dependencies
            or lean.header_params
            or lean.cookie_params
            or lean.body_params
            or self.body_field is not None
            or lean.websocket_param_name
            or lean.http_connection_param_name
            or lean.response_param_name
            or lean.background_tasks_param_name
            or lean.security_scopes_param_name
            or self.response_field is None
            or not isinstance(self.response_class, DefaultPlaceholder)
            or lean.call is None
        ):
            return None
        call = lean.call
        path_params, query_params = lean.path_params, lean.query_params
        field = self.response_field
        status_code = self.status_code or 200  # as FastAPI: the route's, else the response's default
        endpoint_ctx = _extract_endpoint_context(self.endpoint)
        include, exclude = self.response_model_include, self.response_model_exclude
        by_alias = self.response_model_by_alias
        exclude_unset, exclude_defaults = self.response_model_exclude_unset, self.response_model_exclude_defaults
        exclude_none = self.response_model_exclude_none

        async def simple(request: Request) -> Response | None:
            values, errors = request_params_to_args(path_params, request.path_params)
            if query_params and not errors:
                more, errors = request_params_to_args(query_params, request.query_params)
                values.update(more)
            if errors:
                return None
            values[_REQUEST] = request
            raw = await call(**values)
            if isinstance(raw, Response):
                return raw
            content = await serialize_response(
                field=field,
                response_content=raw,
                include=include,
                exclude=exclude,
                by_alias=by_alias,
                exclude_unset=exclude_unset,
                exclude_defaults=exclude_defaults,
                exclude_none=exclude_none,
                endpoint_ctx=endpoint_ctx,
                dump_json=True,
            )
            response = Response(content=content, status_code=status_code, media_type="application/json")
            if not is_body_allowed_for_status_code(response.status_code):
                response.body = b""
            return response

        return simple


def _overridden(provider: Any) -> bool:
    """Whether the app overrides ``tenant_context`` (then FastAPI solves the request, override and all)."""
    return provider is not None and tenant_context in getattr(provider, "dependency_overrides", {})


def _without_tenant(dependant: Dependant) -> Dependant | None:
    """``dependant`` without its direct ``Tenant`` sub-dependency, its endpoint given the tenant from the scope.

    None when there is nothing to take over: no direct ``Tenant``, or an
    endpoint FastAPI would run in a worker thread (not a coroutine function).
    """
    endpoint = dependant.call
    if endpoint is None or not inspect.iscoroutinefunction(endpoint):
        return None
    tenants = [sub for sub in dependant.dependencies if sub.call is tenant_context]
    if not tenants:
        return None
    names = [sub.name for sub in tenants if sub.name is not None]
    own_request = dependant.request_param_name

    @functools.wraps(endpoint)
    async def call(**values: Any) -> Any:
        request: Request = values.pop(_REQUEST)
        if own_request is not None:
            values[own_request] = request
        tenant = request.scope[_PRESOLVED]
        for name in names:
            values[name] = tenant
        return await endpoint(**values)

    return dataclasses.replace(
        dependant,
        dependencies=[sub for sub in dependant.dependencies if sub.call is not tenant_context],
        call=call,
        request_param_name=_REQUEST,
    )


async def quotas(request: Request) -> Quotas:
    """The tier quotas (only write routes that create rows depend on this).

    ``async`` although it awaits nothing: FastAPI runs a plain ``def``
    dependency in a worker thread, a thread hop per create request (and, on a
    saturated host, a wait for that thread to be scheduled).
    """
    value: Quotas = request.app.state.quotas
    return value


TierQuotas = Annotated[Quotas, Depends(quotas)]
