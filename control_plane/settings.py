"""Control-plane settings (prefix ``TENANTCTL_``)."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Self

from pydantic import Field, model_validator

from data_plane.settings import CommonSettings, InsecureSettingsError


class ProvisionerKind(StrEnum):
    LOCAL = "local"
    PULUMI_AWS = "pulumi-aws"


class ControlPlaneSettings(CommonSettings):
    """Settings of the control plane: admin API, CLI and workflow worker."""

    catalog_url: str | None = Field(default=None, description="Catalog DSN as the owner role.")
    pool_url: str | None = Field(default=None, description="Pool DSN as the owner role.")
    silo_server_url: str | None = Field(
        default=None, description="Admin DSN of the server where local silos are created."
    )
    pool_admin_url: str | None = Field(
        default=None,
        description="DSN on the pool database allowed to create subscriptions and drop slots (moves).",
    )
    provisioner: ProvisionerKind = ProvisionerKind.LOCAL
    owner_role: str = "tenantctl_owner"
    replication_role: str = "tenantctl_replicator"
    pool_replication_secret: str | None = Field(
        default=None,
        description="Secrets Manager ARN of the pool's replication-role password (RDS pool: a silo's "
        "subscription to the pool needs it; the shared stack's pool_replication_secret_arn output).",
    )
    api_port: int = 8000
    admin_port: int = 8001
    host: str = "127.0.0.1"

    # Tenant catalog and jobs (issue 4).
    placement_policy: dict[str, str] = Field(
        default_factory=lambda: {"free": "pool", "standard": "pool", "enterprise": "silo"},
        description="Tier -> default placement (pool | silo); its keys are the known tiers.",
    )
    admin_url: str | None = Field(default=None, description="Admin API URL for the CLI (default: the running stack's).")
    worker_name: str = Field(
        default="worker",
        description="Executor id of `tenantctl worker`; a restarted worker resumes the jobs of its name.",
    )
    worker_concurrency: int = Field(default=4, ge=1, description="Jobs one executor runs at once.")
    worker_adopt_interval_seconds: float = Field(
        default=10.0, gt=0, description="How often an executor adopts the jobs of executors that died."
    )
    worker_lease_check_seconds: float = Field(
        default=1.0, gt=0, description="How often an executor checks the catalog connection that holds its lease."
    )
    worker_lease_grace_seconds: float = Field(
        default=3.0,
        gt=0,
        description="How long an executor that lost its lease tries to take it back before it exits (code 75).",
    )
    move_cleanup_grace_seconds: float = Field(
        default=300.0, ge=0, description="Wait after a move's flip before the source rows are deleted."
    )
    move_max_lag_bytes: int = Field(
        default=16 * 1024 * 1024, ge=0, description="Replication lag under which a move may fence."
    )
    move_catch_up_timeout_seconds: float = Field(
        default=30.0, gt=0, description="How long one catch-up attempt waits for the lag to fall under the limit."
    )
    move_catch_up_backoff_seconds: list[float] = Field(
        default_factory=lambda: [5.0, 20.0, 80.0],
        description="Pauses between catch-up attempts while the lag stays large; then the move is aborted.",
    )
    move_initial_copy_stall_seconds: float = Field(
        default=300.0,
        gt=0,
        description="A move's initial copy has no deadline while it progresses; it fails after this long without "
        "progress (or after 3 failed table syncs).",
    )
    offboard_batch_size: int = Field(default=1000, ge=1, description="Rows deleted per transaction.")
    test_step_delay_seconds: float = Field(
        default=0.0,
        ge=0,
        description="Test hook: pause after every bounded batch of a job (ignored in production).",
    )

    @property
    def export_dir(self) -> Path:
        return self.state_dir / "exports"

    @property
    def embedded(self) -> bool:
        return self.catalog_url is None and self.pool_url is None

    @model_validator(mode="after")
    def _refuse_embedded_in_production(self) -> Self:
        # The embedded clusters live in a state directory on one machine, with
        # dev roles and no backups: a production process must never start or
        # reuse them because a URL was forgotten.
        if self.is_production and self.embedded:
            raise InsecureSettingsError(
                "production requires TENANTCTL_CATALOG_URL, TENANTCTL_POOL_URL and TENANTCTL_SILO_SERVER_URL; "
                "the embedded PostgreSQL of `tenantctl up` is for development only"
            )
        return self
