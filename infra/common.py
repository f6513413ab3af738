"""Building blocks shared by the shared stack and the per-tenant ``SiloDatabase``.

Nothing here creates a resource at import time; every function takes the
Pulumi resource options of its caller (usually ``parent=<component>``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import pulumi
import pulumi_aws as aws
import pulumi_random as random

with warnings.catch_warnings():
    # pulumi-aws 7.x warns, when ``aws.ec2`` is first loaded, about a resource
    # we never use (EncryptionControl). Load it here, once, without that noise
    # so it cannot fail runs under ``-W error``; every other warning stays on.
    warnings.filterwarnings("ignore", message=r"aws\.ec2/encryptioncontrol", category=DeprecationWarning)
    aws.ec2.SecurityGroup  # noqa: B018 -- the attribute access performs the lazy import

PG_PORT = 5432
PROJECT_TAG = {"managed-by": "tenantctl"}
# RDS refuses '/', '@', '"' and spaces in master passwords.
PASSWORD_SPECIALS = "!#$%&*()-_=+[]{}<>:?"  # noqa: S105 -- an alphabet, not a password


def engine_family(engine: str, engine_version: str) -> str:
    """Parameter group family: ``postgres16``, ``aurora-postgresql16`` ..."""
    major = engine_version.split(".", 1)[0]
    if not major.isdigit():
        raise ValueError(f"engine_version must start with the major version, got {engine_version!r}")
    return f"{engine}{major}"


def kms_key(
    name: str, *, description: str, alias: str, tags: Mapping[str, str], opts: pulumi.ResourceOptions
) -> aws.kms.Key:
    """A customer-managed key with yearly rotation and a 30-day deletion window."""
    key = aws.kms.Key(
        name,
        description=description,
        enable_key_rotation=True,
        deletion_window_in_days=30,
        tags=dict(tags),
        opts=opts,
    )
    aws.kms.Alias(f"{name}-alias", name=f"alias/{alias}", target_key_id=key.key_id, opts=opts)
    return key


def generated_password(name: str, *, opts: pulumi.ResourceOptions) -> random.RandomPassword:
    """A 40-character password RDS accepts, kept as a Pulumi secret in the state."""
    return random.RandomPassword(
        name,
        length=40,
        special=True,
        override_special=PASSWORD_SPECIALS,
        min_lower=1,
        min_upper=1,
        min_numeric=1,
        opts=opts,
    )


def role_secret_resource(name: str, kind: str) -> str:
    """The Pulumi resource name of a role's credentials secret.

    The master secret keeps its original resource name, so that stacks created
    before the role secrets existed do not replace it.
    """
    return f"{name}-secret" if kind == "master" else f"{name}-{kind}-secret"


def credentials_secret(
    name: str,
    *,
    secret_name_prefix: str,
    description: str,
    kms_key_arn: pulumi.Input[str],
    engine: str,
    username: str,
    password: pulumi.Input[str],
    host: pulumi.Input[str],
    port: pulumi.Input[int],
    dbname: str,
    tags: Mapping[str, str],
    opts: pulumi.ResourceOptions,
) -> aws.secretsmanager.Secret:
    """One role's credentials in Secrets Manager, in the RDS rotation format.

    The JSON (``engine, host, port, username, password, dbname``) is what
    ``data_plane.secrets`` reads and what Secrets Manager's RDS rotation
    functions expect. A name *prefix* (not a fixed name): a deleted secret
    keeps its name for the recovery window, so a silo re-provisioned within it
    could not be created under the same fixed name.
    """
    secret = aws.secretsmanager.Secret(
        name,
        name_prefix=secret_name_prefix,
        description=description,
        kms_key_id=kms_key_arn,
        recovery_window_in_days=7,
        tags=dict(tags),
        opts=opts,
    )
    aws.secretsmanager.SecretVersion(
        f"{name}-value",
        secret_id=secret.id,
        secret_string=pulumi.Output.json_dumps(
            {
                "engine": engine,
                "host": host,
                "port": port,
                "username": username,
                "password": password,
                "dbname": dbname,
            }
        ),
        opts=opts,
    )
    return secret


def postgres_parameters(*, logical_replication: bool) -> list[aws.rds.ParameterGroupParameterArgs]:
    params = [aws.rds.ParameterGroupParameterArgs(name="rds.force_ssl", value="1")]
    if logical_replication:
        params += [
            # Static parameters: applied at the next reboot, which RDS performs
            # right after creation, before the database takes traffic.
            aws.rds.ParameterGroupParameterArgs(
                name="rds.logical_replication", value="1", apply_method="pending-reboot"
            ),
            aws.rds.ParameterGroupParameterArgs(
                name="max_replication_slots", value="20", apply_method="pending-reboot"
            ),
            aws.rds.ParameterGroupParameterArgs(name="max_wal_senders", value="20", apply_method="pending-reboot"),
        ]
    return params


def db_ingress(
    name: str,
    *,
    security_group_id: pulumi.Input[str],
    source_security_group_id: pulumi.Input[str],
    description: str,
    opts: pulumi.ResourceOptions,
) -> aws.vpc.SecurityGroupIngressRule:
    """Admit PostgreSQL traffic from one security group (never from a CIDR)."""
    return aws.vpc.SecurityGroupIngressRule(
        name,
        security_group_id=security_group_id,
        referenced_security_group_id=source_security_group_id,
        ip_protocol="tcp",
        from_port=PG_PORT,
        to_port=PG_PORT,
        description=description,
        opts=opts,
    )


def db_egress(
    name: str,
    *,
    security_group_id: pulumi.Input[str],
    destination_security_group_id: pulumi.Input[str],
    description: str,
    opts: pulumi.ResourceOptions,
) -> aws.vpc.SecurityGroupEgressRule:
    """Let PostgreSQL traffic out to one security group (never to a CIDR)."""
    return aws.vpc.SecurityGroupEgressRule(
        name,
        security_group_id=security_group_id,
        referenced_security_group_id=destination_security_group_id,
        ip_protocol="tcp",
        from_port=PG_PORT,
        to_port=PG_PORT,
        description=description,
        opts=opts,
    )
