"""The Pulumi/AWS provisioner: one RDS PostgreSQL stack per silo.

Selected with ``TENANTCTL_PROVISIONER=pulumi-aws`` and configured by the
``TENANTCTL_PULUMI_*`` variables of :class:`PulumiAwsSettings`. Each silo is
the Pulumi stack ``silo-<slug>`` of the project ``tenantctl-silos``, running
the inline program :func:`infra.silo.silo_program` (a ``SiloDatabase``),
which reads the network and the pool's security group from the shared stack
(``infra/``, ``pulumi up`` once per environment).

* **Preflight.** Every operation first checks the ``pulumi`` CLI is on PATH,
  AWS credentials are configured, and the shared stack and region are set;
  otherwise it raises :class:`ProvisionerUnavailableError` naming everything
  that is missing and how to fix it -- before any side effect.
* **Isolation.** Every operation opens its own ``LocalWorkspace`` in a fresh
  temporary directory (removed afterwards), so concurrent operations on
  different silos never share a selected stack or a settings file; the
  backend's stack lock serialises two operations on the *same* silo
  (``ConcurrentUpdateError`` is retried).
* **Idempotence.** Stack names and the program's configuration derive from
  the tenant only, so a retried ``provision`` runs ``up`` on the same stack
  and converges; ``deprovision`` of a stack that is gone is a success.
* **Ownership.** Before ``up`` or ``destroy`` the stack's outputs -- or, after
  a crash before outputs existed, the ``tenant_id`` tags in its state -- must
  name the same tenant; otherwise :class:`SiloOwnershipError`.
* **No passwords** leave the stack: the location has owner/app DSNs without
  passwords; ``secret_ref`` is the Secrets Manager ARN of the *application*
  secret (all the data plane needs), and ``detail`` records the ARNs of the
  master and replication secrets (for the control plane's workers only).
* **Roles.** After ``up`` the provisioner reads the three secrets, connects
  to the new instance as the master and runs
  :func:`control_plane.bootstrap.ensure_roles_rds` and
  :func:`~control_plane.bootstrap.grant_database_access`, so the application
  and replication roles exist with the secrets' passwords when the location
  is returned. This needs the worker inside the VPC with the shared stack's
  ``app`` security group: otherwise a :class:`ProvisioningError` says so.
  That phase has its own bounded retry, so a database hiccup does not re-run
  ``pulumi up``; a retried ``provision`` repeats both, converging.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import structlog
from pulumi import automation as auto
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL

from control_plane import bootstrap
from control_plane.exceptions import ProvisionerUnavailableError, ProvisioningError, SiloOwnershipError
from control_plane.provisioning import local
from control_plane.provisioning.base import SiloLocation, SiloSpec
from control_plane.provisioning.credentials import MASTER_SECRET, REPLICATION_SECRET
from control_plane.provisioning.naming import silo_database_name, silo_resource_identifier, silo_stack_name
from control_plane.provisioning.retry import RetryPolicy, call_with_retry
from data_plane.dsn import libpq
from data_plane.secrets import (
    AwsSecretsManagerStore,
    SecretMismatchError,
    SecretStore,
    SecretUnavailableError,
    dsn_with_secret,
)
from infra.silo import Engine, SiloStackConfig, silo_program

log = structlog.get_logger(__name__)
T = TypeVar("T")

PROVIDER = "pulumi-aws"
# An RDS instance takes 10-20 minutes to create; back off on that scale.
DEFAULT_RETRY = RetryPolicy(attempts=3, initial_wait_s=30.0, max_wait_s=120.0)
# A private endpoint the worker cannot route to hangs until this expires.
CONNECT_TIMEOUT_S = 10

INSTALL_PULUMI = (
    "install it with `curl -fsSL https://get.pulumi.com | sh` (or `brew install pulumi/tap/pulumi`), "
    "make sure `pulumi version` works for the user running the control plane, and log in to the "
    "state backend (`pulumi login`, or set TENANTCTL_PULUMI_BACKEND_URL)"
)
CONFIGURE_AWS = (
    "configure credentials the AWS SDK can find: AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, "
    "AWS_PROFILE with ~/.aws/config (`aws configure` / `aws sso login`), AWS_WEB_IDENTITY_TOKEN_FILE "
    "(EKS IRSA), an ECS task role, or set TENANTCTL_PULUMI_USE_INSTANCE_PROFILE=true on EC2"
)


class PulumiAwsSettings(BaseSettings):
    """Settings of the Pulumi/AWS provisioner (prefix ``TENANTCTL_PULUMI_``)."""

    model_config = SettingsConfigDict(env_prefix="TENANTCTL_PULUMI_", extra="ignore", frozen=True)

    shared_stack: str | None = Field(
        default=None,
        description="Fully qualified shared stack the silos reference, e.g. acme/tenantctl-infra/prod.",
    )
    project: str = Field(default="tenantctl-silos", description="Pulumi project holding the silo stacks.")
    organization: str | None = Field(
        default=None, description="Pulumi Cloud organization of the silo stacks (None: the default org)."
    )
    backend_url: str | None = Field(
        default=None,
        description="State backend (s3://bucket, https://api.pulumi.com ...); None: `pulumi login`.",
    )
    secrets_provider: str | None = Field(
        default=None, description="Secrets provider of new stacks, e.g. awskms://alias/tenantctl-pulumi."
    )
    aws_region: str | None = Field(
        default=None, description="AWS region of the silos; falls back to AWS_REGION / AWS_DEFAULT_REGION."
    )
    use_instance_profile: bool = Field(
        default=False,
        description="Trust the EC2 instance profile for credentials (cannot be detected without a call).",
    )
    pulumi_home: Path | None = Field(default=None, description="PULUMI_HOME (plugins cache) to use.")
    engine: Engine = "postgres"
    engine_version: str = "16"
    instance_class: str = "db.t4g.medium"
    allocated_storage_gb: int = 50
    max_allocated_storage_gb: int = 200
    backup_retention_days: int = 7
    multi_az: bool = False
    deletion_protection: bool = True


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What :func:`preflight` found: the CLI path and the effective region."""

    pulumi: str
    region: str
    shared_stack: str


