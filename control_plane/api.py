"""The control-plane (admin) API. Build it with :func:`create_app`."""

from __future__ import annotations

from fastapi import FastAPI

from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.exceptions import install_error_handlers


def create_app(settings: ControlPlaneSettings, endpoints: Endpoints) -> FastAPI:
    app = FastAPI(title="tenantctl control plane", version="0.1.0")
    app.state.settings = settings
    app.state.endpoints = endpoints
    install_error_handlers(app)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
