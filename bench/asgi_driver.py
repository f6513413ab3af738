"""``python -m bench.asgi_driver KIND N``: N sequential requests straight into a server's ASGI app.

The request of ``bench api`` (``BENCH_DRIVER_PATH`` with ``BENCH_DRIVER_TOKEN``),
after a warm-up, on the event loop uvicorn would use, with no HTTP parsing or
load generator: ``bench api_instructions`` runs this under callgrind and counts
the instructions the app itself spends per request. Every response must be 200.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import uvloop
from fastapi import FastAPI
from starlette.types import Message

from bench.servers import app_for

WARM_UP = 200


def scope_of(path: str, token: str, *, method: str = "GET", body: bytes = b"") -> dict[str, Any]:
    """The ASGI scope of one tenant API request (``path`` may carry a query string)."""
    path, _, query = path.partition("?")
    headers = [(b"host", b"127.0.0.1"), (b"authorization", f"Bearer {token}".encode())]
    if body:
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


async def call(app: FastAPI, scope: dict[str, Any], body: bytes = b"") -> int:
    """Run one request through ``app`` (a copy of ``scope``, which the app may change): its status."""
    sent: list[Message] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(dict(scope), receive, send)
    return int(sent[0]["status"])


async def _drive(kind: str, count: int) -> None:
    app = app_for(kind)
    scope = scope_of(os.environ["BENCH_DRIVER_PATH"], os.environ["BENCH_DRIVER_TOKEN"])
    async with app.router.lifespan_context(app):
        for _ in range(WARM_UP + count):
            if (status := await call(app, scope)) != 200:
                raise RuntimeError(f"the benchmark request failed: {status}")


if __name__ == "__main__":
    uvloop.run(_drive(sys.argv[1], int(sys.argv[2])))
