"""The ``SiloProvisioner`` interface: where a silo tenant's database comes from.

Implementations: ``local`` (a database on ``TENANTCTL_SILO_SERVER_URL``; the
default) and ``pulumi-aws`` (one RDS instance per silo through the Pulumi
Automation API). Every method is idempotent and safe to retry after a crash at
any point: names are deterministic (stack/location ``silo-<slug>``, database
``silo_<slug>``; see :mod:`.naming`), so a retried ``provision`` converges on
the same location, and ``deprovision`` checks that the silo belongs to the
location's tenant before removing anything.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SiloSpec:
    """What a provisioner needs to know about the tenant."""

    tenant_id: uuid.UUID
    slug: str
    tier: str

    @property
    def name(self) -> str:
        return f"silo-{self.slug}"


@dataclass(frozen=True)
class SiloLocation:
    """A provisioned silo, as recorded in the catalog's ``locations`` table.

    ``dsn`` is the owner-role DSN used for migrations and moves and
    ``app_dsn`` the application-role DSN the data plane uses; neither ever
    carries a password. Where credentials are needed they are behind
    ``secret_ref`` (e.g. an AWS Secrets Manager ARN), resolved at connect time.
    """

    name: str
    provider: str
    tenant_id: uuid.UUID
    database: str | None = None
    dsn: str | None = None
    app_dsn: str | None = None
    secret_ref: str | None = None
    stack_name: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def values(self) -> dict[str, Any]:
        """The ``locations`` columns it fills (JSON-able: what workflow steps checkpoint)."""
        return {name: getattr(self, name) for name in LOCATION_COLUMNS} | {"detail": dict(self.detail)}

    @classmethod
    def from_values(cls, tenant_id: uuid.UUID, values: Mapping[str, Any]) -> SiloLocation:
        """Back from :meth:`values` (or a ``locations`` row's mapping); other keys are ignored."""
        return cls(
            name=str(values["name"]),
            provider=str(values["provider"]),
            tenant_id=tenant_id,
            database=values.get("database"),
            dsn=values.get("dsn"),
            app_dsn=values.get("app_dsn"),
            secret_ref=values.get("secret_ref"),
            stack_name=values.get("stack_name"),
            detail=dict(values.get("detail") or {}),
        )


# The columns of a silo's ``locations`` row that a SiloLocation carries.
LOCATION_COLUMNS = ("name", "provider", "database", "dsn", "app_dsn", "secret_ref", "stack_name", "detail")


class SiloProvisioner(Protocol):
    """Creates, inspects and removes silo databases."""

    kind: str

    def provision(self, spec: SiloSpec) -> SiloLocation:
        """Create the silo (or find the one a previous attempt created) and return it."""
        ...

    def deprovision(self, location: SiloLocation) -> None:
        """Remove the silo; refuse if it does not belong to ``location.tenant_id``."""
        ...

    def describe(self, location: SiloLocation) -> dict[str, Any]:
        """Current state of the silo (exists, endpoint, size ...), for status views."""
        ...
