"""Credentials for the control plane's own connections to a silo.

A location's DSNs never carry a password. Local silos need none (the silo
server's authentication decides) and are returned unchanged. RDS silos
(``pulumi-aws``) keep their credentials in Secrets Manager: the location's
``secret_ref`` is the *application* secret (the data plane's, resolved by
``data_plane.secrets.AwsSecretsResolver``); its ``detail`` names the master
and replication secrets, which only the control plane's workers read:

* :func:`owner_dsn` -- migrations, moves' copies and checksums, fencing,
  offboarding, doctor: the owner DSN with the master secret's password;
* :func:`replication_conninfo` -- the ``CONNECTION`` of a subscription that
  another server opens to this silo (demotion), as the replication role with
  its secret's password. When the replication role cannot bypass RLS (see
  ``bootstrap.ensure_roles_rds``), the conninfo also sets
  ``row_security=off``, so the subscription's initial copy *fails* instead of
  being silently filtered to nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import make_url

from control_plane.exceptions import ProvisioningError
from control_plane.provisioning.base import SiloLocation
from data_plane.dsn import libpq, with_user
from data_plane.secrets import AwsSecretsManagerStore, SecretStore, dsn_with_secret

MASTER_SECRET = "master_secret_arn"  # noqa: S105 -- a key of the location's detail, not a secret
REPLICATION_SECRET = "replication_secret_arn"  # noqa: S105 -- idem
ROW_SECURITY_OFF = "-crow_security=off"

Location = SiloLocation | Mapping[str, Any]


@functools.cache
def default_store() -> SecretStore:
    """One process-wide Secrets Manager store (its TTL cache is shared by every caller)."""
    return AwsSecretsManagerStore()


def with_secret(dsn: str, ref: str | None, *, store: SecretStore | None = None) -> str:
    """``dsn`` with the password of the secret ``ref`` (read now, cached by the store); unchanged without one."""
    if ref is None:
        return dsn
    return dsn_with_secret(dsn, (store or default_store()).get(ref))


def _field(location: Location, name: str) -> Any:
    if isinstance(location, SiloLocation):
        return getattr(location, name)
    return location.get(name)


def _detail(location: Location) -> Mapping[str, Any]:
    detail = _field(location, "detail")
    return detail if isinstance(detail, Mapping) else {}


def owner_dsn(location: Location, *, store: SecretStore | None = None) -> str:
    """The location's owner DSN, with the master password when the silo has a master secret."""
    dsn = _field(location, "dsn")
    if not dsn:
        raise ProvisioningError(f"location {_field(location, 'name')!r} has no owner DSN")
    return with_secret(str(dsn), master_secret_ref(location), store=store)


def replication_conninfo(location: Location, *, role: str, store: SecretStore | None = None) -> str:
    """How another server reaches this silo as the replication role (a subscription's CONNECTION)."""
    conninfo = replication_conninfo_without_password(location, role=role)
    return with_secret(conninfo, replication_secret_ref(location), store=store)


def replication_conninfo_without_password(location: Location, *, role: str) -> str:
    """:func:`replication_conninfo` before its password is added (what a checkpointed plan may hold)."""
    dsn = _field(location, "dsn")
    if not dsn:
        raise ProvisioningError(f"location {_field(location, 'name')!r} has no owner DSN")
    conninfo = with_user(str(dsn), role)
    bypass = _detail(location).get("rls_bypass")
    if isinstance(bypass, Mapping) and bypass.get("replication") is False:
        conninfo = _with_row_security_off(conninfo)
    return conninfo


def master_secret_ref(location: Location) -> str | None:
    ref = _detail(location).get(MASTER_SECRET)
    return str(ref) if ref else None


def replication_secret_ref(location: Location) -> str | None:
    ref = _detail(location).get(REPLICATION_SECRET)
    return str(ref) if ref else None


def _with_row_security_off(dsn: str) -> str:
    url = make_url(dsn)
    options = str(url.query.get("options") or "")
    if ROW_SECURITY_OFF in options.split():
        return dsn
    return libpq(url.update_query_dict({"options": f"{options} {ROW_SECURITY_OFF}".strip()}))
