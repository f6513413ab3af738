"""``SiloDatabase``: one tenant's dedicated, encrypted PostgreSQL on AWS.

Per silo (see README "Deploying on AWS" for what this costs):

* a KMS key of its own (storage, snapshots and the three secrets are
  encrypted with it, so a tenant's data can be crypto-shredded on its own);
* an RDS PostgreSQL instance -- or an Aurora PostgreSQL cluster with one
  writer, by ``engine`` -- not publicly accessible, with automated backups,
  deletion protection and a final snapshot on delete;
* a parameter group with ``rds.logical_replication = 1`` (moves between pool
  and silo stream the tenant's rows by logical replication);
* a subnet group and a security group admitting PostgreSQL only from the
  application's security groups and from the pool (demotion: the pool
  subscribes to the silo); its only egress goes to the pool (promotion: the
  silo subscribes to the pool). The matching rules on the pool's side -- an
  ingress admitting this silo and an egress reaching it -- belong to this
  stack and are removed with it. The egress is needed because the provider
  deletes AWS's default allow-all egress rule of every security group it
  creates, so the pool's group starts with none: without it the pool's
  subscription worker cannot open its connection to the silo and demotions
  never start copying;
* three generated passwords (pulumi-random) -- the master (owner) role, the
  application role and the replication role -- each in its own Secrets
  Manager secret encrypted with the tenant's key; only the secrets' ARNs
  leave the stack. The roles themselves are created inside the database by
  the provisioner (``control_plane.bootstrap.ensure_roles_rds``), with these
  passwords. The location's ``secret_ref`` is the *application* secret: the
  data plane never needs, and should never be allowed to read, the master.

:func:`silo_program` is the inline program the Pulumi provisioner runs in
the stack ``silo-<slug>``; it reads the network and the pool's security
group from the shared stack through a ``StackReference``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import pulumi
import pulumi_aws as aws
import pulumi_random as random

from infra.common import (
    PG_PORT,
    PROJECT_TAG,
    credentials_secret,
    db_egress,
    db_ingress,
    engine_family,
    generated_password,
    kms_key,
    postgres_parameters,
    role_secret_resource,
)

Engine = Literal["postgres", "aurora-postgresql"]
ENGINES: tuple[Engine, ...] = ("postgres", "aurora-postgresql")
COMPONENT_TYPE = "tenantctl:infra:SiloDatabase"


@dataclass(frozen=True)
class SiloDatabaseArgs:
    """Inputs of :class:`SiloDatabase`.

    ``identifier`` names the RDS instance/cluster (``silo-<slug>``, RDS-safe:
    see ``control_plane.provisioning.naming``); ``database_name`` is the
    database created inside it (``silo_<slug>``), owned by ``master_username``
    -- the project's owner role, so the location's owner DSN works as is.
    """

    tenant_id: str
    slug: str
    tier: str
    identifier: str
    database_name: str
    vpc_id: pulumi.Input[str]
    subnet_ids: pulumi.Input[Sequence[pulumi.Input[str]]]
    app_security_group_ids: Sequence[pulumi.Input[str]]
    pool_security_group_id: pulumi.Input[str]
    engine: Engine = "postgres"
    engine_version: str = "16"
    instance_class: str = "db.t4g.medium"
    allocated_storage_gb: int = 50
    max_allocated_storage_gb: int = 200
    backup_retention_days: int = 7
    multi_az: bool = False
    deletion_protection: bool = True
    master_username: str = "tenantctl_owner"
    app_username: str = "tenantctl_app"
    replication_username: str = "tenantctl_replicator"
    extra_tags: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {self.engine!r}")
        if self.backup_retention_days < 1:
            # 0 would disable automated backups (and point-in-time recovery).
            raise ValueError("backup_retention_days must be at least 1")
        if self.max_allocated_storage_gb < self.allocated_storage_gb:
            raise ValueError("max_allocated_storage_gb must be >= allocated_storage_gb")
        if not self.app_security_group_ids:
            raise ValueError("at least one application security group must be admitted")
        engine_family(self.engine, self.engine_version)  # validates the version's shape
        usernames = (self.master_username, self.app_username, self.replication_username)
        if len(set(usernames)) != len(usernames):
            # One role for two jobs would let the data plane log in as the owner
            # (RLS bypassed) or the replicator (every tenant's rows readable).
            raise ValueError(f"master, application and replication usernames must differ, got {usernames}")

    @property
    def tags(self) -> dict[str, str]:
        return {
            **PROJECT_TAG,
            **self.extra_tags,
            "tenant_id": self.tenant_id,
            "tier": self.tier,
            "tenantctl:silo": self.identifier,
        }


class SiloDatabase(pulumi.ComponentResource):
    """A tenant's silo database (see module docstring)."""

    endpoint: pulumi.Output[str]
    port: pulumi.Output[int]
    master_secret_arn: pulumi.Output[str]
    app_secret_arn: pulumi.Output[str]
    replication_secret_arn: pulumi.Output[str]
    kms_key_arn: pulumi.Output[str]
    security_group_id: pulumi.Output[str]

    def __init__(self, name: str, args: SiloDatabaseArgs, opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__(COMPONENT_TYPE, name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        tags = args.tags

        key = kms_key(
            f"{name}-kms",
            description=f"tenantctl silo {args.slug} (tenant {args.tenant_id}): storage, snapshots, secrets",
            alias=f"tenantctl/{args.identifier}",
            tags=tags,
            opts=child,
        )
        subnet_group = aws.rds.SubnetGroup(
            f"{name}-subnets",
            name=args.identifier,
            description=f"tenantctl silo {args.slug}",
            subnet_ids=args.subnet_ids,
            tags=tags,
            opts=child,
        )
        security_group = aws.ec2.SecurityGroup(
            f"{name}-sg",
            vpc_id=args.vpc_id,
            description=f"tenantctl silo {args.slug}: PostgreSQL from the application and the pool only",
            tags=tags,
            opts=child,
        )
        for index, app_group in enumerate(args.app_security_group_ids):
            db_ingress(
                f"{name}-in-app-{index}",
                security_group_id=security_group.id,
                source_security_group_id=app_group,
                description="application and control plane",
                opts=child,
            )
        db_ingress(
            f"{name}-in-pool",
            security_group_id=security_group.id,
            source_security_group_id=args.pool_security_group_id,
            description="pool: logical replication (demotion)",
            opts=child,
        )
        db_egress(
            f"{name}-out-pool",
            security_group_id=security_group.id,
            destination_security_group_id=args.pool_security_group_id,
            description="logical replication from the pool (promotion)",
            opts=child,
        )
        db_ingress(
            f"{name}-pool-in",
            security_group_id=args.pool_security_group_id,
            source_security_group_id=security_group.id,
            description=f"silo {args.slug}: logical replication subscriber (promotion)",
            opts=child,
        )
        db_egress(
            f"{name}-pool-out",
            security_group_id=args.pool_security_group_id,
            destination_security_group_id=security_group.id,
            description=f"silo {args.slug}: the pool subscribes to this silo (demotion)",
            opts=child,
        )

        password = generated_password(f"{name}-master-password", opts=child)
        app_password = generated_password(f"{name}-app-password", opts=child)
        replication_password = generated_password(f"{name}-replication-password", opts=child)
        # Final snapshot names must be unique in the account: a tenant
        # promoted, demoted and promoted again gets a new suffix each time.
        snapshot_suffix = random.RandomId(f"{name}-snapshot-suffix", byte_length=4, opts=child)
        final_snapshot = pulumi.Output.concat(args.identifier, "-final-", snapshot_suffix.hex)
        family = engine_family(args.engine, args.engine_version)

        host: pulumi.Output[str]
        port: pulumi.Output[int]
        if args.engine == "postgres":
            params = aws.rds.ParameterGroup(
                f"{name}-params",
                family=family,
                description=f"tenantctl silo {args.slug}: logical replication",
                parameters=postgres_parameters(logical_replication=True),
                tags=tags,
                opts=child,
            )
            instance = aws.rds.Instance(
                f"{name}-db",
                identifier=args.identifier,
                engine="postgres",
                engine_version=args.engine_version,
                instance_class=args.instance_class,
                allocated_storage=args.allocated_storage_gb,
                max_allocated_storage=args.max_allocated_storage_gb,
                storage_type="gp3",
                storage_encrypted=True,
                kms_key_id=key.arn,
                db_name=args.database_name,
                username=args.master_username,
                password=password.result,
                port=PG_PORT,
                parameter_group_name=params.name,
                db_subnet_group_name=subnet_group.name,
                vpc_security_group_ids=[security_group.id],
                publicly_accessible=False,
                multi_az=args.multi_az,
                backup_retention_period=args.backup_retention_days,
                copy_tags_to_snapshot=True,
                delete_automated_backups=False,
                deletion_protection=args.deletion_protection,
                skip_final_snapshot=False,
                final_snapshot_identifier=final_snapshot,
                iam_database_authentication_enabled=True,
                auto_minor_version_upgrade=True,
                tags=tags,
                opts=child,
            )
            host, port = instance.address, instance.port
        else:
            cluster_params = aws.rds.ClusterParameterGroup(
                f"{name}-params",
                family=family,
                description=f"tenantctl silo {args.slug}: logical replication",
                parameters=[
                    aws.rds.ClusterParameterGroupParameterArgs(name=p.name, value=p.value, apply_method=p.apply_method)
                    for p in postgres_parameters(logical_replication=True)
                ],
                tags=tags,
                opts=child,
            )
            cluster = aws.rds.Cluster(
                f"{name}-db",
                cluster_identifier=args.identifier,
                engine="aurora-postgresql",
                engine_version=args.engine_version,
                database_name=args.database_name,
                master_username=args.master_username,
                master_password=password.result,
                port=PG_PORT,
                db_cluster_parameter_group_name=cluster_params.name,
                db_subnet_group_name=subnet_group.name,
                vpc_security_group_ids=[security_group.id],
                storage_encrypted=True,
                kms_key_id=key.arn,
                backup_retention_period=args.backup_retention_days,
                copy_tags_to_snapshot=True,
                deletion_protection=args.deletion_protection,
                skip_final_snapshot=False,
                final_snapshot_identifier=final_snapshot,
                iam_database_authentication_enabled=True,
                tags=tags,
                opts=child,
            )
            aws.rds.ClusterInstance(
                f"{name}-writer",
                identifier=f"{args.identifier}-1",
                cluster_identifier=cluster.id,
                engine=aws.rds.EngineType.AURORA_POSTGRESQL,
                engine_version=args.engine_version,
                instance_class=args.instance_class,
                db_subnet_group_name=subnet_group.name,
                publicly_accessible=False,
                auto_minor_version_upgrade=True,
                tags=tags,
                opts=child,
            )
            host, port = cluster.endpoint, cluster.port

        def secret(kind: str, username: str, secret_password: pulumi.Output[str]) -> aws.secretsmanager.Secret:
            return credentials_secret(
                role_secret_resource(name, kind),
                secret_name_prefix=f"tenantctl/silos/{args.identifier}/{kind}-",
                description=f"tenantctl silo {args.slug}: {kind} credentials ({username})",
                kms_key_arn=key.arn,
                engine="postgres",
                username=username,
                password=secret_password,
                host=host,
                port=port,
                dbname=args.database_name,
                # IAM can scope GetSecretValue by this tag: the data plane gets
                # `app` only, the control plane's workers `master` and `replication`.
                tags={**tags, "tenantctl:credential": kind},
                opts=child,
            )

        master = secret("master", args.master_username, password.result)
        app = secret("app", args.app_username, app_password.result)
        replication = secret("replication", args.replication_username, replication_password.result)

        self.endpoint = host
        self.port = port
        self.master_secret_arn = master.arn
        self.app_secret_arn = app.arn
        self.replication_secret_arn = replication.arn
        self.kms_key_arn = key.arn
        self.security_group_id = security_group.id
        self.register_outputs(
            {
                "endpoint": self.endpoint,
                "port": self.port,
                "master_secret_arn": self.master_secret_arn,
                "app_secret_arn": self.app_secret_arn,
                "replication_secret_arn": self.replication_secret_arn,
                "kms_key_arn": self.kms_key_arn,
                "security_group_id": self.security_group_id,
            }
        )


@dataclass(frozen=True)
class SiloStackConfig:
    """Everything the per-silo stack needs, besides what the shared stack exports."""

    tenant_id: str
    slug: str
    tier: str
    identifier: str
    database_name: str
    shared_stack: str
    engine: Engine = "postgres"
    engine_version: str = "16"
    instance_class: str = "db.t4g.medium"
    allocated_storage_gb: int = 50
    max_allocated_storage_gb: int = 200
    backup_retention_days: int = 7
    multi_az: bool = False
    deletion_protection: bool = True
    master_username: str = "tenantctl_owner"
    app_username: str = "tenantctl_app"
    replication_username: str = "tenantctl_replicator"


# Stack outputs of a silo stack (read back by the provisioner).
SILO_OUTPUTS = (
    "tenant_id",
    "identifier",
    "endpoint",
    "port",
    "database",
    "username",
    "app_username",
    "replication_username",
    "master_secret_arn",
    "app_secret_arn",
    "replication_secret_arn",
    "kms_key_arn",
)


def silo_program(config: SiloStackConfig) -> Callable[[], None]:
    """The inline Pulumi program of one silo stack."""

    def program() -> None:
        shared = pulumi.StackReference(config.shared_stack)
        silo = SiloDatabase(
            config.identifier,
            SiloDatabaseArgs(
                tenant_id=config.tenant_id,
                slug=config.slug,
                tier=config.tier,
                identifier=config.identifier,
                database_name=config.database_name,
                vpc_id=shared.require_output("vpc_id"),
                subnet_ids=shared.require_output("subnet_ids"),
                app_security_group_ids=[shared.require_output("app_security_group_id")],
                pool_security_group_id=shared.require_output("pool_security_group_id"),
                engine=config.engine,
                engine_version=config.engine_version,
                instance_class=config.instance_class,
                allocated_storage_gb=config.allocated_storage_gb,
                max_allocated_storage_gb=config.max_allocated_storage_gb,
                backup_retention_days=config.backup_retention_days,
                multi_az=config.multi_az,
                deletion_protection=config.deletion_protection,
                master_username=config.master_username,
                app_username=config.app_username,
                replication_username=config.replication_username,
            ),
        )
        pulumi.export("tenant_id", config.tenant_id)
        pulumi.export("identifier", config.identifier)
        pulumi.export("database", config.database_name)
        pulumi.export("username", config.master_username)
        pulumi.export("app_username", config.app_username)
        pulumi.export("replication_username", config.replication_username)
        pulumi.export("endpoint", silo.endpoint)
        pulumi.export("port", silo.port)
        pulumi.export("master_secret_arn", silo.master_secret_arn)
        pulumi.export("app_secret_arn", silo.app_secret_arn)
        pulumi.export("replication_secret_arn", silo.replication_secret_arn)
        pulumi.export("kms_key_arn", silo.kms_key_arn)

    return program
