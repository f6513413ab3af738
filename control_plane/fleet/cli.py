"""``tenantctl migrate status|upgrade [REV]|downgrade REV`` (DESIGN §5).

Exit codes: ``upgrade``/``downgrade`` exit 0 only when every target was
migrated or already up to date; 1 when any target failed or was not run (the
run stopped early: pool or canary failure, lost interlock) or the run was
refused; 130 on Ctrl-C.
``status`` exits 0 when every target is at head, 3 when some target drifted
(behind, ahead, unversioned, unknown revision) and 1 when some target is
unreachable. With ``--json`` exactly one JSON document is printed on stdout --
also when the command is refused or fails before any target ran (interlock
busy, unknown revision or tenant, catalog unreachable): then it is
``{"error": {"code": ..., "message": ...}}`` and the exit code is 1.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated

import psycopg
import typer
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from control_plane import stack as stack_mod
from control_plane.cli import JsonFlag, StateDir, console, load_settings, out, print_json
from control_plane.fleet.models import Action, TargetResult, TargetStatus
from control_plane.fleet.runner import DEFAULT_CONCURRENCY, DEFAULT_LOCK_TIMEOUT_S, FleetOptions, run_fleet
from control_plane.fleet.scripts import Drift
from control_plane.fleet.status import StatusReport, status_of
from control_plane.fleet.targets import ALL, load_targets
from data_plane.exceptions import TenantctlError

migrate_app: typer.Typer = typer.Typer(
    help="Apply the tenant schema's migrations to the pool and every silo.", no_args_is_help=True
)

TargetOpt = Annotated[
    str, typer.Option("--target", help="pool, all, or a tenant slug (the database serving that tenant).")
]
ConcurrencyOpt = Annotated[int, typer.Option("--concurrency", min=1, help="Migrations (worker processes) at once.")]
CanaryOpt = Annotated[
    int, typer.Option("--canary", min=0, help="Silos migrated first; any failure among them stops the run.")
]
LockTimeoutOpt = Annotated[
    float,
    typer.Option("--lock-timeout", min=0, help="Seconds to wait for another runner or a move before refusing."),
]
ScriptLocationOpt = Annotated[
    str | None, typer.Option("--script-location", hidden=True, help="Another tenant script directory.")
]

_STATUS_STYLE = {
    TargetStatus.SUCCEEDED: "green",
    TargetStatus.FAILED: "red",
    TargetStatus.SKIPPED: "dim",
    TargetStatus.NOT_RUN: "yellow",
}
_DRIFT_STYLE = {Drift.AT_HEAD: "green", Drift.BEHIND: "yellow", Drift.UNREACHABLE: "red"}


class _Bar:
    """The runner's progress as a rich progress bar on stderr (TTY only)."""

    def __init__(self, bar: RichProgress) -> None:
        self.bar = bar
        self.task = bar.add_task("probing", total=None)

    def planned(self, total: int, to_migrate: int) -> None:
        self.bar.update(self.task, total=total, description=f"migrating {to_migrate} of {total}")

    def finished(self, result: TargetResult) -> None:
        self.bar.advance(self.task)
        if result.status is TargetStatus.FAILED:
            self.bar.console.print(f"[red]failed[/red] {result.target}: {result.error}")


def _rev(revision: str | None) -> str:
    return revision or "base"


@contextlib.contextmanager
def _refusals(as_json: bool) -> Iterator[None]:
    """A refusal or a known error: one line on stderr, the JSON error document with
    ``--json`` (scripts parse stdout whatever happened), exit code 1 -- never a traceback."""
    try:
        yield
    except TenantctlError as exc:
        raise _refused(exc.code, exc.message, as_json) from None
    except psycopg.Error as exc:
        # The catalog is unreachable or refused us (libpq's text names host and
        # user, never the password).
        message = f"catalog database error: {str(exc).strip()}"
        raise _refused("database_unavailable", message, as_json) from None


def _refused(code: str, message: str, as_json: bool) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    if as_json:
        print_json({"error": {"code": code, "message": message}})
    return typer.Exit(1)