def _aws_credentials_configured(env: Mapping[str, str], home: Path) -> bool:
    if env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY"):
        return True
    if env.get("AWS_WEB_IDENTITY_TOKEN_FILE") and env.get("AWS_ROLE_ARN"):
        return True
    if env.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") or env.get("AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        return True
    credentials = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or home / ".aws" / "credentials")
    config = Path(env.get("AWS_CONFIG_FILE") or home / ".aws" / "config")
    files = [path for path in (credentials, config) if path.is_file()]
    if env.get("AWS_PROFILE"):
        # A named profile only helps if some file defines it.
        profile = env["AWS_PROFILE"]
        pattern = re.compile(rf"^\[(profile )?{re.escape(profile)}\]\s*$", re.MULTILINE)
        return any(pattern.search(path.read_text(errors="replace")) for path in files)
    return any(re.search(r"^\[(profile )?default\]\s*$", p.read_text(errors="replace"), re.M) for p in files)


def preflight(
    settings: PulumiAwsSettings, *, env: Mapping[str, str] | None = None, home: Path | None = None
) -> Preflight:
    """Check everything the provisioner needs, before any side effect.

    Raises :class:`ProvisionerUnavailableError` listing *every* missing piece
    with how to provide it (not just the first one found).
    """
    env = os.environ if env is None else env
    home = Path.home() if home is None else home
    problems: list[str] = []
    pulumi = shutil.which("pulumi", path=env.get("PATH", ""))
    if pulumi is None:
        problems.append(f"the Pulumi CLI (`pulumi`) is not on PATH: {INSTALL_PULUMI}")
    if not settings.use_instance_profile and not _aws_credentials_configured(env, home):
        problems.append(f"no AWS credentials are configured: {CONFIGURE_AWS}")
    region = settings.aws_region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if not region:
        problems.append("no AWS region: set TENANTCTL_PULUMI_AWS_REGION (or AWS_REGION)")
    if not settings.shared_stack:
        problems.append(
            "no shared stack: run `pulumi up` in infra/ and set TENANTCTL_PULUMI_SHARED_STACK to its "
            "fully qualified name (e.g. acme/tenantctl-infra/prod)"
        )
    if problems:
        raise ProvisionerUnavailableError(
            "the pulumi-aws provisioner cannot run: "
            + "; ".join(problems)
            + ". Or use the local provisioner (TENANTCTL_PROVISIONER=local)."
        )
    assert pulumi is not None and region is not None and settings.shared_stack is not None
    return Preflight(pulumi=pulumi, region=region, shared_stack=settings.shared_stack)


