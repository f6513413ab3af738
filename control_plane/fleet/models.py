"""Plain, picklable records exchanged between the runner, its worker processes and the CLI."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any, Literal

from data_plane.dsn import redact

TargetKind = Literal["pool", "silo"]
Action = Literal["upgrade", "downgrade"]


class TargetStatus(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped-up-to-date"
    NOT_RUN = "not-run"


@dataclass(frozen=True)
class Target:
    """One database carrying the tenant schema: the pool or one silo."""

    name: str
    kind: TargetKind
    dsn: str  # never with a password read from a secret store (it is printed, redacted)
    tenant: str | None = None  # slug of the silo's tenant, when it has one
    secret_ref: str | None = None  # secret holding the owner's password (RDS silos)

    def connect_dsn(self) -> str:
        """``dsn`` with the owner's password from ``secret_ref`` (read now, cached per process)."""
        from control_plane.provisioning.credentials import with_secret

        return with_secret(self.dsn, self.secret_ref)


@dataclass(frozen=True)
class Job:
    """What a worker process needs to migrate one target (absolute destination)."""

    target: str
    dsn: str
    action: Action
    destination: str | None  # None = base
    app_role: str
    replication_role: str
    script_location: str
    lock_timeout_s: float


@dataclass(frozen=True)
class Outcome:
    """What a worker reports back for one job."""

    status: TargetStatus
    from_revision: str | None
    to_revision: str | None
    duration_s: float
    error: str | None = None


@dataclass(frozen=True)
class TargetResult:
    """The per-target record of a fleet run (one row of the table / JSON)."""

    target: str
    kind: TargetKind
    tenant: str | None
    dsn: str
    status: TargetStatus
    from_revision: str | None
    to_revision: str | None
    duration_s: float
    error: str | None = None

    @classmethod
    def of(cls, target: Target, outcome: Outcome) -> TargetResult:
        return cls(
            target=target.name,
            kind=target.kind,
            tenant=target.tenant,
            dsn=target.dsn,
            status=outcome.status,
            from_revision=outcome.from_revision,
            to_revision=outcome.to_revision,
            duration_s=outcome.duration_s,
            error=outcome.error,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["status"] = self.status.value
        data["dsn"] = redact(self.dsn)
        data["duration_s"] = round(self.duration_s, 4)
        return data
