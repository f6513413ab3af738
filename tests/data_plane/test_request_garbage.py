"""A tenant request leaves no reference cycles behind.

Objects in a cycle are not freed when the request ends but by the cyclic
garbage collector, which runs once enough of them pile up: a per-request cycle
(a ``TenantContext`` holding its query helper, which held the context) set off
a collection every ~300 requests on the API benchmark and a full one, walking
every object of the process while every request in flight waits, every ~5,000.
The baseline app made none. Requests here go straight into the ASGI app (no
HTTP client, whose own objects are not the app's), after a warm-up, with the
collector off and every collected object kept for inspection.
"""

from __future__ import annotations

import gc
import json
import types
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi import FastAPI

from bench.asgi_driver import call, scope_of
from data_plane.api import create_app
from data_plane.settings import DataPlaneSettings
from tests.data_plane.conftest import World


async def _call(app: FastAPI, method: str, path: str, token: str, body: Any = None) -> int:
    payload = b"" if body is None else json.dumps(body).encode()
    return await call(app, scope_of(path, token, method=method, body=payload), payload)


async def _requests(app: FastAPI, world: World) -> list[tuple[str, int]]:
    """The API's request shapes, for a pool and a silo tenant: (what, status)."""
    statuses = []
    for name in ("A", "S"):
        me = world[name]
        token = me.token
        statuses += [
            ("create", await _call(app, "POST", "/v1/projects", token, {"name": "gc"})),
            ("get", await _call(app, "GET", f"/v1/projects/{me.project_id}", token)),
            ("list", await _call(app, "GET", "/v1/projects?limit=1", token)),
            ("tasks", await _call(app, "GET", f"/v1/projects/{me.project_id}/tasks", token)),
            ("me", await _call(app, "GET", "/v1/me", token)),
            ("patch", await _call(app, "PATCH", f"/v1/projects/{me.project_id}", token, {"name": "renamed"})),
            ("missing", await _call(app, "GET", f"/v1/projects/{uuid.uuid4()}", token)),
            ("invalid", await _call(app, "POST", "/v1/projects", token, {"name": ""})),
            ("forged", await _call(app, "GET", f"/v1/projects/{me.project_id}", token[:-4] + "AAAA")),
        ]
    return statuses


# The packages a tenant request runs through. Garbage is counted only if one of
# them made it: the test process also runs what earlier tests left behind (a
# finalizer, another library's thread), whose garbage may land in the window.
REQUEST_PATH = frozenset(
    {"data_plane", "fastapi", "starlette", "pydantic", "pydantic_core", "asyncpg", "structlog", "limits", "jwt"}
)


def _code_of(obj: Any) -> types.CodeType | None:
    if isinstance(obj, types.FrameType):
        return obj.f_code
    if isinstance(obj, types.CoroutineType):
        return obj.cr_code
    if isinstance(obj, types.FunctionType):
        return obj.__code__
    return None


def _owner(obj: Any) -> str:
    """The top-level package that made ``obj``: its code's for frames, coroutines and functions."""
    code = _code_of(obj)
    if code is not None:
        return next((name for name in REQUEST_PATH if f"/{name}/" in code.co_filename), "")
    # An instance's class's module; for a class made at run time (Page[M]), its metaclass's.
    return str(type(obj).__module__).split(".")[0]


@contextmanager
def _collector_kept() -> Iterator[list[Any]]:
    """The collector off and what it would have freed kept in ``gc.garbage``; both restored after."""
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        yield gc.garbage
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


async def test_tenant_requests_leave_no_reference_cycles(dp_settings: DataPlaneSettings, world: World) -> None:
    app = create_app(dp_settings)
    async with app.router.lifespan_context(app):
        for _ in range(3):  # warm-up: caches, pools, prepared statements, first-use imports
            warm = await _requests(app, world)
        # The same answers for the pool tenant and the silo tenant, in order.
        assert warm == 2 * [
            ("create", 201),
            ("get", 200),
            ("list", 200),
            ("tasks", 200),
            ("me", 200),
            ("patch", 200),
            ("missing", 404),
            ("invalid", 422),
            ("forged", 401),
        ]
        with _collector_kept() as garbage:
            for _ in range(20):
                await _requests(app, world)
            gc.collect()
            kinds = Counter(f"{_owner(obj)}.{type(obj).__qualname__}" for obj in garbage if _owner(obj) in REQUEST_PATH)
    assert not kinds, f"requests left cyclic garbage: {kinds.most_common(10)}"


@pytest.mark.parametrize("freeze", [True, False])
async def test_start_up_freezes_what_exists_out_of_the_collectors_reach(
    dp_settings: DataPlaneSettings, world: World, freeze: bool
) -> None:
    app = create_app(dp_settings.model_copy(update={"gc_freeze": freeze}))
    assert gc.get_freeze_count() == 0
    async with app.router.lifespan_context(app):
        assert await _call(app, "GET", f"/v1/projects/{world['A'].project_id}", world["A"].token) == 200
        frozen = gc.get_freeze_count()
    assert (frozen > 0) is freeze
    assert gc.get_freeze_count() == 0, "the app's shutdown gives the objects back to the collector"