_TRANSIENT_TEXT = re.compile(
    r"Throttling|RequestLimitExceeded|Rate exceeded|TooManyRequests|connection reset|i/o timeout|"
    r"TLS handshake timeout|ServiceUnavailable|InternalFailure|503 Service|502 Bad Gateway",
    re.IGNORECASE,
)


def is_transient(error: BaseException) -> bool:
    """A locked stack (another update running) or an AWS/network hiccup."""
    if isinstance(error, auto.ConcurrentUpdateError):
        return True
    return isinstance(error, auto.CommandError) and bool(_TRANSIENT_TEXT.search(str(error)))


def tenant_ids_in_state(deployment: Mapping[str, Any]) -> set[str]:
    """``tenant_id`` tags of the resources recorded in a stack's state."""
    found: set[str] = set()
    for resource in deployment.get("resources") or []:
        for side in ("outputs", "inputs"):
            tags = (resource.get(side) or {}).get("tags")
            if isinstance(tags, dict) and isinstance(tags.get("tenant_id"), str):
                found.add(tags["tenant_id"])
    return found


def dsn_for(*, user: str, host: str, port: int, database: str) -> str:
    """A libpq URL without password (credentials are resolved from ``secret_ref``).

    A host that is a directory (a Unix socket, as libpq understands it) goes
    into the query string, where libpq expects it; libpq ignores ``sslmode``
    on a socket.
    """
    query = {"sslmode": "require"}
    if host.startswith("/"):
        query = {"host": host, "port": str(port), **query}
        return libpq(URL.create("postgresql", username=user, database=database, query=query))
    return libpq(URL.create("postgresql", username=user, host=host, port=port, database=database, query=query))


StackOpener = Callable[[str, auto.PulumiFn, bool], AbstractContextManager[auto.Stack | None]]
# Sets up the roles inside a freshly provisioned silo; returns what it found.
DatabasePreparer = Callable[[SiloLocation], bootstrap.RdsRoleState]

# Stack outputs a location is built from.
REQUIRED_OUTPUTS = (
    "tenant_id",
    "endpoint",
    "port",
    "database",
    "master_secret_arn",
    "app_secret_arn",
    "replication_secret_arn",
)
_AUTH_FAILED = re.compile(r"authentication failed|password", re.IGNORECASE)


