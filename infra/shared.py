"""The shared stack: network, the pool and catalog databases, KMS, secrets.

``pulumi up`` in ``infra/`` runs :func:`shared_program` (see ``__main__.py``).
Its outputs are what the control plane reads: the pool and catalog endpoints
and secrets (for ``TENANTCTL_POOL_URL`` / ``TENANTCTL_CATALOG_URL``), and the
network and security groups that every silo stack references through a
``StackReference`` (``TENANTCTL_PULUMI_SHARED_STACK``).

* Network: an existing VPC and private subnets (``vpcId`` + ``subnetIds``) or,
  when ``vpcId`` is empty, a new VPC with one private subnet per AZ (no
  internet gateway: the databases never need one).
* Security groups: ``app`` (attach it to the data plane, the control plane
  and its workers), ``pool`` and ``catalog`` (PostgreSQL from ``app`` only;
  every silo stack adds an ingress rule for its own subscriber).
* The pool: RDS PostgreSQL with a parameter group setting
  ``rds.logical_replication = 1`` (the source of promotions).
* The catalog: a smaller RDS PostgreSQL (catalog tables and DBOS state).
* KMS key for both instances and their secrets; master passwords generated
  and stored in Secrets Manager.
* The pool's application role (``appUsername``) and replication role
  (``replicationUsername``): a generated password each, in its own secret
  (``tenantctl/<env>/pool/app-*`` and ``replication-*``) under the same key,
  tagged ``tenantctl:credential`` like the master secrets, so IAM can give the
  data plane ``app`` only. The stack creates no role: the operator runs
  ``control_plane.bootstrap.ensure_roles_rds`` with the pool's master secret
  and these passwords. The replication secret is what a silo's subscription
  to the pool authenticates with: an RDS subscription owned by a
  non-superuser must carry a password in its CONNECTION, so without it no
  promotion can start (``TENANTCTL_POOL_REPLICATION_SECRET``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pulumi
import pulumi_aws as aws

from infra.common import (
    PG_PORT,
    PROJECT_TAG,
    credentials_secret,
    db_ingress,
    engine_family,
    generated_password,
    kms_key,
    postgres_parameters,
    role_secret_resource,
)

POOL_DATABASE = "tenantctl_pool"
CATALOG_DATABASE = "tenantctl_catalog"
SHARED_OUTPUTS = (
    "vpc_id",
    "subnet_ids",
    "app_security_group_id",
    "pool_security_group_id",
    "catalog_security_group_id",
    "kms_key_arn",
    "pool_endpoint",
    "pool_port",
    "pool_database",
    "pool_secret_arn",
    "pool_app_secret_arn",
    "pool_replication_secret_arn",
    "catalog_endpoint",
    "catalog_port",
    "catalog_database",
    "catalog_secret_arn",
    "owner_username",
)


@dataclass(frozen=True)
class SharedConfig:
    """Typed view of the stack configuration declared in ``Pulumi.yaml``."""

    environment: str = "prod"
    vpc_id: str = ""
    subnet_ids: Sequence[str] = field(default_factory=tuple)
    vpc_cidr: str = "10.60.0.0/16"
    engine_version: str = "16"
    pool_instance_class: str = "db.r6g.large"
    pool_allocated_storage_gb: int = 100
    pool_max_allocated_storage_gb: int = 1000
    catalog_instance_class: str = "db.t4g.small"
    catalog_allocated_storage_gb: int = 20
    multi_az: bool = True
    backup_retention_days: int = 14
    deletion_protection: bool = True
    owner_username: str = "tenantctl_owner"
    app_username: str = "tenantctl_app"
    replication_username: str = "tenantctl_replicator"

    def __post_init__(self) -> None:
        if bool(self.vpc_id) != bool(self.subnet_ids):
            raise ValueError("set both vpcId and subnetIds (an existing network), or neither (a new VPC)")
        if self.vpc_id and len(self.subnet_ids) < 2:
            raise ValueError("RDS subnet groups need subnets in at least two availability zones")
        if self.backup_retention_days < 1:
            raise ValueError("backupRetentionDays must be at least 1")
        usernames = (self.owner_username, self.app_username, self.replication_username)
        if len(set(usernames)) != len(usernames):
            # One role for two jobs would let the data plane log in as the owner
            # (RLS bypassed) or the replicator (every tenant's rows readable).
            raise ValueError(f"owner, application and replication usernames must differ, got {usernames}")

    @classmethod
    def load(cls) -> SharedConfig:
        """Read the stack's config (inside a running program only); unset keys keep their default.

        Config keys are the camelCase field names (``vpc_id`` -> ``vpcId``), as
        declared, typed and described in ``Pulumi.yaml``.
        """
        cfg = pulumi.Config()
        values: dict[str, Any] = {}
        for item in dataclasses.fields(cls):
            key = config_key(item.name)
            default = getattr(cls(), item.name)
            value: Any
            if isinstance(default, bool):
                value = cfg.get_bool(key)
            elif isinstance(default, int):
                value = cfg.get_int(key)
            elif isinstance(default, str):
                value = cfg.get(key)
            else:  # the only sequence: subnetIds
                raw = cfg.get_object(key)
                value = None if raw is None else tuple(str(v) for v in raw)
            if value is not None:
                values[item.name] = value
        return cls(**values)


def config_key(field_name: str) -> str:
    """``pool_allocated_storage_gb`` -> ``poolAllocatedStorageGb``."""
    head, *rest = field_name.split("_")
    return head + "".join(part.capitalize() for part in rest)


@dataclass(frozen=True)
class Network:
    vpc_id: pulumi.Input[str]
    subnet_ids: pulumi.Input[Sequence[pulumi.Input[str]]]


def _network(config: SharedConfig, tags: dict[str, str]) -> Network:
    if config.vpc_id:
        return Network(vpc_id=config.vpc_id, subnet_ids=list(config.subnet_ids))
    vpc = aws.ec2.Vpc(
        "tenantctl-vpc",
        cidr_block=config.vpc_cidr,
        enable_dns_hostnames=True,
        enable_dns_support=True,
        tags={**tags, "Name": f"tenantctl-{config.environment}"},
    )
    zones = aws.get_availability_zones_output(state="available").names
    subnet_ids: list[pulumi.Output[str]] = []
    for index in range(2):
        subnet = aws.ec2.Subnet(
            f"tenantctl-private-{index}",
            vpc_id=vpc.id,
            # 10.60.0.0/20, 10.60.16.0/20 ... of the /16
            cidr_block=_subnet_cidr(config.vpc_cidr, index),
            availability_zone=zones[index],
            map_public_ip_on_launch=False,
            tags={**tags, "Name": f"tenantctl-{config.environment}-private-{index}"},
        )
        subnet_ids.append(subnet.id)
    return Network(vpc_id=vpc.id, subnet_ids=subnet_ids)


def _subnet_cidr(vpc_cidr: str, index: int) -> str:
    network = ipaddress.ip_network(vpc_cidr)
    return str(list(network.subnets(new_prefix=min(network.prefixlen + 4, 28)))[index])


def _database(
    name: str,
    *,
    config: SharedConfig,
    database: str,
    instance_class: str,
    allocated_storage_gb: int,
    max_allocated_storage_gb: int,
    logical_replication: bool,
    security_group_id: pulumi.Input[str],
    subnet_group_name: pulumi.Input[str],
    key: aws.kms.Key,
    tags: dict[str, str],
) -> tuple[aws.rds.Instance, aws.secretsmanager.Secret]:
    opts = pulumi.ResourceOptions()
    params = aws.rds.ParameterGroup(
        f"{name}-params",
        family=engine_family("postgres", config.engine_version),
        description=f"tenantctl {name}",
        parameters=postgres_parameters(logical_replication=logical_replication),
        tags=tags,
    )
    password = generated_password(f"{name}-master-password", opts=opts)
    identifier = f"tenantctl-{config.environment}-{name}"
    instance = aws.rds.Instance(
        f"{name}-db",
        identifier=identifier,
        engine="postgres",
        engine_version=config.engine_version,
        instance_class=instance_class,
        allocated_storage=allocated_storage_gb,
        max_allocated_storage=max_allocated_storage_gb,
        storage_type="gp3",
        storage_encrypted=True,
        kms_key_id=key.arn,
        db_name=database,
        username=config.owner_username,
        password=password.result,
        port=PG_PORT,
        parameter_group_name=params.name,
        db_subnet_group_name=subnet_group_name,
        vpc_security_group_ids=[security_group_id],
        publicly_accessible=False,
        multi_az=config.multi_az,
        backup_retention_period=config.backup_retention_days,
        copy_tags_to_snapshot=True,
        deletion_protection=config.deletion_protection,
        skip_final_snapshot=False,
        final_snapshot_identifier=f"{identifier}-final",
        iam_database_authentication_enabled=True,
        auto_minor_version_upgrade=True,
        tags={**tags, "Name": identifier},
    )
    secret = _role_secret(
        name,
        "master",
        config=config,
        username=config.owner_username,
        password=password.result,
        instance=instance,
        database=database,
        key=key,
        tags=tags,
    )
    return instance, secret


def _role_secret(
    name: str,
    kind: str,
    *,
    config: SharedConfig,
    username: str,
    password: pulumi.Input[str],
    instance: aws.rds.Instance,
    database: str,
    key: aws.kms.Key,
    tags: dict[str, str],
) -> aws.secretsmanager.Secret:
    return credentials_secret(
        role_secret_resource(name, kind),
        secret_name_prefix=f"tenantctl/{config.environment}/{name}/{kind}-",
        description=f"tenantctl {name}: {kind} credentials ({username})",
        kms_key_arn=key.arn,
        engine="postgres",
        username=username,
        password=password,
        host=instance.address,
        port=instance.port,
        dbname=database,
        # IAM can scope GetSecretValue by this tag: the data plane gets `app`
        # only, the control plane's workers `master` and `replication`.
        tags={**tags, "tenantctl:credential": kind},
        opts=pulumi.ResourceOptions(),
    )


def _pool_role_secrets(
    pool: aws.rds.Instance, *, config: SharedConfig, key: aws.kms.Key, tags: dict[str, str]
) -> dict[str, aws.secretsmanager.Secret]:
    """The pool's application and replication credentials (the roles are made by the operator)."""
    usernames = {"app": config.app_username, "replication": config.replication_username}
    return {
        kind: _role_secret(
            "pool",
            kind,
            config=config,
            username=username,
            password=generated_password(f"pool-{kind}-password", opts=pulumi.ResourceOptions()).result,
            instance=pool,
            database=POOL_DATABASE,
            key=key,
            tags=tags,
        )
        for kind, username in usernames.items()
    }


