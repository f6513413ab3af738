"""What running workflows share in one process: settings, endpoints, catalog sessions.

DBOS is a process-wide singleton, so this is too: :class:`Executor` installs
the context before launching DBOS and clears it after destroying it.
Catalog sessions come from a small connection pool *per event loop*: an
asyncpg connection belongs to the loop that opened it and must never cross to
another, and DBOS runs async workflows on the loop it adopted at launch or on
its own background loop. Pooling matters inside a move's write pause: the
flip's catalog transaction on a fresh connection paid a backend start,
authentication and a prepare round trip per statement (about 20 ms under
load); a pooled connection has its statements prepared already.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from control_plane.provisioning.base import SiloProvisioner
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.dsn import async_url

# Workflows of one executor run concurrently (worker_concurrency); steps hold
# a catalog connection for one short transaction each.
CATALOG_POOL_SIZE = 4
CATALOG_POOL_OVERFLOW = 4
DISPOSE_TIMEOUT_S = 5.0

ProvisionerFactory = Callable[[ControlPlaneSettings, Endpoints], SiloProvisioner]


def default_provisioner(settings: ControlPlaneSettings, endpoints: Endpoints) -> SiloProvisioner:
    from control_plane.provisioning import get_provisioner

    return get_provisioner(settings, silo_server_url=endpoints.silo_server_url)


@dataclass
class WorkerContext:
    settings: ControlPlaneSettings
    endpoints: Endpoints
    provisioner_factory: ProvisionerFactory = default_provisioner
    _engines: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncEngine] = field(
        default_factory=weakref.WeakKeyDictionary, init=False
    )

    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """Catalog sessions on the running loop's own pool (call it from a coroutine)."""
        loop = asyncio.get_running_loop()
        engine = self._engines.get(loop)
        if engine is None:
            engine = create_async_engine(
                async_url(self.endpoints.catalog_url),
                pool_size=CATALOG_POOL_SIZE,
                max_overflow=CATALOG_POOL_OVERFLOW,
                # A catalog restart between steps must cost a reconnect, not a
                # failed step: before the flip a failed step aborts the move.
                pool_pre_ping=True,
            )
            self._engines[loop] = engine
        return async_sessionmaker(engine, expire_on_commit=False)

    async def release(self) -> None:
        """Close the running loop's pool: for a caller whose loop ends before the executor (a test)."""
        engine = self._engines.pop(asyncio.get_running_loop(), None)
        if engine is not None:
            await engine.dispose()

    def close(self) -> None:
        """Close every pool on its own loop, just before DBOS stops that loop.

        The loop's other tasks (workflows still running) are cancelled first,
        as DBOS's shutdown would a moment later, so that each has returned its
        connection before the pool closes: a connection checked in after its
        pool was disposed would never be closed.
        """
        engines, self._engines = list(self._engines.items()), weakref.WeakKeyDictionary()
        for loop, engine in engines:
            if loop.is_closed():
                continue
            if _running_loop() is loop:
                loop.create_task(engine.dispose())  # on its own thread: cannot wait for it here
            elif loop.is_running():
                future = asyncio.run_coroutine_threadsafe(_quiesce_and_dispose(engine), loop)
                # A loop that is stuck must not hang the shutdown; its
                # connections then close with their process.
                with contextlib.suppress(concurrent.futures.TimeoutError):
                    future.result(timeout=DISPOSE_TIMEOUT_S)
            else:
                loop.run_until_complete(engine.dispose())

    def provisioner(self) -> SiloProvisioner:
        return self.provisioner_factory(self.settings, self.endpoints)

    async def pause(self) -> None:
        """The test hook: a pause after each bounded batch (never in production)."""
        delay = self.settings.test_step_delay_seconds
        if delay > 0 and not self.settings.is_production:
            await asyncio.sleep(delay)


async def _quiesce_and_dispose(engine: AsyncEngine) -> None:
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await engine.dispose()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


_context: WorkerContext | None = None


def install(context: WorkerContext | None) -> None:
    global _context  # the process-wide twin of the DBOS singleton
    _context = context


def current() -> WorkerContext:
    if _context is None:
        raise RuntimeError("no workflow executor runs in this process (start one with Executor.start())")
    return _context
