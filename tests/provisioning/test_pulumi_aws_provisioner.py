"""The Pulumi/AWS provisioner without the Pulumi CLI or AWS.

* Preflight: the real ``os.environ``/``PATH``/``HOME`` lookups, driven with
  monkeypatch (an empty PATH, a fake ``pulumi`` executable, a temporary HOME).
* Orchestration: the stack seam (``open_stack``) yields an in-memory stack
  that records what the provisioner asks Pulumi to do, so ownership checks,
  retries and the deprovision order are asserted without a cloud. The Pulumi
  program itself is covered by ``test_infra.py`` on Pulumi's mocks.
* Role bootstrap after ``up``: the same seam, with outputs pointing at the real
  silo server posing as RDS (``conftest.rds_silo``) and the secrets in a
  ``StaticSecretStore``; the data plane then connects through the resolver.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest
import structlog
from pulumi import automation as auto
from pulumi.automation._cmd import CommandResult

from control_plane.bootstrap import RdsRoleState
from control_plane.exceptions import ProvisionerUnavailableError, ProvisioningError, SiloOwnershipError
from control_plane.provisioning import (
    LocalProvisioner,
    RetryPolicy,
    SiloLocation,
    SiloSpec,
    get_provisioner,
    location_for_cleanup,
    pulumi_aws,
)
from control_plane.provisioning.pulumi_aws import PulumiAwsProvisioner, PulumiAwsSettings, tenant_ids_in_state
from control_plane.settings import ControlPlaneSettings, ProvisionerKind
from data_plane.dsn import libpq
from data_plane.routing import EngineRegistry, Route
from data_plane.secrets import AwsSecretsResolver, SecretMismatchError, StaticSecretStore, dsn_with_secret
from tests.provisioning.conftest import RdsSilo, role_state, scram_verifier_matches

FAST = RetryPolicy(attempts=3, initial_wait_s=0.01, max_wait_s=0.02)
SHARED = "acme/tenantctl-infra/prod"
TENANT = uuid.UUID("0b7e3c1a-5f0e-4c55-9a57-6f3c2d9d1e01")
OTHER = uuid.UUID("9d2f5b6e-1c4a-4e2b-8f3d-2a1b0c9d8e7f")
SPEC = SiloSpec(tenant_id=TENANT, slug="acme", tier="enterprise")
MASTER_ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tenantctl/silos/silo-acme/master-AbCdEf"
APP_ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tenantctl/silos/silo-acme/app-GhIjKl"
REPLICATION_ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tenantctl/silos/silo-acme/replication-MnOpQr"
UP_OUTPUTS: dict[str, Any] = {
    "tenant_id": str(TENANT),
    "identifier": "silo-acme",
    "endpoint": "silo-acme.c0ffee.eu-west-1.rds.amazonaws.com",
    "port": 5432,
    "database": "silo_acme",
    "username": "tenantctl_owner",
    "app_username": "tenantctl_app",
    "replication_username": "tenantctl_replicator",
    "master_secret_arn": MASTER_ARN,
    "app_secret_arn": APP_ARN,
    "replication_secret_arn": REPLICATION_ARN,
    "kms_key_arn": "arn:aws:kms:eu-west-1:123456789012:key/k",
}


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """A clean environment: no AWS variables, an empty HOME, settings for the shared stack."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TENANTCTL_PULUMI_SHARED_STACK", SHARED)
    monkeypatch.setenv("TENANTCTL_PULUMI_AWS_REGION", "eu-west-1")
    return home


