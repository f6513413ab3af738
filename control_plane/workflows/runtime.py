"""What running workflows share in one process: settings, endpoints, catalog sessions.

DBOS is a process-wide singleton, so this is too: :class:`Executor` installs
the context before launching DBOS and clears it after destroying it.
Catalog sessions use a ``NullPool`` engine: workflows run on DBOS's own event
loop (not the API's), and a pooled asyncpg connection must never cross loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.pool import NullPool

from control_plane.provisioning.base import SiloProvisioner
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from data_plane.dsn import async_url

ProvisionerFactory = Callable[[ControlPlaneSettings, Endpoints], SiloProvisioner]


def default_provisioner(settings: ControlPlaneSettings, endpoints: Endpoints) -> SiloProvisioner:
    from control_plane.provisioning import get_provisioner

    return get_provisioner(settings, silo_server_url=endpoints.silo_server_url)


@dataclass
class WorkerContext:
    settings: ControlPlaneSettings
    endpoints: Endpoints
    provisioner_factory: ProvisionerFactory = default_provisioner
    _engine: AsyncEngine | None = field(default=None, init=False)

    def sessions(self) -> async_sessionmaker[AsyncSession]:
        if self._engine is None:
            self._engine = create_async_engine(async_url(self.endpoints.catalog_url), poolclass=NullPool)
        return async_sessionmaker(self._engine, expire_on_commit=False)

    def provisioner(self) -> SiloProvisioner:
        return self.provisioner_factory(self.settings, self.endpoints)

    async def pause(self) -> None:
        """The test hook: a pause after each bounded batch (never in production)."""
        delay = self.settings.test_step_delay_seconds
        if delay > 0 and not self.settings.is_production:
            await asyncio.sleep(delay)


_context: WorkerContext | None = None


def install(context: WorkerContext | None) -> None:
    global _context  # the process-wide twin of the DBOS singleton
    _context = context


def current() -> WorkerContext:
    if _context is None:
        raise RuntimeError("no workflow executor runs in this process (start one with Executor.start())")
    return _context
