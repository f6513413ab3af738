"""The Pulumi programs in ``infra/``, run on Pulumi's mocks (no CLI, no AWS).

Inputs are asserted as the engine would receive them (camelCase property
names). Mock ids are deterministic (``sg-<name>``, ``key-<name>``) so wiring
between resources can be asserted exactly.
"""

from __future__ import annotations

import dataclasses
import json
import runpy
from pathlib import Path
from typing import Any

import pulumi
import pytest
import yaml
from pulumi.runtime import config as pulumi_config

import infra
from infra.common import PASSWORD_SPECIALS
from infra.shared import SHARED_OUTPUTS, SharedConfig, config_key, shared_program
from infra.silo import SILO_OUTPUTS, SiloDatabase, SiloDatabaseArgs, SiloStackConfig, silo_program
from tests.provisioning.pulumi_mocks import ACCOUNT, REGION, RecordingMocks, run_program

SECRET_SIG = "4dabf18193072939515e22adb298388d"  # how Pulumi marks a secret value on the wire

SG = "aws:ec2/securityGroup:SecurityGroup"
INGRESS = "aws:vpc/securityGroupIngressRule:SecurityGroupIngressRule"
EGRESS = "aws:vpc/securityGroupEgressRule:SecurityGroupEgressRule"
INSTANCE = "aws:rds/instance:Instance"
KEY = "aws:kms/key:Key"
SECRET = "aws:secretsmanager/secret:Secret"
SECRET_VERSION = "aws:secretsmanager/secretVersion:SecretVersion"
PARAMS = "aws:rds/parameterGroup:ParameterGroup"


def key_arn(resource_name: str) -> str:
    return f"arn:aws:kms:{REGION}:{ACCOUNT}:key/key-{resource_name}"


def silo_args(slug: str = "acme", **overrides: Any) -> SiloDatabaseArgs:
    values: dict[str, Any] = {
        "tenant_id": f"tenant-{slug}",
        "slug": slug,
        "tier": "enterprise",
        "identifier": f"silo-{slug}",
        "database_name": f"silo_{slug}",
        "vpc_id": "vpc-123",
        "subnet_ids": ["subnet-a", "subnet-b"],
        "app_security_group_ids": ["sg-app"],
        "pool_security_group_id": "sg-pool",
    } | overrides
    return SiloDatabaseArgs(**values)


def unsecret(value: Any) -> Any:
    assert isinstance(value, dict) and value.get(SECRET_SIG), f"expected a secret, got {value!r}"
    return value["value"]


@pytest.fixture(scope="module")
def silo_run() -> tuple[RecordingMocks, dict[str, Any]]:
    """Two tenants' silos in one program: per-tenant resources must not be shared."""
    mocks = RecordingMocks()

    def program() -> dict[str, Any]:
        acme = SiloDatabase("silo-acme", silo_args("acme"))
        SiloDatabase("silo-globex", silo_args("globex", tier="premium"))
        return {
            "endpoint": acme.endpoint,
            "port": acme.port,
            "master_secret_arn": acme.master_secret_arn,
            "app_secret_arn": acme.app_secret_arn,
            "replication_secret_arn": acme.replication_secret_arn,
        }

    outputs, _ = run_program(program, mocks)
    return mocks, outputs


def of_silo(mocks: RecordingMocks, typ: str, slug: str) -> list[Any]:
    return [r for r in mocks.of_type(typ) if r.name.startswith(f"silo-{slug}-")]


def test_storage_is_encrypted_with_a_per_tenant_kms_key(
    silo_run: tuple[RecordingMocks, dict[str, Any]],
) -> None:
    mocks, _ = silo_run
    keys = {r.name: r for r in mocks.of_type(KEY)}
    assert set(keys) == {"silo-acme-kms", "silo-globex-kms"}
    for slug in ("acme", "globex"):
        key = keys[f"silo-{slug}-kms"]
        assert key.inputs["enableKeyRotation"] is True
        assert key.inputs["tags"]["tenant_id"] == f"tenant-{slug}"
        (db,) = of_silo(mocks, INSTANCE, slug)
        assert db.inputs["storageEncrypted"] is True
        assert db.inputs["kmsKeyId"] == key_arn(f"silo-{slug}-kms")
        secrets = of_silo(mocks, SECRET, slug)
        assert len(secrets) == 3  # master, application, replication
        assert {secret.inputs["kmsKeyId"] for secret in secrets} == {key_arn(f"silo-{slug}-kms")}
    aliases = sorted(r.inputs["name"] for r in mocks.of_type("aws:kms/alias:Alias"))
    assert aliases == ["alias/tenantctl/silo-acme", "alias/tenantctl/silo-globex"]


