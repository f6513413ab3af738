"""Control-plane errors, extending the tree in ``data_plane.exceptions``.

TenantctlError
├── (HTTP-mapped errors: see data_plane.exceptions)
├── ConflictError
│   ├── IllegalTransitionError      409 illegal_transition
│   ├── VersionConflictError        409 version_conflict
│   ├── OperationLockedError        409 locked (migration vs move interlock)
│   │   └── MigrationInProgressError 409 migration_in_progress (a fleet migration runs: no move starts)
│   ├── JobInProgressError          409 job_in_progress (the tenant already has an unfinished job)
│   ├── JobNotCancellableError      409 job_not_cancellable (finished, or past its point of no return)
│   └── IdempotencyInFlightError    409 idempotency_in_flight (same key, request still running)
├── IdempotencyKeyReusedError       422 idempotency_key_reused (same key, different request)
├── MigrationFailedError            500 migration_failed (one target's schema migration)
├── MoveError                       409 move_failed (the source stays authoritative)
│   ├── MoveNotReadyError           409 move_not_ready (lag or drain: retried later)
│   ├── VerificationError           409 verification_failed (move aborted)
│   └── SchemaRevisionMismatchError 409 schema_revision_mismatch (source ahead of the target's revision)
├── StepFailedError                 500 step_failed (a job step's database error, described without its data)
├── ProvisioningError               500 provisioning_failed
│   ├── ProvisionerUnavailableError 500 provisioner_unavailable (CLI/credentials missing)
│   └── SiloOwnershipError          409 silo_not_owned (silo belongs to another tenant / unmarked)
└── EmbeddedStackError              500 embedded_stack
    └── StackAlreadyRunningError
"""

from __future__ import annotations

from data_plane.exceptions import ConflictError, InvalidInputError, TenantctlError


class IllegalTransitionError(ConflictError):
    """The tenant's current status does not allow this operation."""

    code = "illegal_transition"


class VersionConflictError(ConflictError):
    """The object changed since it was read."""

    code = "version_conflict"


class OperationLockedError(ConflictError):
    """Another operation holds the lock on these databases."""

    code = "locked"


class MigrationInProgressError(OperationLockedError):
    """A fleet migration holds the interlock; a move cannot start until it finishes."""

    code = "migration_in_progress"


class MigrationFailedError(TenantctlError):
    """A schema migration of one database failed; the database kept its previous revision."""

    code = "migration_failed"


class StepFailedError(TenantctlError):
    """A job step failed with an error whose message may quote tenant data; this one names it instead.

    DBOS checkpoints a failed step's exception (pickled, message and all) in
    its tables on the catalog database, where it outlives the tenant's
    offboarding: a unique violation's "Key (name)=(...)" would stay there.
    """

    code = "step_failed"


class ProvisioningError(TenantctlError):
    """Provisioning a silo failed."""

    code = "provisioning_failed"


class ProvisionerUnavailableError(ProvisioningError):
    """The provisioner cannot run on this machine (missing CLI or credentials)."""

    code = "provisioner_unavailable"


class SiloOwnershipError(ProvisioningError):
    """The silo database belongs to another tenant (or to nobody we know); refused."""

    status_code = 409
    code = "silo_not_owned"


class EmbeddedStackError(TenantctlError):
    """The embedded PostgreSQL stack could not be started or reached."""

    code = "embedded_stack"


class StackAlreadyRunningError(EmbeddedStackError):
    """A stack is already running from this state directory."""


class JobInProgressError(ConflictError):
    """The tenant already has an unfinished job."""

    code = "job_in_progress"


class JobNotCancellableError(ConflictError):
    """The job has finished or is past its point of no return."""

    code = "job_not_cancellable"


class IdempotencyInFlightError(ConflictError):
    """A request with this Idempotency-Key is still being processed."""

    code = "idempotency_in_flight"


class IdempotencyKeyReusedError(InvalidInputError):
    """This Idempotency-Key was used for a different request."""

    code = "idempotency_key_reused"


class MoveError(TenantctlError):
    """A move cannot proceed; the source stays authoritative."""

    status_code = 409
    code = "move_failed"


class MoveNotReadyError(MoveError):
    """A move step is not ready yet (lag too high, drain incomplete); retry later."""

    code = "move_not_ready"


class VerificationError(MoveError):
    """Source and target differ after the final catch-up; the move was aborted."""

    code = "verification_failed"


class SchemaRevisionMismatchError(MoveError):
    """The move's source is at a tenant-schema revision the target cannot be brought to; refused."""

    code = "schema_revision_mismatch"
