"""Control-plane settings (prefix ``TENANTCTL_``)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import Field

from data_plane.settings import CommonSettings


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
    provisioner: ProvisionerKind = ProvisionerKind.LOCAL
    owner_role: str = "tenantctl_owner"
    replication_role: str = "tenantctl_replicator"
    api_port: int = 8000
    admin_port: int = 8001
    host: str = "127.0.0.1"

    @property
    def embedded(self) -> bool:
        return self.catalog_url is None and self.pool_url is None