class PulumiAwsProvisioner:
    """Silo = Pulumi stack ``silo-<slug>`` with one ``SiloDatabase`` (see module docstring).

    ``open_stack`` is the seam for tests: given the fully qualified stack
    name, the program and whether to create a missing stack, it yields the
    stack (or None when it does not exist and ``create`` is False).
    ``secrets`` reads the silo's Secrets Manager secrets (default: boto3, in
    the provisioner's region); ``prepare_database`` replaces the role
    bootstrap (tests of the orchestration that have no database).
    """

    kind = PROVIDER

    def __init__(
        self,
        settings: PulumiAwsSettings,
        *,
        roles: bootstrap.Roles | None = None,
        retry: RetryPolicy | None = None,
        open_stack: StackOpener | None = None,
        env: Mapping[str, str] | None = None,
        home: Path | None = None,
        secrets: SecretStore | None = None,
        prepare_database: DatabasePreparer | None = None,
    ) -> None:
        self.settings = settings
        self.roles = roles or bootstrap.Roles()
        self.retry = retry or DEFAULT_RETRY
        self._open_stack = open_stack or self._local_workspace_stack
        self._env = env
        self._home = home
        self._secrets = secrets
        self._prepare_database = prepare_database or self.bootstrap_roles

    # -- public interface ---------------------------------------------------

    def check_available(self) -> Preflight:
        """Raise :class:`ProvisionerUnavailableError` unless CLI, credentials and config are there."""
        return preflight(self.settings, env=self._env, home=self._home)

    def stack_config(self, spec: SiloSpec) -> SiloStackConfig:
        """The silo stack's configuration, a function of the tenant and the settings only."""
        return self._config(spec, self.check_available())

    def _config(self, spec: SiloSpec, ready: Preflight, *, deletion_protection: bool | None = None) -> SiloStackConfig:
        s = self.settings
        return SiloStackConfig(
            tenant_id=str(spec.tenant_id),
            slug=spec.slug,
            tier=spec.tier,
            identifier=silo_resource_identifier(spec.slug),
            database_name=silo_database_name(spec.slug),
            shared_stack=ready.shared_stack,
            engine=s.engine,
            engine_version=s.engine_version,
            instance_class=s.instance_class,
            allocated_storage_gb=s.allocated_storage_gb,
            max_allocated_storage_gb=s.max_allocated_storage_gb,
            backup_retention_days=s.backup_retention_days,
            multi_az=s.multi_az,
            deletion_protection=s.deletion_protection if deletion_protection is None else deletion_protection,
            master_username=self.roles.owner,
            app_username=self.roles.app,
            replication_username=self.roles.replication,
        )

    def provision(self, spec: SiloSpec) -> SiloLocation:
        """Create (or converge) the silo's stack with ``pulumi up``; return its location."""
        ready = self.check_available()
        config = self._config(spec, ready)
        stack_name = self._qualified(silo_stack_name(spec.slug))

        def run() -> Mapping[str, Any]:
            with self._open_stack(stack_name, silo_program(config), True) as stack:
                assert stack is not None
                self._check_owner(stack, stack_name, spec.tenant_id)
                self._configure(stack, ready)
                result = stack.up(on_output=self._log_line(stack_name), color="never")
                return {key: value.value for key, value in result.outputs.items()}

        outputs = self._retrying("provision", run, stack=stack_name)
        location = self._location(spec, config, stack_name, ready, outputs)
        state = self._prepare_database(location)
        # Recorded with the location: whether moves can copy on this server
        # as they do locally (see bootstrap.ensure_roles_rds).
        location = dataclasses.replace(
            location,
            detail={
                **location.detail,
                "rls_bypass": {"owner": state.owner_bypasses_rls, "replication": state.replication_bypasses_rls},
            },
        )
        log.info(
            "silo.provisioned",
            provider=PROVIDER,
            tenant_id=str(spec.tenant_id),
            stack=stack_name,
            owner_bypasses_rls=state.owner_bypasses_rls,
            replication_bypasses_rls=state.replication_bypasses_rls,
        )
        return location

    def bootstrap_roles(self, location: SiloLocation) -> bootstrap.RdsRoleState:
        """Create the application and replication roles in the silo, as its master.

        Reads the master, application and replication secrets (ARNs in the
        location), refuses secrets of other users than the location's roles,
        then runs :func:`bootstrap.ensure_roles_rds` and
        :func:`bootstrap.grant_database_access`. Idempotent.
        """
        if location.dsn is None or location.database is None or location.secret_ref is None:
            raise ProvisioningError(f"location {location.name!r} lacks the DSN, database or secret to bootstrap")
        dsn, database, app_ref = location.dsn, location.database, location.secret_ref
        master_ref, replication_ref = (
            str(location.detail.get(key) or "") for key in (MASTER_SECRET, REPLICATION_SECRET)
        )
        if not master_ref or not replication_ref:
            raise ProvisioningError(f"location {location.name!r} records no master or replication secret")
        store = self._secret_store()

        def run() -> bootstrap.RdsRoleState:
            app, replication = store.get(app_ref), store.get(replication_ref)
            for secret, role in ((app, self.roles.app), (replication, self.roles.replication)):
                if secret.username != role:
                    raise SecretMismatchError(
                        f"a secret of silo {location.name!r} is for {secret.username!r}, not {role!r}"
                    )
            master_dsn = dsn_with_secret(dsn, store.get(master_ref))
            passwords = {"app": app.password, "replication": replication.password}
            state = bootstrap.ensure_roles_rds(master_dsn, self.roles, passwords, connect_timeout=CONNECT_TIMEOUT_S)
            bootstrap.grant_database_access(master_dsn, database, self.roles, connect_timeout=CONNECT_TIMEOUT_S)
            return state

        endpoint = _endpoint(dsn)
        try:
            return call_with_retry(
                run, operation="bootstrap_roles", policy=self.retry, is_transient=local.is_transient, silo=location.name
            )
        except (SecretUnavailableError, SecretMismatchError) as exc:
            raise ProvisioningError(f"cannot read the credentials of silo {location.name!r}: {exc}") from exc
        except psycopg.OperationalError as exc:
            if exc.sqlstate is None and not _AUTH_FAILED.search(str(exc)):
                raise ProvisioningError(
                    f"silo database {endpoint} is not reachable from this worker ({_tail(str(exc), 300)}). "
                    "Run the control plane's workers inside the VPC with the shared stack's application "
                    "security group (output app_security_group_id) attached: the silo admits PostgreSQL "
                    "from that group and the pool only."
                ) from exc
            raise ProvisioningError(
                f"silo database {endpoint} refused the master credentials ({_tail(str(exc), 300)}); "
                "check the master secret matches the instance's master password"
            ) from exc
        except psycopg.Error as exc:
            raise ProvisioningError(
                f"creating the roles in silo database {endpoint} failed: {type(exc).__name__}: {_tail(str(exc), 500)}"
            ) from exc

    def _secret_store(self) -> SecretStore:
        if self._secrets is None:
            self._secrets = AwsSecretsManagerStore(default_region=self.check_available().region)
        return self._secrets

    def deprovision(self, location: SiloLocation) -> None:
        """Destroy the silo's stack (a final snapshot is kept) and remove it.

        Deletion protection is switched off by an ``up`` of the recorded
        configuration first; then ``destroy``. A stack that is gone is a success.
        """
        ready = self.check_available()
        stack_name = self._stack_of(location)
        config = self._recorded_config(location, ready, deletion_protection=False)

        def run() -> None:
            with self._open_stack(stack_name, silo_program(config), False) as stack:
                if stack is None:
                    log.info("silo.already_absent", provider=PROVIDER, stack=stack_name)
                    return
                self._check_owner(stack, stack_name, location.tenant_id)
                self._configure(stack, ready)
                on_output = self._log_line(stack_name)
                if self._has_resources(stack):
                    stack.up(on_output=on_output, color="never")
                    stack.destroy(on_output=on_output, color="never")
                stack.workspace.remove_stack(stack_name)

        self._retrying("deprovision", run, stack=stack_name)
        log.info("silo.deprovisioned", provider=PROVIDER, tenant_id=str(location.tenant_id), stack=stack_name)

    def describe(self, location: SiloLocation) -> dict[str, Any]:
        """``{exists, stack, endpoint, secret_ref, tenant_id, owned_by_tenant}`` from the stack's outputs."""
        ready = self.check_available()
        stack_name = self._stack_of(location)
        config = self._recorded_config(location, ready)

        def run() -> dict[str, Any]:
            with self._open_stack(stack_name, silo_program(config), False) as stack:
                if stack is None:
                    return {"provider": PROVIDER, "stack": stack_name, "exists": False}
                outputs = {key: value.value for key, value in stack.outputs().items()}
                return {
                    "provider": PROVIDER,
                    "stack": stack_name,
                    "exists": True,
                    "endpoint": outputs.get("endpoint"),
                    "secret_ref": outputs.get("app_secret_arn"),
                    "tenant_id": outputs.get("tenant_id"),
                    "owned_by_tenant": outputs.get("tenant_id") == str(location.tenant_id),
                }

        return self._retrying("describe", run, stack=stack_name)

    # -- steps --------------------------------------------------------------

    def _check_owner(self, stack: auto.Stack, stack_name: str, tenant_id: uuid.UUID) -> None:
        """Refuse to touch a stack whose outputs or state name another tenant."""
        outputs = stack.outputs()
        owners: set[str] = set()
        if "tenant_id" in outputs:
            owners.add(str(outputs["tenant_id"].value))
        else:
            # Outputs are written at the end of an update; after a crash
            # mid-update only the resources' tags tell whose stack it is.
            owners = tenant_ids_in_state(stack.export_stack().deployment or {})
        strangers = owners - {str(tenant_id)}
        if strangers:
            raise SiloOwnershipError(
                f"stack {stack_name!r} belongs to tenant {', '.join(sorted(strangers))}, not {tenant_id}; refused"
            )

    def _configure(self, stack: auto.Stack, ready: Preflight) -> None:
        # Inline programs in a temporary workspace keep no Pulumi.<stack>.yaml
        # between operations: set the (deterministic) config every time.
        stack.set_all_config({"aws:region": auto.ConfigValue(ready.region)})

    @staticmethod
    def _has_resources(stack: auto.Stack) -> bool:
        resources = (stack.export_stack().deployment or {}).get("resources") or []
        # The stack itself and provider instances (pulumi:*) are bookkeeping, not infrastructure.
        return any(not str(r.get("type", "")).startswith("pulumi:") for r in resources)

    def _location(
        self,
        spec: SiloSpec,
        config: SiloStackConfig,
        stack_name: str,
        ready: Preflight,
        outputs: Mapping[str, Any],
    ) -> SiloLocation:
        missing = [key for key in REQUIRED_OUTPUTS if key not in outputs]
        if missing:
            raise ProvisioningError(f"stack {stack_name!r} did not export {', '.join(missing)}")
        if str(outputs["tenant_id"]) != str(spec.tenant_id):
            raise SiloOwnershipError(
                f"stack {stack_name!r} exported tenant {outputs['tenant_id']}, not {spec.tenant_id}"
            )
        host, port, database = str(outputs["endpoint"]), int(outputs["port"]), str(outputs["database"])
        return SiloLocation(
            name=spec.name,
            provider=PROVIDER,
            tenant_id=spec.tenant_id,
            database=database,
            dsn=dsn_for(user=str(outputs.get("username") or self.roles.owner), host=host, port=port, database=database),
            app_dsn=dsn_for(user=self.roles.app, host=host, port=port, database=database),
            # The application's secret only: the data plane resolves this one.
            secret_ref=str(outputs["app_secret_arn"]),
            stack_name=stack_name,
            detail={
                "slug": spec.slug,
                "tier": spec.tier,
                "region": ready.region,
                "kms_key_arn": outputs.get("kms_key_arn"),
                MASTER_SECRET: str(outputs[MASTER_SECRET]),
                REPLICATION_SECRET: str(outputs[REPLICATION_SECRET]),
                # What deprovision replays (with deletion protection off), so a
                # settings change since provisioning cannot resize a silo on its way out.
                "stack_config": dataclasses.asdict(config),
            },
        )

    def _recorded_config(
        self, location: SiloLocation, ready: Preflight, *, deletion_protection: bool | None = None
    ) -> SiloStackConfig:
        recorded = location.detail.get("stack_config")
        if isinstance(recorded, Mapping):
            config = SiloStackConfig(**{**recorded, "shared_stack": recorded.get("shared_stack") or ready.shared_stack})
        else:
            slug = str(location.detail.get("slug") or location.name.removeprefix("silo-"))
            tier = str(location.detail.get("tier") or "enterprise")
            config = self._config(SiloSpec(tenant_id=location.tenant_id, slug=slug, tier=tier), ready)
        if str(config.tenant_id) != str(location.tenant_id):
            raise SiloOwnershipError(
                f"location {location.name!r} records the stack of tenant {config.tenant_id}, "
                f"not {location.tenant_id}; refused"
            )
        if deletion_protection is not None:
            config = dataclasses.replace(config, deletion_protection=deletion_protection)
        return config

    # -- plumbing -----------------------------------------------------------

    def _qualified(self, stack: str) -> str:
        if self.settings.organization:
            return f"{self.settings.organization}/{self.settings.project}/{stack}"
        return stack

    def _stack_of(self, location: SiloLocation) -> str:
        if location.provider != PROVIDER:
            raise ProvisioningError(
                f"location {location.name!r} was made by the {location.provider!r} provisioner, not {PROVIDER!r}"
            )
        if location.stack_name:
            return location.stack_name
        return self._qualified(silo_stack_name(location.name.removeprefix("silo-")))

    @staticmethod
    def _log_line(stack_name: str) -> Callable[[str], None]:
        def emit(line: str) -> None:
            if line.strip():
                log.debug("pulumi.output", stack=stack_name, line=line.rstrip())

        return emit

    def _retrying(self, operation: str, fn: Callable[[], T], *, stack: str) -> T:
        try:
            return call_with_retry(fn, operation=operation, policy=self.retry, is_transient=is_transient, stack=stack)
        except auto.CommandError as exc:
            raise ProvisioningError(f"pulumi {operation} of stack {stack!r} failed: {_tail(str(exc))}") from exc
        except FileNotFoundError as exc:
            # The CLI vanished between preflight and use (or PULUMI_HOME is broken).
            raise ProvisionerUnavailableError(
                f"pulumi {operation} of stack {stack!r} could not start the Pulumi CLI ({exc}): " + INSTALL_PULUMI
            ) from exc

    @contextmanager
    def _local_workspace_stack(
        self, stack_name: str, program: auto.PulumiFn, create: bool
    ) -> Iterator[auto.Stack | None]:
        """A stack in a private, temporary LocalWorkspace (deleted on exit)."""
        s = self.settings
        env_vars: dict[str, str] = {"PULUMI_SKIP_UPDATE_CHECK": "true"}
        if s.backend_url:
            env_vars["PULUMI_BACKEND_URL"] = s.backend_url
        with tempfile.TemporaryDirectory(prefix="tenantctl-pulumi-") as work_dir:
            options = auto.LocalWorkspaceOptions(
                work_dir=work_dir,
                pulumi_home=str(s.pulumi_home) if s.pulumi_home else None,
                env_vars=env_vars,
                secrets_provider=s.secrets_provider,
                project_settings=auto.ProjectSettings(
                    name=s.project,
                    runtime="python",
                    backend=auto.ProjectBackend(url=s.backend_url) if s.backend_url else None,
                ),
            )
            if create:
                yield auto.create_or_select_stack(stack_name, project_name=s.project, program=program, opts=options)
                return
            try:
                stack = auto.select_stack(stack_name, project_name=s.project, program=program, opts=options)
            except auto.StackNotFoundError:
                yield None
                return
            yield stack


def _endpoint(dsn: str) -> str:
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    return f"{parts.get('host', '?')}:{parts.get('port', 5432)}"


def _tail(text: str, limit: int = 1500) -> str:
    """The end of a CLI error (where Pulumi puts the diagnostic), on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else "..." + flat[-limit:]
