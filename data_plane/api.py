"""The tenant-facing API (data plane). Build it with :func:`create_app`."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.openapi.utils import get_openapi
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel

from data_plane.auth import TokenVerifier
from data_plane.dependencies import Tenancy, Tenant, TenantRoute
from data_plane.exceptions import ERROR_RESPONSES, install_error_handlers
from data_plane.limits import Quotas, TenantRateLimiter
from data_plane.logs import configure_logging
from data_plane.metering import UsageMeter
from data_plane.middleware import BodySizeLimit, RequestMetrics
from data_plane.resources.projects.router import router as projects_router
from data_plane.resources.tasks.router import router as tasks_router
from data_plane.routing import EngineRegistry, RouteDirectory, SecretResolver
from data_plane.secrets import AwsSecretsResolver
from data_plane.settings import DataPlaneSettings


class Placement(BaseModel):
    kind: str
    location: str


class Me(BaseModel):
    tenant_id: str
    tier: str
    placement: Placement


class _StateCollector(Collector):
    """Counters the app's components keep as plain integers, read at scrape time.

    The route cache counts with ``+= 1`` on the hot path (cheaper than a
    prometheus Counter's lock); this turns them into metrics when scraped.
    """

    def __init__(self, app: FastAPI, limiter: TenantRateLimiter, meter: UsageMeter) -> None:
        self._app = app
        self._limiter = limiter
        self._meter = meter

    def collect(self) -> Iterator[Metric]:
        routes: RouteDirectory | None = getattr(self._app.state, "routes", None)
        engines: EngineRegistry | None = getattr(self._app.state, "engines", None)
        if routes is not None:
            yield CounterMetricFamily("tenantctl_route_cache_hits", "Route lookups served from cache", routes.hits)
            yield CounterMetricFamily(
                "tenantctl_route_cache_refreshes", "Route lookups read from the catalog", routes.refreshes
            )
            yield CounterMetricFamily(
                "tenantctl_route_cache_invalidations", "Route cache invalidations (NOTIFY)", routes.invalidations
            )
            yield CounterMetricFamily(
                "tenantctl_route_cache_arrivals",
                "Move flips taken from their NOTIFY (the announced target, no catalog read)",
                routes.arrivals,
            )
            yield GaugeMetricFamily("tenantctl_route_listener_up", "LISTEN connection active", int(routes.listening))
        if engines is not None:
            yield GaugeMetricFamily("tenantctl_silo_pools", "Open per-silo connection pools", engines.silo_count)
        yield CounterMetricFamily("tenantctl_usage_flushes", "Usage flushes written", self._meter.flushes)
        yield CounterMetricFamily("tenantctl_usage_flush_failures", "Usage flushes failed", self._meter.flush_failures)
        yield GaugeMetricFamily(
            "tenantctl_rate_limit_shared", "Rate limits shared across replicas (Redis)", int(self._limiter.shared)
        )


def mount_flat(app: FastAPI, router: APIRouter) -> None:
    """Add ``router``'s routes to the app itself, not as a nested branch.

    ``include_router`` keeps an included router as a branch that is matched
    (and whose route version is recomputed) on every request: about 160 extra
    function calls per request, measured with cProfile against a flat route
    (bench/api). A resource router's routes already carry their full path,
    tags and responses (``APIRouter.add_api_route`` applies the router's own
    prefix, tags and responses), so adding them directly serves and documents
    them the same way. Only for routers with nothing to add at include time.
    """
    app.router.routes.extend(router.routes)


def docs_last(app: FastAPI) -> None:
    """Move FastAPI's own documentation routes behind the API's routes.

    FastAPI registers ``/openapi.json``, ``/docs``, its OAuth2 redirect and
    ``/redoc`` first, and routing tries routes in order: every tenant request
    paid four failed matches before reaching its own route: ~27,000 of the
    ~974,000 instructions of the ``bench api`` request, counted with callgrind
    (``bench api_instructions``). The docs are requested rarely, and their paths
    overlap no API path, so they can be tried last.
    """
    docs = {app.openapi_url, app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url} - {None}
    app.router.routes.sort(key=lambda route: getattr(route, "path", None) in docs)  # stable: API order kept


def create_app(settings: DataPlaneSettings | None = None, *, resolver: SecretResolver | None = None) -> FastAPI:
    settings = settings or DataPlaneSettings()
    if settings.app_catalog_url is None or settings.app_pool_url is None:
        raise ValueError("the data plane needs TENANTCTL_APP_CATALOG_URL and TENANTCTL_APP_POOL_URL")
    catalog_url, pool_url = settings.app_catalog_url, settings.app_pool_url
    verifier = TokenVerifier(settings, audience=settings.jwt_audience, require_tenant=True)
    configure_logging(settings)
    limiter = TenantRateLimiter.from_settings(settings)
    if resolver is None and settings.credentials_source == "aws":
        resolver = AwsSecretsResolver()
    meter = UsageMeter(
        catalog_url, interval=settings.usage_flush_seconds, sample_every=settings.usage_rows_stored_seconds
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        routes = RouteDirectory(catalog_url, ttl=settings.route_cache_ttl_seconds)
        engines = EngineRegistry(
            pool_url,
            resolver=resolver,
            pool_size=settings.pool_size,
            silo_pool_size=settings.silo_pool_size,
            max_silos=settings.max_silo_engines,
            idle_seconds=settings.silo_engine_idle_seconds,
        )
        await routes.start()
        await engines.start()
        meter.start(routes, engines)
        app.state.routes, app.state.engines = routes, engines
        app.state.tenancy = Tenancy(verifier=verifier, directory=routes, engines=engines, limiter=limiter)
        if settings.gc_freeze:
            # The modules, app, routes and pools made so far live as long as
            # the process. A full collection walked them all, finding nothing
            # to free: ~55 ms in which no request progressed (a p99 of 59 ms
            # in one fixed-rate round of bench api, against 2.3 ms in others).
            gc.freeze()
        try:
            yield
        finally:
            if settings.gc_freeze:
                gc.unfreeze()  # to the collector again: nothing here outlives the app on purpose
            # Flush usage while the engines can still sample rows stored.
            await meter.close()
            await engines.close()
            await routes.close()

    app = FastAPI(
        title="tenantctl tenant API",
        version="0.1.0",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        telemetry=settings.fastapi_telemetry,
    )
    # Routes declared on the app itself (/v1/me) solve Tenant the fast way too.
    app.router.route_class = TenantRoute
    app.state.settings = settings
    app.state.verifier = verifier
    app.state.limiter = limiter
    app.state.quotas = Quotas.from_settings(settings)
    app.state.meter = meter
    registry = CollectorRegistry()
    registry.register(_StateCollector(app, limiter, meter))
    install_error_handlers(app)
    for router in (projects_router, tasks_router):
        mount_flat(app, router)

    @app.get("/v1/me", tags=["tenant"])
    async def me(tenant: Tenant) -> Me:
        route = tenant.route
        return Me(
            tenant_id=str(route.tenant_id),
            tier=route.tier,
            placement=Placement(kind=route.placement, location=route.location_name),
        )

    @app.get("/healthz", tags=["ops"])
    async def healthz(request: Request) -> dict[str, Any]:
        routes: RouteDirectory = request.app.state.routes
        return {"status": "ok", "route_listener": routes.listening}

    @app.get("/metrics", tags=["ops"], include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def openapi() -> dict[str, Any]:
        # Declare the bearer scheme once for every tenant route (the dependency
        # reads the header directly, see data_plane.dependencies).
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            }
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    docs_last(app)
    app.add_middleware(
        RequestMetrics, registry=registry, prefix="tenantctl_api", meter=meter, access_log=settings.access_log
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    return app