def _run(
    action: Action,
    revision: str,
    *,
    target: str,
    concurrency: int,
    canary: int,
    lock_timeout: float,
    as_json: bool,
    state_dir: StateDir,
    script_location: str | None,
) -> None:
    settings = load_settings(state_dir)
    options = FleetOptions(
        action=action,
        revision=revision,
        concurrency=concurrency,
        canary=canary,
        lock_timeout_s=lock_timeout,
        script_location=script_location,
        app_role=settings.app_role,
        replication_role=settings.replication_role,
    )
    with _refusals(as_json):
        endpoints = stack_mod.running_endpoints(settings)
        if as_json or not console.is_terminal:
            report = run_fleet(endpoints.catalog_url, endpoints.pool_url, options, selector=target)
        else:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with RichProgress(*columns, console=console, transient=True) as bar:
                report = run_fleet(
                    endpoints.catalog_url, endpoints.pool_url, options, selector=target, progress=_Bar(bar)
                )
    if settings.metrics_textfile is not None:
        from control_plane.usage.metrics import write_fleet_metrics

        write_fleet_metrics(report, settings.metrics_textfile)
    if as_json:
        print_json(report.to_json())
    else:
        table = Table("target", "tenant", "status")
        table.add_column("from → to", no_wrap=True)
        table.add_column("seconds", justify="right")
        table.add_column("error")
        for r in report.results:
            style = _STATUS_STYLE[r.status]
            table.add_row(
                r.target,
                r.tenant or "",
                f"[{style}]{r.status.value}[/{style}]",
                f"{_rev(r.from_revision)} → {_rev(r.to_revision)}",
                f"{r.duration_s:.2f}",
                r.error or "",
            )
        out.print(table)
        counts = ", ".join(f"{n} {status}" for status, n in report.counts().items() if n)
        out.print(f"{action} to {revision} (head {_rev(report.head)}): {counts} in {report.duration_s:.2f}s")
        if report.stopped_reason:
            out.print(f"[yellow]stopped:[/yellow] {report.stopped_reason}")
    if report.interrupted:
        raise typer.Exit(130)
    if report.failed:
        raise typer.Exit(1)


@migrate_app.command("status")
def status(
    target: TargetOpt = ALL,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Databases queried at once.")] = 32,
    as_json: JsonFlag = False,
    state_dir: StateDir = None,
    script_location: ScriptLocationOpt = None,
) -> None:
    """Each target's revision and drift from head (behind, ahead, unversioned, unknown)."""
    settings = load_settings(state_dir)
    with _refusals(as_json):
        endpoints = stack_mod.running_endpoints(settings)
        targets = load_targets(endpoints.catalog_url, endpoints.pool_url, target)
        report = status_of(targets, script_location=script_location, concurrency=concurrency)
    if as_json:
        print_json(report.to_json())
    else:
        _print_status(report)
    if report.exit_code:
        raise typer.Exit(report.exit_code)


def _print_status(report: StatusReport) -> None:
    table = Table("target", "tenant", "revision", "drift", "error")
    for s in report.states:
        style = _DRIFT_STYLE.get(s.drift, "magenta")
        drift = s.drift.value + (f" ({s.behind_by})" if s.drift is Drift.BEHIND else "")
        table.add_row(s.target, s.tenant or "", s.revision or "", f"[{style}]{drift}[/{style}]", s.error or "")
    out.print(table)
    counts = ", ".join(f"{n} {drift}" for drift, n in report.counts().items() if n)
    out.print(f"head {_rev(report.head)}: {counts} ({report.duration_s:.2f}s)")


# Click would read "-1" as an unknown option; relative steps must arrive as REV.
_RELATIVE_REV = {"ignore_unknown_options": True}


@migrate_app.command("upgrade", context_settings=_RELATIVE_REV)
def upgrade(
    revision: Annotated[str, typer.Argument(help="Revision id, head, or a relative step such as +1.")] = "head",
    target: TargetOpt = ALL,
    concurrency: ConcurrencyOpt = DEFAULT_CONCURRENCY,
    canary: CanaryOpt = 0,
    lock_timeout: LockTimeoutOpt = DEFAULT_LOCK_TIMEOUT_S,
    as_json: JsonFlag = False,
    state_dir: StateDir = None,
    script_location: ScriptLocationOpt = None,
) -> None:
    """Upgrade the pool, then the silos (canary wave first, then in parallel)."""
    _run(
        "upgrade",
        revision,
        target=target,
        concurrency=concurrency,
        canary=canary,
        lock_timeout=lock_timeout,
        as_json=as_json,
        state_dir=state_dir,
        script_location=script_location,
    )


@migrate_app.command("downgrade", context_settings=_RELATIVE_REV)
def downgrade(
    revision: Annotated[str, typer.Argument(help="Revision id, base, or a relative step such as -1.")],
    target: TargetOpt = ALL,
    concurrency: ConcurrencyOpt = DEFAULT_CONCURRENCY,
    canary: CanaryOpt = 0,
    lock_timeout: LockTimeoutOpt = DEFAULT_LOCK_TIMEOUT_S,
    as_json: JsonFlag = False,
    state_dir: StateDir = None,
    script_location: ScriptLocationOpt = None,
) -> None:
    """Downgrade the pool, then the silos, to REV."""
    _run(
        "downgrade",
        revision,
        target=target,
        concurrency=concurrency,
        canary=canary,
        lock_timeout=lock_timeout,
        as_json=as_json,
        state_dir=state_dir,
        script_location=script_location,
    )
