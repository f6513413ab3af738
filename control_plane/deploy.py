"""Entry points for container deployments (see ``docker-compose.yml``).

* ``uvicorn --factory control_plane.deploy:admin_app`` -- the admin API alone,
  configured from ``TENANTCTL_*`` (external URLs; no embedded PostgreSQL);
* ``python -m control_plane.deploy bootstrap`` -- a one-shot job run before
  anything else: the project's roles (with passwords from the environment) on
  both servers, the catalog and pool databases, and the catalog and pool
  migrations. Idempotent, so it runs on every ``docker compose up``. The pool
  is migrated under the migration/move interlock: while a tenant is moving and
  the pool needs a migration, it exits 1 with the reason (retry when the move
  has finished).

Data-plane replicas need no entry point of their own:
``uvicorn --factory data_plane.api:create_app``.
"""

from __future__ import annotations

import os
import sys

from fastapi import FastAPI

from control_plane import bootstrap, stack
from control_plane.settings import ControlPlaneSettings
from data_plane.exceptions import TenantctlError


def admin_app() -> FastAPI:
    """The admin API for ``uvicorn --factory`` (settings from the environment)."""
    from control_plane.api import create_app

    settings = ControlPlaneSettings()
    return create_app(settings, stack.external_endpoints(settings))


def _required(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"{name} must be set")
    return value


def run_bootstrap() -> None:
    settings = ControlPlaneSettings()
    roles = stack.roles_of(settings)
    main_admin = _required("TENANTCTL_MAIN_ADMIN_URL")
    silo_admin = _required("TENANTCTL_SILO_SERVER_URL")
    passwords = {
        "owner": _required("TENANTCTL_OWNER_PASSWORD"),
        "app": _required("TENANTCTL_APP_PASSWORD"),
        "replication": _required("TENANTCTL_REPLICATION_PASSWORD"),
    }
    for admin in (main_admin, silo_admin):
        bootstrap.ensure_roles(admin, roles, passwords)
    bootstrap.ensure_database(main_admin, stack.CATALOG_DB, roles)
    bootstrap.ensure_database(main_admin, stack.POOL_DB, roles)
    endpoints = stack.external_endpoints(settings)
    # The owner URLs carry the owner's password; the app URLs derived from them
    # do not (the data plane reads PGPASSWORD), and migrations need only owners.
    stack.migrate_all(endpoints, app_role=roles.app, replication_role=roles.replication)


def main(argv: list[str]) -> int:
    if argv[:1] != ["bootstrap"]:
        sys.stderr.write("usage: python -m control_plane.deploy bootstrap\n")
        return 2
    try:
        run_bootstrap()
    except TenantctlError as exc:
        # A refusal (a move in progress) or a failed pool migration: one line for
        # the job's log and a non-zero exit so the deployment retries, no traceback.
        sys.stderr.write(f"bootstrap: {exc.message}\n")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
