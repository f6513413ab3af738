"""No request of either API hops to a worker thread: every dependency and endpoint is ``async``.

FastAPI runs a plain ``def`` dependency or endpoint through the thread pool.
On the tenant API's create path that was one thread hop per request and, on a
saturated host (a move's cutover, the held requests released at once), a wait
for the worker thread to be scheduled, inside the move's write pause.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from control_plane.api import create_app as create_admin_app
from control_plane.catalog.dependencies import catalog_state
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.api import create_app
from data_plane.dependencies import quotas, tenant_context
from data_plane.settings import DataPlaneSettings


def _calls(dependant: Dependant) -> Iterator[Callable[..., Any]]:
    if dependant.call is not None:
        yield dependant.call
    for sub in dependant.dependencies:
        yield from _calls(sub)


def _routes(routes: list[BaseRoute]) -> Iterator[APIRoute]:
    for route in routes:
        if isinstance(route, APIRoute):
            yield route
        # FastAPI keeps an included router as a branch of its own routes.
        included = getattr(route, "original_router", None)
        if isinstance(included, APIRouter):
            yield from _routes(included.routes)


def _threaded(app: FastAPI) -> tuple[set[Callable[..., Any]], set[str]]:
    """Everything a request calls, and the names of what FastAPI would run in a thread."""
    seen: set[Callable[..., Any]] = set()
    for route in _routes(app.routes):
        seen.update(_calls(route.dependant))
    threaded = {
        getattr(call, "__qualname__", repr(call))
        for call in seen
        if not (inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call))
    }
    return seen, threaded


def test_the_tenant_api_runs_nothing_in_a_worker_thread(dp_settings: DataPlaneSettings) -> None:
    seen, threaded = _threaded(create_app(dp_settings))
    assert {tenant_context, quotas} <= seen  # the walk reaches the dependencies of the create path
    assert threaded == set()


def test_the_admin_api_runs_nothing_in_a_worker_thread(cp_settings: ControlPlaneSettings, endpoints: Endpoints) -> None:
    seen, threaded = _threaded(create_admin_app(cp_settings, endpoints))
    assert catalog_state in seen
    assert threaded == set()


def test_a_plain_def_dependency_is_reported(dp_settings: DataPlaneSettings) -> None:
    """Control: the check does find a dependency that FastAPI would run in a thread."""
    app = create_app(dp_settings)

    def blocking_dependency() -> int:
        return 1

    @app.get("/v1/_control")
    async def control(value: int = Depends(blocking_dependency)) -> int:
        return value

    _, threaded = _threaded(app)
    assert threaded == {blocking_dependency.__qualname__}
