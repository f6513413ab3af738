"""Server processes for the API benchmark: ``python -m bench.servers tenantctl|baseline PORT``.

The baseline is the same query through a plain FastAPI + asyncpg endpoint with
no tenancy: no token, no route lookup, no tenant transaction, connected as the
owner (RLS bypassed). It gets the same pool size, the same response model and a
no-op connection reset, so it is the strongest fair baseline. Like tenantctl, it
freezes what exists at start-up out of the garbage collector's reach.
"""

from __future__ import annotations

import gc
import os
import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import uvicorn
from fastapi import FastAPI, HTTPException

from data_plane.api import create_app
from data_plane.dsn import libpq
from data_plane.resources.projects.schemas import Project
from data_plane.settings import DataPlaneSettings

QUERY = "SELECT id, name, status, created_at, updated_at FROM projects WHERE tenant_id = $1 AND id = $2"


async def _no_reset(_conn: asyncpg.Connection) -> None:
    return None


def baseline_app(dsn: str, tenant_id: uuid.UUID, pool_size: int) -> FastAPI:
    state: dict[str, asyncpg.Pool] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state["pool"] = await asyncpg.create_pool(libpq(dsn), min_size=pool_size, max_size=pool_size, reset=_no_reset)
        gc.freeze()  # as tenantctl does once started (DataPlaneSettings.gc_freeze): the same server settings
        yield
        await state["pool"].close()

    # FastAPI's native OpenTelemetry off, as in tenantctl by default
    # (CommonSettings.fastapi_telemetry): a framework setting, not tenancy.
    app = FastAPI(lifespan=lifespan, telemetry={"tracing": False, "metrics": False, "logs": False})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/projects/{project_id}")
    async def get_project(project_id: uuid.UUID) -> Project:
        row = await state["pool"].fetchrow(QUERY, tenant_id, project_id)
        if row is None:
            raise HTTPException(404)
        return Project.model_validate(dict(row))

    return app


def app_for(kind: str) -> FastAPI:
    """The app of a server kind, configured from the environment the benchmark sets."""
    if kind == "tenantctl":
        return create_app(DataPlaneSettings())
    return baseline_app(
        os.environ["BENCH_BASELINE_DSN"],
        uuid.UUID(os.environ["BENCH_TENANT_ID"]),
        int(os.environ["BENCH_POOL_SIZE"]),
    )


def main() -> None:
    kind, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(app_for(kind), host="127.0.0.1", port=port, log_level="error", access_log=False)


if __name__ == "__main__":
    main()
