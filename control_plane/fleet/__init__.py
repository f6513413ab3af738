"""Fleet migration runner: the tenant schema on the pool and every silo.

Public API for other workflows::

    from control_plane.fleet import migrate_new_silo, migrate_target_to, pool_revision

    # provisioning a new tenant's silo: pool revision read and applied under the interlock
    result = migrate_new_silo(silo_dsn, pool_dsn, catalog_dsn=catalog_dsn)
    # inside a move (the tenant is 'moving', which already keeps fleet runs out)
    result = migrate_target_to(silo_dsn, pool_revision(pool_dsn))

and for the CLI and tests: :func:`run_fleet`, :func:`migrate_targets`,
:func:`status_of`. See :mod:`control_plane.fleet.runner` for the order and
failure semantics and :mod:`control_plane.fleet.worker` for why migrations run
in worker processes.

Names are loaded lazily: the multiprocessing fork server imports
``control_plane.fleet.forkserver_main`` and, from there, the parent's main
script, which may itself import this package; an eager ``__init__`` would make
that a circular import.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from control_plane.fleet.models import Target, TargetResult, TargetStatus
    from control_plane.fleet.runner import (
        FleetOptions,
        FleetReport,
        migrate_new_silo,
        migrate_target_to,
        migrate_targets,
        pool_revision,
        run_fleet,
    )
    from control_plane.fleet.scripts import Drift, ScriptInfo
    from control_plane.fleet.status import StatusReport, TargetState, status_of

_EXPORTS = {
    "Target": "models",
    "TargetResult": "models",
    "TargetStatus": "models",
    "FleetOptions": "runner",
    "FleetReport": "runner",
    "migrate_new_silo": "runner",
    "migrate_target_to": "runner",
    "migrate_targets": "runner",
    "pool_revision": "runner",
    "run_fleet": "runner",
    "Drift": "scripts",
    "ScriptInfo": "scripts",
    "StatusReport": "status",
    "TargetState": "status",
    "status_of": "status",
}

__all__ = [
    "Drift",
    "FleetOptions",
    "FleetReport",
    "ScriptInfo",
    "StatusReport",
    "Target",
    "TargetResult",
    "TargetState",
    "TargetStatus",
    "migrate_new_silo",
    "migrate_target_to",
    "migrate_targets",
    "pool_revision",
    "run_fleet",
    "status_of",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
