"""``tenantctl``: the command-line interface (Typer + rich).

Every command works against the stack ``tenantctl up`` started from the same
state directory (``--state-dir`` or ``TENANTCTL_STATE_DIR``). Read commands
take ``--json`` and then print exactly one JSON document on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from control_plane import keys
from control_plane import stack as stack_mod
from control_plane.dev import EmbeddedStack, StackInfo
from control_plane.exceptions import EmbeddedStackError
from control_plane.settings import ControlPlaneSettings
from data_plane.dsn import redact
from data_plane.exceptions import TenantctlError
from data_plane.settings import DataPlaneSettings, describe_invalid

app = typer.Typer(help="Hybrid pool/silo tenant control plane for PostgreSQL.", no_args_is_help=True)
token_app = typer.Typer(help="Print a dev token.", no_args_is_help=True)
app.add_typer(token_app, name="token")

console = Console(stderr=True)
out = Console()

StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", envvar="TENANTCTL_STATE_DIR", help="State directory of the stack."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def load_settings(state_dir: Path | None) -> ControlPlaneSettings:
    """Settings from the environment; an invalid configuration is a message and exit 1."""
    try:
        if state_dir is None:
            return ControlPlaneSettings()
        return ControlPlaneSettings(state_dir=state_dir)
    except ValidationError as exc:
        console.print(f"[red]error:[/red] invalid configuration: {describe_invalid(exc)}")
        raise typer.Exit(1) from None


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


@contextlib.contextmanager
def cli_errors() -> Iterator[None]:
    """Known errors become a one-line message and exit code 1, never a traceback."""
    try:
        yield
    except TenantctlError as exc:
        console.print(f"[red]error:[/red] {exc.message}")
        raise typer.Exit(1) from None


class _Server(uvicorn.Server):
    # Two servers share one event loop; `up` owns the signal handlers so that
    # one Ctrl-C stops both (uvicorn's own handlers would only stop one).
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def _serve(servers: list[_Server]) -> None:
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def _data_plane_settings(settings: ControlPlaneSettings, endpoints: stack_mod.Endpoints) -> DataPlaneSettings:
    return DataPlaneSettings(
        state_dir=settings.state_dir,
        environment=settings.environment,
        app_catalog_url=endpoints.app_catalog_url,
        app_pool_url=endpoints.app_pool_url,
    )


@app.command()
def up(
    state_dir: StateDir = None,
    api_port: Annotated[int, typer.Option(help="Tenant API port.")] = 8000,
    admin_port: Annotated[int, typer.Option(help="Control-plane API port.")] = 8001,
) -> None:
    """Start the whole stack: embedded PostgreSQL (if no URLs), migrations, both APIs."""
    from control_plane.api import create_app as create_admin_app
    from data_plane.api import create_app as create_tenant_app

    settings = load_settings(state_dir)
    stack = EmbeddedStack(settings.state_dir)
    with cli_errors(), stack.exclusive():
        roles = stack_mod.roles_of(settings)
        try:
            if settings.embedded:
                console.print(f"starting embedded PostgreSQL in {stack.state_dir / 'pg'} ...")
                stack.start()
                endpoints = stack_mod.bootstrap_embedded(stack, roles)
            else:
                endpoints = stack_mod.external_endpoints(settings)
            console.print("migrating catalog and pool ...")
            stack_mod.migrate_all(endpoints, app_role=settings.app_role, replication_role=settings.replication_role)
            if not settings.is_production:
                keys.ensure_dev_key(settings)
            api_url = f"http://{settings.host}:{api_port}"
            admin_url = f"http://{settings.host}:{admin_port}"
            tenant_app = create_tenant_app(_data_plane_settings(settings, endpoints))
            admin_app = create_admin_app(settings, endpoints)
            servers = [
                _Server(uvicorn.Config(tenant_app, host=settings.host, port=api_port, log_level="warning")),
                _Server(uvicorn.Config(admin_app, host=settings.host, port=admin_port, log_level="warning")),
            ]
            StackInfo(
                pid=os.getpid(),
                api_url=api_url,
                admin_url=admin_url,
                **{field: getattr(endpoints, field) for field in stack_mod.Endpoints.__dataclass_fields__},
            ).write(stack.state_dir)
            out.print(f"tenant API     {api_url}   (docs: {api_url}/docs)")
            out.print(f"control plane  {admin_url}   (docs: {admin_url}/docs)")
            if not settings.is_production:  # production tokens come from the identity provider
                out.print(f"admin token    {keys.admin_token(settings, ttl=12 * 3600)}", soft_wrap=True)
            out.print("Ctrl-C stops everything.")
            # The in-process job executor (DBOS); `tenantctl worker` runs more.
            from control_plane.workflows.executor import Executor

            executor = Executor(settings, endpoints, name="up")
            executor.start()
            try:
                asyncio.run(_serve(servers))
            finally:
                executor.stop()
        finally:
            (stack.state_dir / "stack.json").unlink(missing_ok=True)
            if settings.embedded:
                console.print("stopping embedded PostgreSQL ...")
                with contextlib.suppress(EmbeddedStackError):
                    stack.stop()


@app.command()
def status(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """URLs of both APIs and the DSNs of catalog, pool and silo server (owner and app roles)."""
    settings = load_settings(state_dir)
    with cli_errors():
        info = StackInfo.read(settings.state_dir) if settings.embedded else None
        endpoints = stack_mod.running_endpoints(settings)
    document = {
        "state_dir": str(settings.state_dir.resolve()),
        "embedded": settings.embedded,
        "api_url": info.api_url if info else None,
        "admin_url": info.admin_url if info else None,
        "dsn": {
            "catalog": {"owner": redact(endpoints.catalog_url), "app": redact(endpoints.app_catalog_url)},
            "pool": {"owner": redact(endpoints.pool_url), "app": redact(endpoints.app_pool_url)},
            "silo_server": {
                "owner": redact(endpoints.silo_server_url),
                "app": redact(endpoints.app_silo_server_url),
            },
        },
    }
    if as_json:
        print_json(document)
        return
    table = Table("what", "role", "value")
    table.add_row("tenant API", "", str(document["api_url"]))
    table.add_row("control plane", "", str(document["admin_url"]))
    for name, dsns in document["dsn"].items():  # type: ignore[attr-defined]
        for role, dsn in dsns.items():
            table.add_row(name, role, dsn)
    out.print(table)


@token_app.command("tenant")
def token_tenant(
    tenant: Annotated[str, typer.Option("--tenant", help="Tenant slug or id.")],
    ttl: Annotated[int, typer.Option("--ttl", help="Lifetime in seconds.")] = 3600,
    subject: Annotated[str, typer.Option("--sub", help="Subject claim.")] = "dev-user",
    state_dir: StateDir = None,
) -> None:
    """Print a dev tenant token (aud tenantctl-api) for a tenant slug or id."""
    settings = load_settings(state_dir)
    with cli_errors():
        keys.refuse_in_production(settings)  # before touching the catalog
        tenant_id = _resolve_tenant_id(settings, tenant)
        sys.stdout.write(keys.tenant_token(settings, tenant_id=tenant_id, subject=subject, ttl=ttl) + "\n")


@token_app.command("admin")
def token_admin(
    ttl: Annotated[int, typer.Option("--ttl", help="Lifetime in seconds.")] = 3600,
    state_dir: StateDir = None,
) -> None:
    """Print a dev admin token (aud tenantctl-admin)."""
    settings = load_settings(state_dir)
    with cli_errors():
        sys.stdout.write(keys.admin_token(settings, ttl=ttl) + "\n")


def _resolve_tenant_id(settings: ControlPlaneSettings, tenant: str) -> uuid.UUID:
    import psycopg

    from data_plane.dsn import libpq
    from data_plane.exceptions import NotFoundError

    with contextlib.suppress(ValueError):
        return uuid.UUID(tenant)
    endpoints = stack_mod.running_endpoints(settings)
    with psycopg.connect(libpq(endpoints.catalog_url)) as conn:
        row = conn.execute("SELECT id FROM tenants WHERE slug = %s", (tenant,)).fetchone()
    if row is None:
        raise NotFoundError(f"no tenant with slug {tenant!r}")
    return uuid.UUID(str(row[0]))


# Sub-apps register last: they reuse the helpers above (importing them first would be circular).
if __name__ in ("__main__", "__mp_main__"):
    # `python -m control_plane.cli`: a sub-app importing control_plane.cli must get
    # this module, not a second copy whose own sub-app imports find them half-built.
    # Multiprocessing workers (fleet migrations of `up`'s in-process jobs)
    # re-import the main module as `__mp_main__`: the same applies there.
    sys.modules.setdefault("control_plane.cli", sys.modules[__name__])
from control_plane.catalog.cli import tenants_app  # noqa: E402
from control_plane.fleet.cli import migrate_app  # noqa: E402

app.add_typer(migrate_app, name="migrate")
app.add_typer(tenants_app, name="tenants")


@app.command()
def worker(
    state_dir: StateDir = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Executor id (default TENANTCTL_WORKER_NAME or 'worker').")
    ] = None,
) -> None:
    """Run a durable-job executor until Ctrl-C; a restart under the same name resumes its jobs."""
    import threading

    from control_plane.workflows.executor import Executor
    from data_plane.logs import configure_logging

    settings = load_settings(state_dir)
    configure_logging(settings)
    stop = threading.Event()
    with cli_errors():
        executor = Executor(settings, stack_mod.running_endpoints(settings), name=name or settings.worker_name)
        executor.start()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    console.print(f"worker {executor.name!r} running; Ctrl-C stops it")
    try:
        stop.wait()
    finally:
        executor.stop()


@app.command()
def doctor(state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Audit RLS and roles on the pool and every silo; exit 1 on any finding."""
    from control_plane.doctor import run_doctor

    settings = load_settings(state_dir)
    with cli_errors():
        endpoints = stack_mod.running_endpoints(settings)
        report = run_doctor(catalog_dsn=endpoints.catalog_url, pool_dsn=endpoints.pool_url, app_role=settings.app_role)
    if as_json:
        print_json(report)
    else:
        for target in report["targets"]:
            count = len(target["findings"])
            state = f"[red]{count} finding(s)[/red]" if count else "[green]ok[/green]"
            out.print(f"{target['kind']:5} {target['name']}: {state} ({len(target['tenant_tables'])} tenant tables)")
            for item in target["findings"]:
                out.print(f"  [red]x[/red] {item['check']}: {item['object']}: {item['message']}")
            for item in target["warnings"]:
                out.print(f"  [yellow]![/yellow] {item['check']}: {item['message']}")
    if not report["ok"]:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