def test_logical_replication_parameter_group_is_attached(
    silo_run: tuple[RecordingMocks, dict[str, Any]],
) -> None:
    mocks, _ = silo_run
    (params,) = of_silo(mocks, PARAMS, "acme")
    assert params.inputs["family"] == "postgres16"
    values = {p["name"]: p for p in params.inputs["parameters"]}
    assert values["rds.logical_replication"]["value"] == "1"
    assert values["rds.logical_replication"]["applyMethod"] == "pending-reboot"
    assert values["rds.force_ssl"]["value"] == "1"
    (db,) = of_silo(mocks, INSTANCE, "acme")
    assert db.inputs["parameterGroupName"] == params.state["name"]


def test_instance_is_private_protected_backed_up_and_snapshotted(
    silo_run: tuple[RecordingMocks, dict[str, Any]],
) -> None:
    mocks, _ = silo_run
    (db,) = of_silo(mocks, INSTANCE, "acme")
    inputs = db.inputs
    assert inputs["publiclyAccessible"] is False
    assert inputs["deletionProtection"] is True
    assert inputs["skipFinalSnapshot"] is False
    assert inputs["finalSnapshotIdentifier"] == "silo-acme-final-0badf00d"
    assert inputs["backupRetentionPeriod"] >= 1
    assert inputs["deleteAutomatedBackups"] is False
    assert inputs["identifier"] == "silo-acme" and inputs["dbName"] == "silo_acme"
    assert inputs["username"] == "tenantctl_owner"
    assert inputs["dbSubnetGroupName"] == "silo-acme"
    assert inputs["vpcSecurityGroupIds"] == ["sg-silo-acme-sg"]


def test_resources_are_tagged_with_tenant_and_tier(silo_run: tuple[RecordingMocks, dict[str, Any]]) -> None:
    mocks, _ = silo_run
    for slug, tier in (("acme", "enterprise"), ("globex", "premium")):
        for typ in (INSTANCE, KEY, SECRET, SG, PARAMS, "aws:rds/subnetGroup:SubnetGroup"):
            resources = of_silo(mocks, typ, slug)
            assert resources, typ
            for resource in resources:
                tags = resource.inputs["tags"]
                assert tags["tenant_id"] == f"tenant-{slug}" and tags["tier"] == tier, (typ, tags)


def test_security_group_admits_only_the_application_and_the_pool(
    silo_run: tuple[RecordingMocks, dict[str, Any]],
) -> None:
    mocks, _ = silo_run
    (group,) = of_silo(mocks, SG, "acme")
    assert "ingress" not in group.inputs and "egress" not in group.inputs  # rules are separate resources
    assert group.inputs["vpcId"] == "vpc-123"
    silo_sg = "sg-silo-acme-sg"
    ingress = [r.inputs for r in of_silo(mocks, INGRESS, "acme") if r.inputs["securityGroupId"] == silo_sg]
    assert sorted(rule["referencedSecurityGroupId"] for rule in ingress) == ["sg-app", "sg-pool"]
    for rule in [*ingress, *(r.inputs for r in of_silo(mocks, EGRESS, "acme"))]:
        assert (rule["ipProtocol"], rule["fromPort"], rule["toPort"]) == ("tcp", 5432, 5432)
        assert "cidrIpv4" not in rule and "cidrIpv6" not in rule
    egress = {r.inputs["securityGroupId"]: r.inputs for r in of_silo(mocks, EGRESS, "acme")}
    # promotion: the silo subscribes to the pool; demotion: the pool subscribes to the silo
    assert set(egress) == {silo_sg, "sg-pool"}
    assert egress[silo_sg]["referencedSecurityGroupId"] == "sg-pool"
    assert egress["sg-pool"]["referencedSecurityGroupId"] == silo_sg
    # the pool's side of both directions is made of rules of this silo's stack only
    for rule_type in (INGRESS, EGRESS):
        pool_rules = [r.inputs for r in mocks.of_type(rule_type) if r.inputs["securityGroupId"] == "sg-pool"]
        assert sorted(rule["referencedSecurityGroupId"] for rule in pool_rules) == [
            "sg-silo-acme-sg",
            "sg-silo-globex-sg",
        ], rule_type


