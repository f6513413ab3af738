"""The tenant-facing API (data plane). Build it with :func:`create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from data_plane.exceptions import install_error_handlers
from data_plane.settings import DataPlaneSettings


def create_app(settings: DataPlaneSettings | None = None) -> FastAPI:
    settings = settings or DataPlaneSettings()
    app = FastAPI(title="tenantctl tenant API", version="0.1.0")
    app.state.settings = settings
    install_error_handlers(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