def shared_program(config: SharedConfig | None = None) -> None:
    """Declare the shared stack's resources and outputs (call inside a Pulumi program)."""
    config = config or SharedConfig.load()
    tags = {**PROJECT_TAG, "environment": config.environment}
    network = _network(config, tags)
    key = kms_key(
        "tenantctl-shared-kms",
        description=f"tenantctl {config.environment}: pool and catalog storage and secrets",
        alias=f"tenantctl/{config.environment}/shared",
        tags=tags,
        opts=pulumi.ResourceOptions(),
    )
    app_sg = aws.ec2.SecurityGroup(
        "app-sg",
        vpc_id=network.vpc_id,
        description="tenantctl application, control plane and workers (clients of the databases)",
        tags=tags,
    )
    aws.vpc.SecurityGroupEgressRule(
        "app-sg-out",
        security_group_id=app_sg.id,
        ip_protocol="-1",
        cidr_ipv4="0.0.0.0/0",
        description="application egress",
    )
    groups: dict[str, aws.ec2.SecurityGroup] = {}
    for name in ("pool", "catalog"):
        groups[name] = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=network.vpc_id,
            description=f"tenantctl {name}: PostgreSQL from the application (and, for the pool, silos)",
            tags=tags,
        )
        db_ingress(
            f"{name}-in-app",
            security_group_id=groups[name].id,
            source_security_group_id=app_sg.id,
            description="application and control plane",
            opts=pulumi.ResourceOptions(),
        )
    subnet_group = aws.rds.SubnetGroup(
        "tenantctl-db-subnets",
        description="tenantctl pool and catalog",
        subnet_ids=network.subnet_ids,
        tags=tags,
    )
    pool, pool_secret = _database(
        "pool",
        config=config,
        database=POOL_DATABASE,
        instance_class=config.pool_instance_class,
        allocated_storage_gb=config.pool_allocated_storage_gb,
        max_allocated_storage_gb=config.pool_max_allocated_storage_gb,
        logical_replication=True,
        security_group_id=groups["pool"].id,
        subnet_group_name=subnet_group.name,
        key=key,
        tags=tags,
    )
    catalog, catalog_secret = _database(
        "catalog",
        config=config,
        database=CATALOG_DATABASE,
        instance_class=config.catalog_instance_class,
        allocated_storage_gb=config.catalog_allocated_storage_gb,
        max_allocated_storage_gb=config.catalog_allocated_storage_gb * 5,
        logical_replication=False,
        security_group_id=groups["catalog"].id,
        subnet_group_name=subnet_group.name,
        key=key,
        tags=tags,
    )
    pool_roles = _pool_role_secrets(pool, config=config, key=key, tags=tags)
    pulumi.export("vpc_id", network.vpc_id)
    pulumi.export("subnet_ids", network.subnet_ids)
    pulumi.export("app_security_group_id", app_sg.id)
    pulumi.export("pool_security_group_id", groups["pool"].id)
    pulumi.export("catalog_security_group_id", groups["catalog"].id)
    pulumi.export("kms_key_arn", key.arn)
    pulumi.export("pool_endpoint", pool.address)
    pulumi.export("pool_port", pool.port)
    pulumi.export("pool_database", POOL_DATABASE)
    pulumi.export("pool_secret_arn", pool_secret.arn)
    pulumi.export("pool_app_secret_arn", pool_roles["app"].arn)
    pulumi.export("pool_replication_secret_arn", pool_roles["replication"].arn)
    pulumi.export("catalog_endpoint", catalog.address)
    pulumi.export("catalog_port", catalog.port)
    pulumi.export("catalog_database", CATALOG_DATABASE)
    pulumi.export("catalog_secret_arn", catalog_secret.arn)
    pulumi.export("owner_username", config.owner_username)