def test_three_passwords_are_generated_and_each_stored_only_in_its_own_secret(
    silo_run: tuple[RecordingMocks, dict[str, Any]],
) -> None:
    mocks, outputs = silo_run
    passwords = {r.name: r.inputs for r in of_silo(mocks, "random:index/randomPassword:RandomPassword", "acme")}
    assert set(passwords) == {
        "silo-acme-master-password",
        "silo-acme-app-password",
        "silo-acme-replication-password",
    }
    for inputs in passwords.values():
        assert inputs["length"] >= 32
        assert not set('/@" ') & set(inputs["overrideSpecial"])
        assert inputs["overrideSpecial"] == PASSWORD_SPECIALS
    (db,) = of_silo(mocks, INSTANCE, "acme")
    assert unsecret(db.inputs["password"]) == "mock-silo-acme-master-password"

    secrets = {r.name: r for r in of_silo(mocks, SECRET, "acme")}
    versions = {r.inputs["secretId"]: r for r in of_silo(mocks, SECRET_VERSION, "acme")}
    expected = {
        # resource name -> (secret name prefix, credential tag, username, password)
        "silo-acme-secret": ("master", "tenantctl_owner", "mock-silo-acme-master-password"),
        "silo-acme-app-secret": ("app", "tenantctl_app", "mock-silo-acme-app-password"),
        "silo-acme-replication-secret": ("replication", "tenantctl_replicator", "mock-silo-acme-replication-password"),
    }
    assert set(secrets) == set(expected)
    for resource, (kind, username, password) in expected.items():
        secret = secrets[resource]
        assert secret.inputs["namePrefix"] == f"tenantctl/silos/silo-acme/{kind}-"
        assert secret.inputs["tags"]["tenantctl:credential"] == kind
        payload = json.loads(unsecret(versions[f"{resource}-id"].inputs["secretString"]))
        assert payload == {
            "engine": "postgres",
            "host": f"silo-acme.c0ffee.{REGION}.rds.amazonaws.com",
            "port": 5432,
            "username": username,
            "password": password,
            "dbname": "silo_acme",
        }
    assert "mock-" not in json.dumps(outputs)


def test_component_outputs_are_wired(silo_run: tuple[RecordingMocks, dict[str, Any]]) -> None:
    _, outputs = silo_run
    assert outputs == {
        "endpoint": f"silo-acme.c0ffee.{REGION}.rds.amazonaws.com",
        "port": 5432,
        "master_secret_arn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:silo-acme-secret-AbCdEf",
        "app_secret_arn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:silo-acme-app-secret-AbCdEf",
        "replication_secret_arn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:silo-acme-replication-secret-AbCdEf",
    }


