"""Silo provisioning behind one interface, chosen by ``TENANTCTL_PROVISIONER``.

How the control plane uses it::

    provisioner = get_provisioner(settings, silo_server_url=endpoints.silo_server_url)
    location = provisioner.provision(SiloSpec(tenant_id=t.id, slug=t.slug, tier=t.tier))
    # record `location` in the catalog *before* anything else (I5), then:
    schema.upgrade(schema.Stream.TENANT, location.dsn, revision, app_role=settings.app_role)
    ...
    provisioner.deprovision(location)        # offboarding / demotion cleanup
    # a crash between provision() and recording its result left no location:
    provisioner.deprovision(location_for_cleanup(spec, provider=provisioner.kind))

Every call is synchronous and idempotent; from async code run it in a thread
(``anyio.to_thread.run_sync``). Errors: :class:`ProvisioningError` (permanent
failure, clear message), :class:`ProvisionerUnavailableError` (the Pulumi CLI
or AWS credentials are missing: nothing was attempted) and
:class:`SiloOwnershipError` (the silo is not this tenant's: refused).
"""

from __future__ import annotations

from control_plane.bootstrap import Roles
from control_plane.exceptions import ProvisionerUnavailableError
from control_plane.provisioning.base import SiloLocation, SiloProvisioner, SiloSpec
from control_plane.provisioning.local import LocalProvisioner
from control_plane.provisioning.naming import silo_database_name
from control_plane.provisioning.retry import RetryPolicy
from control_plane.settings import ControlPlaneSettings, ProvisionerKind

__all__ = [
    "LocalProvisioner",
    "RetryPolicy",
    "SiloLocation",
    "SiloProvisioner",
    "SiloSpec",
    "get_provisioner",
    "location_for_cleanup",
]


def get_provisioner(
    settings: ControlPlaneSettings,
    *,
    silo_server_url: str | None = None,
    retry: RetryPolicy | None = None,
) -> SiloProvisioner:
    """The provisioner ``settings.provisioner`` selects.

    ``local``: silos are databases on ``silo_server_url`` (pass
    ``endpoints.silo_server_url``, which resolves the embedded cluster too;
    falls back to ``settings.silo_server_url``).

    ``pulumi-aws``: one RDS stack per silo, configured by the
    ``TENANTCTL_PULUMI_*`` variables (see :mod:`.pulumi_aws`). Building it
    checks nothing yet; every operation first checks the Pulumi CLI and AWS
    credentials and raises :class:`ProvisionerUnavailableError` if either is
    missing. Importing Pulumi is deferred to here so the local default does
    not pay for it.
    """
    roles = Roles(owner=settings.owner_role, app=settings.app_role, replication=settings.replication_role)
    if settings.provisioner is ProvisionerKind.LOCAL:
        server = silo_server_url or settings.silo_server_url
        if not server:
            raise ProvisionerUnavailableError(
                "the local provisioner needs the silo server: set TENANTCTL_SILO_SERVER_URL "
                "(or run the embedded stack with `tenantctl up`)"
            )
        return LocalProvisioner(server_url=server, roles=roles, retry=retry)
    if settings.provisioner is ProvisionerKind.PULUMI_AWS:
        from control_plane.provisioning.pulumi_aws import PulumiAwsProvisioner, PulumiAwsSettings

        return PulumiAwsProvisioner(PulumiAwsSettings(), roles=roles, retry=retry)
    raise ProvisionerUnavailableError(f"unknown provisioner {settings.provisioner!r}")


def location_for_cleanup(spec: SiloSpec, *, provider: str) -> SiloLocation:
    """The location to deprovision a silo whose ``provision`` result was never recorded.

    Names are deterministic, so the tenant and slug are enough to find what a
    crashed onboarding or promotion may have created. ``deprovision`` still
    checks ownership (marker / stack outputs and tags) before dropping anything.
    """
    return SiloLocation(
        name=spec.name,
        provider=provider,
        tenant_id=spec.tenant_id,
        database=silo_database_name(spec.slug),
        detail={"slug": spec.slug, "tier": spec.tier},
    )