@pytest.fixture
def fake_pulumi_on_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "pulumi"
    cli.write_text("#!/bin/sh\nexit 0\n")
    cli.chmod(cli.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", str(bin_dir))
    return cli


def with_static_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")


def pulumi_provisioner() -> PulumiAwsProvisioner:
    """Built the way the control plane builds it: from settings, through the factory."""
    provisioner = get_provisioner(ControlPlaneSettings(provisioner=ProvisionerKind.PULUMI_AWS))
    assert isinstance(provisioner, PulumiAwsProvisioner)
    return provisioner


# -- preflight -----------------------------------------------------------------


def test_missing_cli_gives_an_actionable_error_not_file_not_found(
    aws_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with_static_keys(monkeypatch)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    provisioner = pulumi_provisioner()
    location = SiloLocation(name="silo-acme", provider="pulumi-aws", tenant_id=TENANT, stack_name="silo-acme")
    for call in (
        lambda: provisioner.provision(SPEC),
        lambda: provisioner.deprovision(location),
        lambda: provisioner.describe(location),
    ):
        with pytest.raises(ProvisionerUnavailableError) as info:
            call()
        message = info.value.message
        assert "Pulumi CLI (`pulumi`) is not on PATH" in message
        assert "https://get.pulumi.com" in message and "pulumi login" in message
        assert "AWS credentials" not in message  # those are configured
        assert info.value.code == "provisioner_unavailable"
        assert not isinstance(info.value.__cause__, FileNotFoundError)


def test_missing_aws_credentials_are_reported_with_how_to_configure(aws_env: Path, fake_pulumi_on_path: Path) -> None:
    with pytest.raises(ProvisionerUnavailableError) as info:
        pulumi_provisioner().provision(SPEC)
    message = info.value.message
    assert "no AWS credentials are configured" in message
    for hint in ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "aws configure", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        assert hint in message
    assert "Pulumi CLI" not in message  # that one is there


def test_every_missing_piece_is_listed_at_once(aws_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("TENANTCTL_PULUMI_SHARED_STACK")
    monkeypatch.delenv("TENANTCTL_PULUMI_AWS_REGION")
    with pytest.raises(ProvisionerUnavailableError) as info:
        pulumi_provisioner().check_available()
    message = info.value.message
    for fragment in ("Pulumi CLI", "AWS credentials", "AWS region", "TENANTCTL_PULUMI_SHARED_STACK"):
        assert fragment in message
    assert "TENANTCTL_PROVISIONER=local" in message


@pytest.mark.parametrize(
    ("files", "profile", "ok"),
    [
        ({"credentials": "[default]\naws_access_key_id = x\n"}, None, True),
        ({"config": "[profile ops]\nsso_start_url = https://x\n"}, "ops", True),
        ({"config": "[profile ops]\nregion = eu-west-1\n"}, "dev", False),  # named profile not defined
        ({"config": "[profile ops]\nregion = eu-west-1\n"}, None, False),  # no default profile
        ({}, None, False),
    ],
)
def test_aws_config_files_and_profiles(
    aws_env: Path,
    fake_pulumi_on_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, str],
    profile: str | None,
    ok: bool,
) -> None:
    (aws_env / ".aws").mkdir()
    for name, text in files.items():
        (aws_env / ".aws" / name).write_text(text)
    if profile:
        monkeypatch.setenv("AWS_PROFILE", profile)
    provisioner = pulumi_provisioner()
    if ok:
        assert provisioner.check_available().pulumi == str(fake_pulumi_on_path)
    else:
        with pytest.raises(ProvisionerUnavailableError, match="no AWS credentials"):
            provisioner.check_available()


def test_web_identity_and_instance_profile_count_as_credentials(
    aws_env: Path, fake_pulumi_on_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/secrets/token")
    monkeypatch.setenv("AWS_ROLE_ARN", "arn:aws:iam::123456789012:role/tenantctl")
    assert pulumi_provisioner().check_available().region == "eu-west-1"
    monkeypatch.delenv("AWS_WEB_IDENTITY_TOKEN_FILE")
    with pytest.raises(ProvisionerUnavailableError):
        pulumi_provisioner().check_available()
    monkeypatch.setenv("TENANTCTL_PULUMI_USE_INSTANCE_PROFILE", "true")
    assert pulumi_provisioner().check_available().shared_stack == SHARED


# -- orchestration through the stack seam ------------------------------------------


class FakeStack:
    """What the provisioner uses of ``auto.Stack``, recording calls."""

    def __init__(
        self,
        *,
        outputs: dict[str, Any] | None = None,
        resources: list[dict[str, Any]] | None = None,
        up_errors: list[BaseException] | None = None,
        up_outputs: dict[str, Any] | None = None,
    ) -> None:
        self._outputs = dict(outputs or {})
        self.up_outputs = dict(UP_OUTPUTS if up_outputs is None else up_outputs)
        self.resources = list(resources or [])
        self.up_errors = list(up_errors or [])
        self.calls: list[str] = []
        self.config: dict[str, str] = {}
        self.workspace = SimpleNamespace(remove_stack=lambda name: self.calls.append(f"remove:{name}"))

    def outputs(self) -> dict[str, Any]:
        return {key: SimpleNamespace(value=value) for key, value in self._outputs.items()}

    def export_stack(self) -> Any:
        return SimpleNamespace(deployment={"resources": self.resources})

    def set_all_config(self, config: dict[str, Any]) -> None:
        self.config = {key: value.value for key, value in config.items()}

    def up(self, **_: Any) -> Any:
        self.calls.append("up")
        if self.up_errors:
            raise self.up_errors.pop(0)
        self._outputs = dict(self.up_outputs)
        self.resources = [{"type": "aws:rds/instance:Instance", "inputs": {"tags": {"tenant_id": str(TENANT)}}}]
        return SimpleNamespace(outputs=self.outputs())

    def destroy(self, **_: Any) -> None:
        self.calls.append("destroy")
        self.resources, self._outputs = [], {}


class Seam:
    """Plays the backend: stacks by name; records which program configs were used."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, up_outputs: dict[str, Any] | None = None) -> None:
        self.up_outputs = up_outputs
        self.stacks: dict[str, FakeStack] = {}
        self.opened: list[tuple[str, bool]] = []
        self.configs: list[Any] = []
        self.prepared: list[SiloLocation] = []

        def recording_program(config: Any) -> Any:
            self.configs.append(config)
            return lambda: None

        monkeypatch.setattr(pulumi_aws, "silo_program", recording_program)

    @contextlib.contextmanager
    def open(self, name: str, program: Any, create: bool) -> Iterator[FakeStack | None]:
        self.opened.append((name, create))
        if name not in self.stacks and create:
            self.stacks[name] = FakeStack(up_outputs=self.up_outputs)
        yield self.stacks.get(name)


@pytest.fixture
def seam(aws_env: Path, fake_pulumi_on_path: Path, monkeypatch: pytest.MonkeyPatch) -> Seam:
    with_static_keys(monkeypatch)
    return Seam(monkeypatch)


ROLES_STATE = RdsRoleState(
    master="tenantctl_owner", owner_bypasses_rls=False, replication_bypasses_rls=False, replication_is_rds_member=True
)


def make(seam: Seam, **settings: Any) -> PulumiAwsProvisioner:
    """The orchestration alone: role bootstrap (tested with a database elsewhere) is recorded, not run."""

    def prepare_database(location: SiloLocation) -> RdsRoleState:
        seam.prepared.append(location)
        return ROLES_STATE

    return PulumiAwsProvisioner(
        PulumiAwsSettings(**settings), retry=FAST, open_stack=seam.open, prepare_database=prepare_database
    )


def test_provision_twice_converges_on_one_stack_and_one_location(seam: Seam) -> None:
    provisioner = make(seam)
    first = provisioner.provision(SPEC)
    second = provisioner.provision(SPEC)
    assert first == second
    assert list(seam.stacks) == ["silo-acme"] and seam.stacks["silo-acme"].calls == ["up", "up"]
    assert seam.stacks["silo-acme"].config == {"aws:region": "eu-west-1"}
    assert first.provider == "pulumi-aws" and first.stack_name == "silo-acme"
    # the application's secret is the reference; the control plane's two are in the detail
    assert first.secret_ref == APP_ARN and first.database == "silo_acme"
    assert first.detail["master_secret_arn"] == MASTER_ARN
    assert first.detail["replication_secret_arn"] == REPLICATION_ARN
    assert first.detail["rls_bypass"] == {"owner": False, "replication": False}
    # the roles were set up after every up, before the location was returned
    assert [loc.secret_ref for loc in seam.prepared] == [APP_ARN, APP_ARN]
    for dsn, role in ((first.dsn, "tenantctl_owner"), (first.app_dsn, "tenantctl_app")):
        assert dsn is not None
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
        assert parts["user"] == role and parts["host"] == "silo-acme.c0ffee.eu-west-1.rds.amazonaws.com"
        assert parts["dbname"] == "silo_acme" and parts["sslmode"] == "require"
        assert "password" not in parts
    config = seam.configs[0]
    assert (config.tenant_id, config.identifier, config.shared_stack) == (str(TENANT), "silo-acme", SHARED)
    assert config.deletion_protection is True
    assert (config.app_username, config.replication_username) == ("tenantctl_app", "tenantctl_replicator")
    assert first.detail["stack_config"]["instance_class"] == "db.t4g.medium"


def test_stack_names_are_qualified_by_organization(seam: Seam) -> None:
    location = make(seam, organization="acme", project="tenantctl-silos").provision(SPEC)
    assert location.stack_name == "acme/tenantctl-silos/silo-acme"
    assert seam.opened == [("acme/tenantctl-silos/silo-acme", True)]


def test_a_stack_of_another_tenant_is_never_updated(seam: Seam) -> None:
    seam.stacks["silo-acme"] = FakeStack(outputs={"tenant_id": str(OTHER)})
    with pytest.raises(SiloOwnershipError, match=str(OTHER)):
        make(seam).provision(SPEC)
    assert seam.stacks["silo-acme"].calls == []


def test_after_a_crash_mid_update_state_tags_decide_ownership(seam: Seam) -> None:
    # No outputs yet (the update died), but resources of another tenant in state.
    seam.stacks["silo-acme"] = FakeStack(
        resources=[{"type": "aws:kms/key:Key", "inputs": {"tags": {"tenant_id": str(OTHER)}}}]
    )
    with pytest.raises(SiloOwnershipError):
        make(seam).provision(SPEC)
    # control: a half-made stack of the same tenant is resumed
    seam.stacks["silo-acme"] = FakeStack(
        resources=[{"type": "aws:kms/key:Key", "inputs": {"tags": {"tenant_id": str(TENANT)}}}]
    )
    assert make(seam).provision(SPEC).secret_ref == APP_ARN


def test_locked_stack_is_retried_and_logged(seam: Seam) -> None:
    locked = auto.ConcurrentUpdateError(
        CommandResult(stdout="", stderr="the stack is currently locked by 1 lock(s)", code=255)
    )
    seam.stacks["silo-acme"] = FakeStack(up_errors=[locked])
    with structlog.testing.capture_logs() as logs:
        location = make(seam).provision(SPEC)
    assert location.secret_ref == APP_ARN
    assert seam.stacks["silo-acme"].calls == ["up", "up"]
    assert [e["attempt"] for e in logs if e["event"] == "provisioning.retry"] == [1]


def test_permanent_pulumi_failure_is_a_clear_provisioning_error(seam: Seam) -> None:
    failure = auto.CommandError(
        CommandResult(
            stdout="",
            stderr="error: creating RDS DB Instance: InvalidParameterCombination: bad class",
            code=1,
        )
    )
    seam.stacks["silo-acme"] = FakeStack(up_errors=[failure, failure, failure])
    with pytest.raises(ProvisioningError) as info:
        make(seam).provision(SPEC)
    assert "pulumi provision of stack 'silo-acme' failed" in info.value.message
    assert "InvalidParameterCombination" in info.value.message
    assert seam.stacks["silo-acme"].calls == ["up"]  # not retried


def test_deprovision_lifts_deletion_protection_then_destroys_and_removes(seam: Seam) -> None:
    provisioner = make(seam, instance_class="db.t4g.medium")
    location = provisioner.provision(SPEC)
    # Settings changed since: deprovision must replay the recorded config, not resize the silo.
    provisioner = make(seam, instance_class="db.r6g.4xlarge")
    provisioner.deprovision(location)
    assert seam.stacks["silo-acme"].calls == ["up", "up", "destroy", "remove:silo-acme"]
    replayed = seam.configs[-1]
    assert replayed.deletion_protection is False and replayed.instance_class == "db.t4g.medium"
    assert provisioner.describe(location)["exists"] is True  # fake backend keeps the (removed) object
    del seam.stacks["silo-acme"]
    provisioner.deprovision(location)  # gone: success, nothing opened for creation
    assert provisioner.describe(location) == {"provider": "pulumi-aws", "stack": "silo-acme", "exists": False}
    assert all(create is False for _, create in seam.opened[1:])


def test_deprovision_with_a_location_claiming_another_tenant_is_refused(seam: Seam) -> None:
    provisioner = make(seam)
    location = provisioner.provision(SPEC)
    forged = SiloLocation(name=location.name, provider="pulumi-aws", tenant_id=OTHER, stack_name=location.stack_name)
    with pytest.raises(SiloOwnershipError):
        provisioner.deprovision(forged)
    assert "destroy" not in seam.stacks["silo-acme"].calls
    assert provisioner.describe(forged)["owned_by_tenant"] is False
    assert provisioner.describe(location)["owned_by_tenant"] is True


def test_state_tag_scan() -> None:
    deployment = {
        "resources": [
            {"type": "pulumi:pulumi:Stack"},
            {
                "type": "aws:kms/key:Key",
                "inputs": {"tags": {"tenant_id": "a"}},
                "outputs": {"tags": {"tenant_id": "a"}},
            },
            {"type": "aws:rds/instance:Instance", "outputs": {"tags": {"tier": "x"}}},
        ]
    }
    assert tenant_ids_in_state(deployment) == {"a"}
    assert tenant_ids_in_state({}) == set()


def test_transient_classification() -> None:
    def error(stderr: str) -> auto.CommandError:
        return auto.CommandError(CommandResult(stdout="", stderr=stderr, code=1))

    assert pulumi_aws.is_transient(auto.ConcurrentUpdateError(CommandResult(stdout="", stderr="", code=1)))
    assert pulumi_aws.is_transient(error("operation error RDS: ThrottlingException: Rate exceeded"))
    assert not pulumi_aws.is_transient(error("InvalidParameterValue: bad engine version"))
    assert not pulumi_aws.is_transient(FileNotFoundError("pulumi"))


def test_factory_builds_the_configured_provisioner(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TENANTCTL_SILO_SERVER_URL", raising=False)
    local_settings = ControlPlaneSettings(provisioner=ProvisionerKind.LOCAL)
    local = get_provisioner(local_settings, silo_server_url="postgresql://postgres@localhost/postgres")
    assert isinstance(local, LocalProvisioner) and local.kind == "local"
    with pytest.raises(ProvisionerUnavailableError, match="TENANTCTL_SILO_SERVER_URL"):
        get_provisioner(local_settings)
    assert get_provisioner(ControlPlaneSettings(provisioner=ProvisionerKind.PULUMI_AWS)).kind == "pulumi-aws"


def test_real_automation_api_path_reports_cli_failures_and_cleans_its_workspace(
    aws_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The default LocalWorkspace path, with a stand-in CLI that is not logged in."""
    with_static_keys(monkeypatch)
    bin_dir, scratch = tmp_path / "cli", tmp_path / "tmp"
    bin_dir.mkdir()
    scratch.mkdir()
    calls = tmp_path / "calls.log"
    cli = bin_dir / "pulumi"
    cli.write_text(
        "#!/bin/sh\n"
        f'echo "$PWD $*" >> {calls}\n'
        'if [ "$1" = "version" ]; then echo "v3.200.0"; exit 0; fi\n'
        'echo "error: PULUMI_ACCESS_TOKEN must be set for login during non-interactive CLI sessions" >&2\n'
        "exit 255\n"
    )
    cli.chmod(cli.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    monkeypatch.setenv("TMPDIR", str(scratch))
    monkeypatch.setattr("tempfile.tempdir", None)  # re-read TMPDIR
    provisioner = PulumiAwsProvisioner(PulumiAwsSettings(), retry=FAST)
    with pytest.raises(ProvisioningError) as info:
        provisioner.provision(SPEC)
    assert not isinstance(info.value, ProvisionerUnavailableError)
    assert "pulumi provision of stack 'silo-acme' failed" in info.value.message
    assert "PULUMI_ACCESS_TOKEN must be set" in info.value.message
    stack_calls = [line for line in calls.read_text().splitlines() if " stack " in line]
    assert stack_calls and all("silo-acme" in line for line in stack_calls)
    # every CLI call ran in a private workspace under TMPDIR, removed afterwards
    assert all(line.startswith(f"{scratch}/tenantctl-pulumi-") for line in stack_calls)
    assert list(scratch.iterdir()) == []


def test_deprovision_of_an_empty_stack_only_removes_it(seam: Seam) -> None:
    # A provision that died right after creating the stack: only bookkeeping in state.
    seam.stacks["silo-acme"] = FakeStack(resources=[{"type": "pulumi:pulumi:Stack"}, {"type": "pulumi:providers:aws"}])
    location = SiloLocation(name="silo-acme", provider="pulumi-aws", tenant_id=TENANT, detail={"slug": "acme"})
    make(seam).deprovision(location)
    assert seam.stacks["silo-acme"].calls == ["remove:silo-acme"]


def test_an_unrecorded_silo_stack_can_be_cleaned_up_from_the_spec_alone(seam: Seam) -> None:
    provisioner = make(seam)
    provisioner.provision(SPEC)
    with pytest.raises(SiloOwnershipError):
        provisioner.deprovision(location_for_cleanup(SiloSpec(OTHER, "acme", "enterprise"), provider="pulumi-aws"))
    provisioner.deprovision(location_for_cleanup(SPEC, provider=provisioner.kind))
    assert seam.stacks["silo-acme"].calls == ["up", "up", "destroy", "remove:silo-acme"]
    assert seam.configs[-1].deletion_protection is False


# -- role bootstrap after `up`, on the real silo server posing as RDS ----------------------


def _secret(username: str, password: str, database: str) -> str:
    return json.dumps(
        {
            "engine": "postgres",
            "host": "ignored",
            "port": 5432,
            "username": username,
            "password": password,
            "dbname": database,
        }
    )


def _rds_secrets(rds_silo: RdsSilo, **overrides: str) -> dict[str, str]:
    roles, db = rds_silo.roles, rds_silo.database
    return {
        MASTER_ARN: _secret(roles.owner, "master-pw", db),
        APP_ARN: _secret(roles.app, "app-pw-from-secrets-manager", db),
        REPLICATION_ARN: _secret(roles.replication, "replication-pw-from-secrets-manager", db),
    } | overrides


def _rds_outputs(rds_silo: RdsSilo, *, host: str | None = None, port: int | None = None) -> dict[str, Any]:
    server = psycopg.conninfo.conninfo_to_dict(libpq(rds_silo.admin))
    return UP_OUTPUTS | {
        "endpoint": host or str(server["host"]),
        "port": port or int(server.get("port") or 5432),
        "database": rds_silo.database,
        "username": rds_silo.roles.owner,
        "app_username": rds_silo.roles.app,
        "replication_username": rds_silo.roles.replication,
    }


def _rds_provisioner(
    monkeypatch: pytest.MonkeyPatch, rds_silo: RdsSilo, outputs: dict[str, Any], secrets: dict[str, str]
) -> tuple[PulumiAwsProvisioner, Seam]:
    with_static_keys(monkeypatch)
    seam = Seam(monkeypatch, up_outputs=outputs)
    provisioner = PulumiAwsProvisioner(
        PulumiAwsSettings(),
        roles=rds_silo.roles,
        retry=FAST,
        open_stack=seam.open,
        secrets=StaticSecretStore(secrets),
    )
    return provisioner, seam


@pytest.fixture
def socket_server(rds_silo: RdsSilo) -> RdsSilo:
    host = str(psycopg.conninfo.conninfo_to_dict(libpq(rds_silo.admin)).get("host", ""))
    if not host.startswith("/"):
        # The location's DSNs require TLS, as RDS does; libpq skips TLS only on sockets.
        pytest.skip("needs the embedded (socket) test server: silo DSNs carry sslmode=require")
    return rds_silo


async def test_provision_creates_the_roles_and_the_silo_is_reachable_through_the_app_secret(
    aws_env: Path, fake_pulumi_on_path: Path, monkeypatch: pytest.MonkeyPatch, socket_server: RdsSilo
) -> None:
    rds = socket_server
    secrets = _rds_secrets(rds)
    provisioner, seam = _rds_provisioner(monkeypatch, rds, _rds_outputs(rds), secrets)
    location = await asyncio.to_thread(provisioner.provision, SPEC)

    assert location.secret_ref == APP_ARN and location.detail["master_secret_arn"] == MASTER_ARN
    assert location.detail["rls_bypass"] == {"owner": False, "replication": False}
    for role, ref in ((rds.roles.app, APP_ARN), (rds.roles.replication, REPLICATION_ARN)):
        state = role_state(rds.admin, role)
        assert state is not None and state["login"] is True
        assert scram_verifier_matches(str(state["password"]), json.loads(secrets[ref])["password"])

    # The data plane's path: route -> application secret -> a connection as the application role.
    resolver = AwsSecretsResolver(StaticSecretStore(secrets))
    route = Route(
        tenant_id=TENANT,
        slug="acme",
        tier="enterprise",
        status="active",
        placement="silo",
        epoch=2,
        location_id=uuid.uuid4(),
        location_name=location.name,
        app_dsn=location.app_dsn,
        secret_ref=location.secret_ref,
    )
    registry = EngineRegistry(libpq(rds.admin), resolver=resolver, silo_pool_size=1)
    await registry.start()
    try:
        async with registry.connection(route) as conn:
            assert await conn.fetchval("SELECT current_user") == rds.roles.app
            assert await conn.fetchval("SELECT has_database_privilege(current_user, current_database(), 'CONNECT')")
    finally:
        await registry.close()
    # ... and never with the master's: a route pointing at it is refused
    with pytest.raises(SecretMismatchError):
        await resolver.dsn_for(dataclasses.replace(route, secret_ref=MASTER_ARN))
    # The control plane's path: owner DSN + master secret.
    assert location.dsn is not None
    master_dsn = dsn_with_secret(location.dsn, StaticSecretStore(secrets).get(MASTER_ARN))
    with psycopg.connect(libpq(master_dsn)) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (rds.roles.owner,)

    # provisioning again converges on the same location and roles
    assert await asyncio.to_thread(provisioner.provision, SPEC) == location
    assert seam.stacks["silo-acme"].calls == ["up", "up"]


def test_an_unreachable_silo_database_is_a_clear_provisioning_error(
    aws_env: Path, fake_pulumi_on_path: Path, monkeypatch: pytest.MonkeyPatch, rds_silo: RdsSilo
) -> None:
    with socket.socket() as probe:  # a port nothing listens on: the connection is refused
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    outputs = _rds_outputs(rds_silo, host="127.0.0.1", port=closed_port)
    provisioner, seam = _rds_provisioner(monkeypatch, rds_silo, outputs, _rds_secrets(rds_silo))
    with structlog.testing.capture_logs() as logs, pytest.raises(ProvisioningError) as info:
        provisioner.provision(SPEC)
    message = info.value.message
    assert f"silo database 127.0.0.1:{closed_port} is not reachable from this worker" in message
    assert "app_security_group_id" in message and "VPC" in message
    assert "pw" not in message  # no credential in the error
    # the database phase was retried on its own (bounded); `pulumi up` ran once
    assert [e["attempt"] for e in logs if e["event"] == "provisioning.retry"] == [1, 2]
    assert seam.stacks["silo-acme"].calls == ["up"]
    assert role_state(rds_silo.admin, rds_silo.roles.app) is None


def test_missing_or_foreign_secrets_fail_provisioning_before_any_role_is_made(
    aws_env: Path, fake_pulumi_on_path: Path, monkeypatch: pytest.MonkeyPatch, rds_silo: RdsSilo
) -> None:
    secrets = _rds_secrets(rds_silo)
    del secrets[MASTER_ARN]
    provisioner, _ = _rds_provisioner(monkeypatch, rds_silo, _rds_outputs(rds_silo), secrets)
    with pytest.raises(ProvisioningError, match=f"cannot read the credentials.*{MASTER_ARN}.*does not exist"):
        provisioner.provision(SPEC)
    # an application "secret" that is really the master's
    foreign = _rds_secrets(rds_silo, **{APP_ARN: _secret(rds_silo.roles.owner, "master-pw", rds_silo.database)})
    provisioner, _ = _rds_provisioner(monkeypatch, rds_silo, _rds_outputs(rds_silo), foreign)
    with pytest.raises(ProvisioningError, match="is for 'rds_master_"):
        provisioner.provision(SPEC)
    assert role_state(rds_silo.admin, rds_silo.roles.app) is None
    assert role_state(rds_silo.admin, rds_silo.roles.replication) is None
