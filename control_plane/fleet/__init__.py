"""Fleet migration runner: the tenant schema on the pool and every silo.

Public API for other workflows::

    from control_plane.fleet import migrate_target_to, pool_revision

    result = migrate_target_to(silo_dsn, pool_revision(pool_dsn))  # provisioning / moves

and for the CLI and tests: :func:`run_fleet`, :func:`migrate_targets`,
:func:`status_of`. See :mod:`control_plane.fleet.runner` for the order and
failure semantics and :mod:`control_plane.fleet.worker` for why migrations run
in worker processes.
"""

from control_plane.fleet.models import Target, TargetResult, TargetStatus
from control_plane.fleet.runner import (
    FleetOptions,
    FleetReport,
    migrate_target_to,
    migrate_targets,
    pool_revision,
    run_fleet,
)
from control_plane.fleet.scripts import Drift, ScriptInfo
from control_plane.fleet.status import StatusReport, TargetState, status_of

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
    "migrate_target_to",
    "migrate_targets",
    "pool_revision",
    "run_fleet",
    "status_of",
]
