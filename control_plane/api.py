"""The control-plane (admin) API. Build it with :func:`create_app`.

The app only *enqueues* jobs (through a DBOS client on the catalog's DBOS
schema); executors -- ``tenantctl up`` in-process, or ``tenantctl worker`` --
run them. Its catalog access is SQLAlchemy async on asyncpg.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from control_plane.catalog import idempotency
from control_plane.catalog.dependencies import CatalogState
from control_plane.catalog.router import router as catalog_router
from control_plane.moves.router import router as moves_router
from control_plane.placement import PlacementPolicy
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.usage.metrics import CatalogMetrics
from control_plane.usage.router import router as usage_router
from control_plane.workflows.jobs import DBOSJobEnqueuer
from data_plane.auth import TokenVerifier
from data_plane.dsn import async_url, sync_url
from data_plane.exceptions import error_response, install_error_handlers
from data_plane.logs import access_log, configure_logging, current_request
from data_plane.middleware import request_id_of

MAX_BODY_BYTES = 64 * 1024  # admin bodies are a few fields; anything larger is refused
PURGE_INTERVAL_SECONDS = 3600.0  # expired Idempotency-Keys are never replayed; this only bounds the table

log = structlog.get_logger(__name__)


async def purge_idempotency_keys(sessions: async_sessionmaker[AsyncSession]) -> None:
    """Delete expired Idempotency-Keys now and every ``PURGE_INTERVAL_SECONDS``.

    Every replica does it: deleting what another replica deleted is a no-op.
    """
    while True:
        try:
            async with sessions() as session:
                purged = await idempotency.purge_expired(session)
            if purged:
                log.info("idempotency_keys_purged", count=purged)
        except Exception as exc:  # noqa: BLE001  # catalog away: the next round tries again; requests are unaffected
            log.warning("idempotency_keys_purge_failed", error_type=type(exc).__name__)
        await asyncio.sleep(PURGE_INTERVAL_SECONDS)


def system_database_url(catalog_url: str) -> str:
    """DBOS's system database: the catalog database itself (schema ``dbos``)."""
    return sync_url(catalog_url).render_as_string(hide_password=False)


def _route_template(request: Request) -> str:
    # Label by route template, never by raw path: ids would explode cardinality.
    # The router records the matched route in the (shared) ASGI scope.
    route = request.scope.get("route")
    return str(getattr(route, "path", "unmatched"))


def create_app(settings: ControlPlaneSettings, endpoints: Endpoints) -> FastAPI:
    configure_logging(settings)
    registry = CollectorRegistry()
    catalog_metrics = CatalogMetrics(registry)
    requests_total = Counter(
        "tenantctl_admin_requests",
        "Admin API requests.",
        ["method", "route", "status"],
        registry=registry,
    )
    latency = Histogram("tenantctl_admin_request_seconds", "Admin API latency.", ["method", "route"], registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = create_async_engine(async_url(endpoints.catalog_url), pool_size=5, max_overflow=5, pool_pre_ping=True)
        enqueuer = DBOSJobEnqueuer(system_database_url(endpoints.catalog_url))
        sessions = async_sessionmaker(engine, expire_on_commit=False)
        app.state.catalog = CatalogState(
            settings=settings,
            endpoints=endpoints,
            sessions=sessions,
            policy=PlacementPolicy.from_settings(settings),
            enqueuer=enqueuer,
            verifier=TokenVerifier(settings, audience=settings.jwt_admin_audience, require_tenant=False),
        )
        purger = asyncio.create_task(purge_idempotency_keys(sessions), name="purge-idempotency-keys")
        try:
            yield
        finally:
            purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await purger
            enqueuer.close()
            await engine.dispose()

    app = FastAPI(
        title="tenantctl control plane",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=settings.fastapi_telemetry,
        description="Tenant catalog, lifecycle and jobs. Bearer token with aud `tenantctl-admin` "
        "and scope `tenantctl:admin`; tenant tokens are refused.",
    )
    app.state.settings = settings
    app.state.endpoints = endpoints
    install_error_handlers(app)
    app.include_router(catalog_router)
    app.include_router(moves_router)
    app.include_router(usage_router)

    @app.middleware("http")
    async def metrics_middleware(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        """Metrics, request id and access log -- the same request-id rules as the tenant API.

        The id (the caller's ``X-Request-ID`` if short and printable, else a new
        one) is echoed back and carried by every log line of the request: it is
        set before ``call_next``, whose task copies the context.
        """
        started = time.perf_counter()
        request_id = request_id_of(request.scope)
        token = current_request.set((request_id, {}))
        try:
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > MAX_BODY_BYTES:
                response: Response = error_response(413, "payload_too_large", "request body too large")
            else:
                response = await call_next(request)
            response.headers["X-Request-ID"] = request_id
            route = _route_template(request)
            elapsed = time.perf_counter() - started
            requests_total.labels(request.method, route, str(response.status_code)).inc()
            latency.labels(request.method, route).observe(elapsed)
            access_log.emit(
                method=request.method,
                route=route,
                path=request.url.path,
                status=response.status_code,
                duration_ms=round(elapsed * 1000, 3),
                request_id=request_id,
                tenant=None,
            )
            return response
        finally:
            current_request.reset(token)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics(request: Request) -> Response:
        await catalog_metrics.refresh(request.app.state.catalog.sessions)  # jobs, moves: read at scrape time
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app