def test_aurora_variant_keeps_the_same_guarantees() -> None:
    mocks = RecordingMocks()

    def program() -> pulumi.Output[str]:
        silo = SiloDatabase("silo-acme", silo_args(engine="aurora-postgresql", engine_version="16.6"))
        return silo.endpoint

    endpoint, _ = run_program(program, mocks)
    assert endpoint == f"silo-acme.cluster-c0ffee.{REGION}.rds.amazonaws.com"
    assert mocks.of_type(INSTANCE) == []
    cluster = mocks.one("aws:rds/cluster:Cluster").inputs
    assert cluster["storageEncrypted"] is True and cluster["kmsKeyId"] == key_arn("silo-acme-kms")
    assert cluster["deletionProtection"] is True and cluster["skipFinalSnapshot"] is False
    assert cluster["backupRetentionPeriod"] >= 1 and cluster["tags"]["tenant_id"] == "tenant-acme"
    params = mocks.one("aws:rds/clusterParameterGroup:ClusterParameterGroup").inputs
    assert params["family"] == "aurora-postgresql16"
    assert {p["name"]: p["value"] for p in params["parameters"]}["rds.logical_replication"] == "1"
    assert cluster["dbClusterParameterGroupName"] == "silo-acme-params"
    writer = mocks.one("aws:rds/clusterInstance:ClusterInstance").inputs
    assert writer["publiclyAccessible"] is False and writer["clusterIdentifier"] == "silo-acme-db-id"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backup_retention_days": 0}, "backup_retention_days"),
        ({"app_security_group_ids": []}, "application security group"),
        ({"engine": "mysql"}, "engine must be one of"),
        ({"engine_version": "latest"}, "major version"),
        ({"allocated_storage_gb": 500}, "max_allocated_storage_gb"),
        ({"app_username": "tenantctl_owner"}, "usernames must differ"),
        ({"replication_username": "tenantctl_app"}, "usernames must differ"),
    ],
)
def test_unsafe_silo_args_are_rejected(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        silo_args(**overrides)


SHARED_STACK_OUTPUTS = {
    "vpc_id": "vpc-shared",
    "subnet_ids": ["subnet-1", "subnet-2"],
    "app_security_group_id": "sg-shared-app",
    "pool_security_group_id": "sg-shared-pool",
}


def test_silo_stack_program_reads_the_shared_stack_and_exports_the_location() -> None:
    mocks = RecordingMocks(shared_outputs=SHARED_STACK_OUTPUTS)
    config = SiloStackConfig(
        tenant_id="tenant-acme",
        slug="acme",
        tier="enterprise",
        identifier="silo-acme",
        database_name="silo_acme",
        shared_stack="org/tenantctl-infra/prod",
    )
    _, exports = run_program(silo_program(config), mocks)
    reference = mocks.one("pulumi:pulumi:StackReference")
    assert reference.inputs["name"] == "org/tenantctl-infra/prod"
    assert set(exports) == set(SILO_OUTPUTS)
    assert exports["endpoint"] == f"silo-acme.c0ffee.{REGION}.rds.amazonaws.com"
    assert exports["master_secret_arn"].endswith(":secret:silo-acme-secret-AbCdEf")
    assert exports["app_secret_arn"].endswith(":secret:silo-acme-app-secret-AbCdEf")
    assert exports["replication_secret_arn"].endswith(":secret:silo-acme-replication-secret-AbCdEf")
    assert (exports["app_username"], exports["replication_username"]) == ("tenantctl_app", "tenantctl_replicator")
    assert exports["kms_key_arn"] == key_arn("silo-acme-kms")
    assert (exports["tenant_id"], exports["database"], exports["username"]) == (
        "tenant-acme",
        "silo_acme",
        "tenantctl_owner",
    )
    # network and security groups come from the shared stack's outputs
    assert mocks.one(SG).inputs["vpcId"] == "vpc-shared"
    assert mocks.one("aws:rds/subnetGroup:SubnetGroup").inputs["subnetIds"] == ["subnet-1", "subnet-2"]
    sources = sorted(r.inputs["referencedSecurityGroupId"] for r in mocks.of_type(INGRESS))
    assert sources == ["sg-shared-app", "sg-shared-pool", "sg-silo-acme-sg"]
    egress = sorted((r.inputs["securityGroupId"], r.inputs["referencedSecurityGroupId"]) for r in mocks.of_type(EGRESS))
    assert egress == [("sg-shared-pool", "sg-silo-acme-sg"), ("sg-silo-acme-sg", "sg-shared-pool")]


def test_shared_stack_with_a_new_vpc() -> None:
    mocks = RecordingMocks()
    _, exports = run_program(lambda: shared_program(SharedConfig(environment="staging")), mocks)
    assert set(exports) == set(SHARED_OUTPUTS)
    vpc = mocks.one("aws:ec2/vpc:Vpc")
    subnets = mocks.of_type("aws:ec2/subnet:Subnet")
    assert [s.inputs["cidrBlock"] for s in subnets] == ["10.60.0.0/20", "10.60.16.0/20"]
    assert len({s.inputs["availabilityZone"] for s in subnets}) == 2
    assert all(s.inputs["vpcId"] == f"{vpc.name}-id" and not s.inputs["mapPublicIpOnLaunch"] for s in subnets)
    assert exports["vpc_id"] == f"{vpc.name}-id"

    instances = {r.inputs["identifier"]: r.inputs for r in mocks.of_type(INSTANCE)}
    assert set(instances) == {"tenantctl-staging-pool", "tenantctl-staging-catalog"}
    for inputs in instances.values():
        assert inputs["storageEncrypted"] is True
        assert inputs["kmsKeyId"] == key_arn("tenantctl-shared-kms")
        assert inputs["publiclyAccessible"] is False and inputs["deletionProtection"] is True
        assert inputs["skipFinalSnapshot"] is False and inputs["backupRetentionPeriod"] == 14
    params = {r.name: {p["name"]: p["value"] for p in r.inputs["parameters"]} for r in mocks.of_type(PARAMS)}
    assert params["pool-params"]["rds.logical_replication"] == "1"
    assert "rds.logical_replication" not in params["catalog-params"]
    assert instances["tenantctl-staging-pool"]["parameterGroupName"] == "pool-params"
    assert instances["tenantctl-staging-pool"]["dbName"] == exports["pool_database"] == "tenantctl_pool"

    # pool and catalog admit the application only; silos add their own rules later
    rules = {r.inputs["securityGroupId"]: r.inputs for r in mocks.of_type(INGRESS)}
    assert set(rules) == {"sg-pool-sg", "sg-catalog-sg"}
    assert {rule["referencedSecurityGroupId"] for rule in rules.values()} == {"sg-app-sg"}
    assert exports["pool_security_group_id"] == "sg-pool-sg"
    assert exports["app_security_group_id"] == "sg-app-sg"
    assert exports["pool_endpoint"] == f"tenantctl-staging-pool.c0ffee.{REGION}.rds.amazonaws.com"
    assert exports["pool_secret_arn"].endswith(":secret:pool-secret-AbCdEf")
    assert exports["catalog_secret_arn"].endswith(":secret:catalog-secret-AbCdEf")
    assert "mock-" not in json.dumps(exports)


@pytest.fixture(scope="module")
def shared_run() -> tuple[RecordingMocks, dict[str, Any]]:
    mocks = RecordingMocks()
    _, exports = run_program(lambda: shared_program(SharedConfig(environment="staging")), mocks)
    return mocks, exports


def secret_arn(resource_name: str) -> str:
    return f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{resource_name}-AbCdEf"


def test_shared_stack_encrypts_every_secret_with_the_shared_key_and_tags_its_credential(
    shared_run: tuple[RecordingMocks, dict[str, Any]],
) -> None:
    mocks, _ = shared_run
    secrets = {r.name: r.inputs for r in mocks.of_type(SECRET)}
    expected = {
        # resource name -> (secret name prefix, credential tag)
        "pool-secret": ("tenantctl/staging/pool/master-", "master"),
        "pool-app-secret": ("tenantctl/staging/pool/app-", "app"),
        "pool-replication-secret": ("tenantctl/staging/pool/replication-", "replication"),
        "catalog-secret": ("tenantctl/staging/catalog/master-", "master"),
    }
    assert set(secrets) == set(expected)
    for resource, (prefix, kind) in expected.items():
        inputs = secrets[resource]
        assert inputs["kmsKeyId"] == key_arn("tenantctl-shared-kms"), resource
        assert inputs["namePrefix"] == prefix
        assert inputs["tags"] == {"managed-by": "tenantctl", "environment": "staging", "tenantctl:credential": kind}
        assert inputs["recoveryWindowInDays"] == 7


def test_shared_stack_generates_the_pool_role_passwords_and_stores_each_only_in_its_own_secret(
    shared_run: tuple[RecordingMocks, dict[str, Any]],
) -> None:
    mocks, exports = shared_run
    passwords = {r.name: r.inputs for r in mocks.of_type("random:index/randomPassword:RandomPassword")}
    assert set(passwords) == {
        "pool-master-password",
        "catalog-master-password",
        "pool-app-password",
        "pool-replication-password",
    }
    for inputs in passwords.values():
        assert inputs["length"] >= 32 and inputs["overrideSpecial"] == PASSWORD_SPECIALS
    versions = {r.inputs["secretId"]: r.inputs for r in mocks.of_type(SECRET_VERSION)}
    assert len(versions) == 4
    pool_host = f"tenantctl-staging-pool.c0ffee.{REGION}.rds.amazonaws.com"
    expected = {
        # secret resource -> (username, password)
        "pool-secret": ("tenantctl_owner", "mock-pool-master-password"),
        "pool-app-secret": ("tenantctl_app", "mock-pool-app-password"),
        "pool-replication-secret": ("tenantctl_replicator", "mock-pool-replication-password"),
    }
    for resource, (username, password) in expected.items():
        payload = json.loads(unsecret(versions[f"{resource}-id"]["secretString"]))
        assert payload == {
            "engine": "postgres",
            "host": pool_host,
            "port": 5432,
            "username": username,
            "password": password,
            "dbname": "tenantctl_pool",
        }
    pool = next(r.inputs for r in mocks.of_type(INSTANCE) if r.inputs["identifier"] == "tenantctl-staging-pool")
    assert pool["username"] == "tenantctl_owner"
    assert unsecret(pool["password"]) == "mock-pool-master-password"
    # no password, nor anything derived from one, leaves the stack in a plain output
    assert "mock-" not in json.dumps(exports)
    assert SECRET_SIG not in json.dumps(exports)


def test_shared_stack_exports_the_pool_role_secrets(shared_run: tuple[RecordingMocks, dict[str, Any]]) -> None:
    _, exports = shared_run
    assert set(exports) == set(SHARED_OUTPUTS)
    assert {"pool_app_secret_arn", "pool_replication_secret_arn"} <= set(SHARED_OUTPUTS)
    assert exports["pool_secret_arn"] == secret_arn("pool-secret")
    assert exports["pool_app_secret_arn"] == secret_arn("pool-app-secret")
    assert exports["pool_replication_secret_arn"] == secret_arn("pool-replication-secret")
    assert exports["catalog_secret_arn"] == secret_arn("catalog-secret")


@pytest.mark.parametrize(
    "overrides",
    [
        {"app_username": "tenantctl_owner"},
        {"replication_username": "tenantctl_owner"},
        {"replication_username": "tenantctl_app"},
        {"owner_username": "tenantctl_replicator"},
    ],
)
def test_shared_config_rejects_a_role_username_shared_by_two_roles(overrides: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="usernames must differ"):
        SharedConfig(**overrides)


def test_shared_stack_reads_typed_config_and_reuses_an_existing_vpc() -> None:
    mocks = RecordingMocks()
    pulumi_config.set_all_config(
        {
            "tenantctl-test:vpcId": "vpc-existing",
            "tenantctl-test:subnetIds": json.dumps(["subnet-x", "subnet-y"]),
            "tenantctl-test:poolInstanceClass": "db.r7g.xlarge",
            "tenantctl-test:multiAz": "false",
            "tenantctl-test:replicationUsername": "acme_replicator",
        }
    )
    try:
        _, exports = run_program(lambda: shared_program(), mocks)
    finally:
        pulumi_config.set_all_config({})
    assert mocks.of_type("aws:ec2/vpc:Vpc") == [] and mocks.of_type("aws:ec2/subnet:Subnet") == []
    assert exports["vpc_id"] == "vpc-existing" and exports["subnet_ids"] == ["subnet-x", "subnet-y"]
    pool = next(r.inputs for r in mocks.of_type(INSTANCE) if r.inputs["identifier"].endswith("-pool"))
    assert pool["instanceClass"] == "db.r7g.xlarge" and pool["multiAz"] is False
    replication = next(r.inputs for r in mocks.of_type(SECRET_VERSION) if r.name == "pool-replication-secret-value")
    assert json.loads(unsecret(replication["secretString"]))["username"] == "acme_replicator"


def test_shared_config_rejects_half_a_network() -> None:
    with pytest.raises(ValueError, match="vpcId and subnetIds"):
        SharedConfig(vpc_id="vpc-1")
    with pytest.raises(ValueError, match="two availability zones"):
        SharedConfig(vpc_id="vpc-1", subnet_ids=("subnet-1",))


def test_pulumi_yaml_declares_every_setting_typed_described_and_with_the_code_defaults() -> None:
    project = yaml.safe_load((Path(infra.__file__).parent / "Pulumi.yaml").read_text())
    assert project["name"] == "tenantctl-infra"
    assert project["runtime"]["name"] == "python"
    assert project["runtime"]["options"]["virtualenv"] == "../.venv"
    declared: dict[str, Any] = project["config"]
    defaults = SharedConfig()
    expected_types = {bool: "boolean", int: "integer", str: "string", tuple: "array"}
    assert set(declared) == {config_key(f.name) for f in dataclasses.fields(SharedConfig)}
    for item in dataclasses.fields(SharedConfig):
        entry = declared[config_key(item.name)]
        default = getattr(defaults, item.name)
        assert entry["description"].strip(), item.name
        assert entry["type"] == expected_types[type(default)], item.name
        assert entry["default"] == (list(default) if isinstance(default, tuple) else default), item.name


def test_the_project_entry_point_declares_the_shared_stack() -> None:
    """``infra/__main__.py`` as Pulumi runs it (defaults: a new VPC)."""
    mocks = RecordingMocks()
    entry = Path(infra.__file__).parent / "__main__.py"

    def program() -> None:
        runpy.run_path(str(entry), run_name="__main__")  # its globals are not a program result

    _, exports = run_program(program, mocks)
    assert set(exports) == set(SHARED_OUTPUTS)
    assert len(mocks.of_type(INSTANCE)) == 2 and len(mocks.of_type("aws:ec2/vpc:Vpc")) == 1
