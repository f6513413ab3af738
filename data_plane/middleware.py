"""Pure ASGI middleware of the tenant API (cheaper than BaseHTTPMiddleware on the hot path)."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodySizeLimit:
    """Refuse request bodies over ``max_bytes`` with 413, declared or streamed."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = 0
                if declared > self.max_bytes:
                    await _send_413(send, self.max_bytes)
                    return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside body parsing; FastAPI re-raises HTTPException
                    # and the error handler renders the §5 JSON.
                    raise HTTPException(413, f"request body exceeds {self.max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


async def _send_413(send: Send, max_bytes: int) -> None:
    body = (
        b'{"error":{"code":"payload_too_large","message":"request body exceeds '
        + str(max_bytes).encode()
        + b' bytes"}}'
    )
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Latency and count by route template, method, status, tier and placement.

    Labels are bounded: the route *template* (never the path with ids) and the
    tenant's tier/placement (never the tenant id -- one series per pool tenant
    would grow without bound).
    """

    def __init__(self, app: ASGIApp, *, registry: CollectorRegistry, prefix: str) -> None:
        self.app = app
        labels = ("route", "method", "status", "tier", "placement")
        self.latency = Histogram(
            f"{prefix}_request_seconds",
            "Request latency",
            labels,
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
        )
        self.fenced = Counter(f"{prefix}_fenced_responses", "Responses refused while fenced", registry=registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route: Any = scope.get("route")
            template = getattr(route, "path", "unmatched")
            tenant_route: Any = scope.get("state", {}).get("route")
            tier = getattr(tenant_route, "tier", "none")
            placement = getattr(tenant_route, "placement", "none")
            self.latency.labels(template, scope.get("method", ""), str(status), tier, placement).observe(
                time.perf_counter() - start
            )
            if status == 503:
                self.fenced.inc()
