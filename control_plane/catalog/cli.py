"""``tenantctl tenants ...``: the admin API's verbs on the command line.

The CLI talks to the running stack's admin API (the URL ``tenantctl up``
published in ``<state_dir>/stack.json``, or ``TENANTCTL_ADMIN_URL``) with a
dev admin token minted from the state directory's key -- so every change
goes through the same validation, state machine, idempotency and audit as an
API call (the audit actor is ``tenantctl-cli``). Human tables by default;
``--json`` prints one JSON document -- on failure too: then it is
``{"error": {"code": ..., "message": ...}}`` (the admin API's code when it
refused) and the exit code is 1.

``create`` sends an ``Idempotency-Key`` of its own, random per invocation,
unless ``--idempotency-key`` names one, and retries with it when the request
got no answer (timeout, connection lost, 5xx, still in flight): a retry gets
the first attempt's answer instead of "slug taken". A key derived from what is
created (slug, name, tier) would be shared by every later invocation: after an
offboarding, creating the same slug again replayed the stored 201 "active" of
the deleted tenant. To make two invocations one request, pass the same
``--idempotency-key`` (the API keeps a key 24 h).
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from tenacity import Retrying, retry_if_exception_type, retry_if_result, stop_after_attempt, wait_exponential
from tenacity.wait import wait_base

from control_plane import keys
from control_plane.dev import StackInfo
from control_plane.settings import ControlPlaneSettings
from data_plane.exceptions import TenantctlError
from data_plane.settings import describe_invalid

tenants_app: typer.Typer = typer.Typer(help="Manage tenants through the admin API.", no_args_is_help=True)

# Defined here rather than imported from control_plane.cli, which imports this
# module: under `python -m control_plane.cli` that cycle would break.
console = Console(stderr=True)
out = Console()
StateDir = Annotated[
    Path | None,
    typer.Option("--state-dir", envvar="TENANTCTL_STATE_DIR", help="State directory of the stack."),
]
JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]


def load_settings(state_dir: Path | None) -> ControlPlaneSettings:
    try:
        return ControlPlaneSettings() if state_dir is None else ControlPlaneSettings(state_dir=state_dir)
    except ValidationError as exc:
        raise CliFailure(f"invalid configuration: {describe_invalid(exc)}", code="invalid_configuration") from None


def print_json(document: Any) -> None:
    sys.stdout.write(json.dumps(document, indent=2, default=str) + "\n")


CLI_SUBJECT = "tenantctl-cli"
TenantArg = Annotated[str, typer.Argument(help="Tenant slug or id.")]
WaitFlag = Annotated[bool, typer.Option("--wait", help="Wait until the job finishes.")]


class CliFailure(Exception):
    """A command failed for a reason it can state (raised inside :func:`_reported`)."""

    def __init__(self, message: str, *, code: str = "error") -> None:
        super().__init__(message)
        self.message, self.code = message, code


def _fail(message: str, code: str = "error") -> CliFailure:
    return CliFailure(message, code=code)


@contextlib.contextmanager
def _reported(as_json: bool) -> Iterator[None]:
    """A failure: one line on stderr, with ``--json`` the error document on stdout, exit 1."""
    try:
        yield
    except CliFailure as exc:
        raise _exit(exc.code, exc.message, as_json) from None
    except TenantctlError as exc:  # e.g. dev tokens refused in production
        raise _exit(exc.code, exc.message, as_json) from None


def _exit(code: str, message: str, as_json: bool) -> typer.Exit:
    console.print(f"[red]error:[/red] {message}")
    if as_json:
        print_json({"error": {"code": code, "message": message}})
    return typer.Exit(1)


def new_idempotency_key() -> str:
    """A key for one invocation: its retries share it, no other invocation does."""
    return f"tenantctl-cli-create-{uuid.uuid4().hex}"


# A create without an answer is retried with its key: 4 attempts, 0.5, 1 and 2 s apart.
RETRY_ATTEMPTS = 4
RETRY_WAIT: wait_base = wait_exponential(multiplier=0.5, max=2.0)


def _unanswered(response: httpx.Response) -> bool:
    """No answer to the request yet: it failed before its result, or is still running."""
    if response.status_code >= 500:
        return True
    if response.status_code != 409:
        return False
    try:
        return bool(response.json()["error"]["code"] == "idempotency_in_flight")
    except (ValueError, KeyError, TypeError):
        return False


def _admin_url(settings: ControlPlaneSettings) -> str:
    if settings.admin_url:
        return settings.admin_url.rstrip("/")
    info = StackInfo.read(settings.state_dir)
    if info is None:
        raise _fail(
            f"no tenantctl stack is running from {settings.state_dir.resolve()}; "
            "start one with `tenantctl up`, or set TENANTCTL_ADMIN_URL",
            "no_stack",
        )
    return info.admin_url


def _client(state_dir: Path | None) -> httpx.Client:
    settings = load_settings(state_dir)
    token = keys.admin_token(settings, subject=CLI_SUBJECT, ttl=600)
    return httpx.Client(base_url=_admin_url(settings), headers={"Authorization": f"Bearer {token}"}, timeout=30)


def _send(client: httpx.Client, method: str, path: str, **kwargs: Any) -> httpx.Response:
    try:
        return client.request(method, path, **kwargs)
    except httpx.HTTPError as exc:
        raise _fail(f"cannot reach the admin API at {client.base_url}: {exc}", "admin_api_unreachable") from None


def _send_idempotent(client: httpx.Client, method: str, path: str, *, key: str, **kwargs: Any) -> httpx.Response:
    """``_send`` with ``Idempotency-Key: key``, retried (same key) while there is no answer."""
    headers = {**kwargs.pop("headers", {}), "Idempotency-Key": key}
    retrying = Retrying(
        stop=stop_after_attempt(RETRY_ATTEMPTS),
        wait=RETRY_WAIT,
        retry=retry_if_exception_type(CliFailure) | retry_if_result(_unanswered),
        # The last attempt's answer (or its failure) as it is, not a RetryError.
        retry_error_callback=lambda state: state.outcome.result() if state.outcome is not None else None,
    )
    response: httpx.Response = retrying(_send, client, method, path, headers=headers, **kwargs)
    return response


def _checked(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
            message = f"{error['message']} ({error['code']}, HTTP {response.status_code})"
            code = str(error["code"])
        except (ValueError, KeyError, TypeError):
            message, code = f"HTTP {response.status_code}", "http_error"
        raise _fail(message, code)
    return response.json()


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    return _checked(_send(client, method, path, **kwargs))


def _tenant_table(tenants: list[dict[str, Any]]) -> Table:
    table = Table("slug", "id", "name", "tier", "status", "placement", "location", "epoch")
    for t in tenants:
        placement = t["placement"]
        table.add_row(
            t["slug"],
            t["id"],
            t["name"],
            t["tier"],
            t["status"],
            placement["kind"],
            placement["location"] or "",
            str(t["route_epoch"]),
        )
    return table


def _job_table(job: dict[str, Any]) -> Table:
    table = Table("job", "kind", "status", "step", "progress", "error")
    table.add_row(
        job["id"],
        job["kind"],
        job["status"],
        job["step"] or "",
        f"{job['progress'] * 100:.0f}%",
        job["error"] or "",
    )
    return table


def _wait(client: httpx.Client, job: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while job["status"] in ("pending", "running") and time.monotonic() < deadline:
        time.sleep(0.5)
        job = _call(client, "GET", f"/v1/jobs/{job['id']}")
    return job


def _show_job(job: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json({"job": job})
    else:
        out.print(_job_table(job))
    if job["status"] == "failed":
        raise typer.Exit(1)


@tenants_app.command("list")
def list_tenants(
    status: Annotated[str | None, typer.Option(help="Filter by status.")] = None,
    tier: Annotated[str | None, typer.Option(help="Filter by tier.")] = None,
    placement: Annotated[str | None, typer.Option(help="pool or silo.")] = None,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """List tenants (every page)."""
    params = {k: v for k, v in (("status", status), ("tier", tier), ("placement", placement)) if v}
    tenants: list[dict[str, Any]] = []
    with _reported(as_json), _client(state_dir) as client:
        cursor: str | None = None
        while True:
            page = _call(
                client,
                "GET",
                "/v1/tenants",
                params={**params, "limit": 200, **({"cursor": cursor} if cursor else {})},
            )
            tenants += page["data"]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    if as_json:
        print_json({"data": tenants})
    else:
        out.print(_tenant_table(tenants))


@tenants_app.command("show")
def show(tenant: TenantArg, state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Show one tenant."""
    with _reported(as_json), _client(state_dir) as client:
        document = _call(client, "GET", f"/v1/tenants/{tenant}")
    if as_json:
        print_json(document)
    else:
        out.print(_tenant_table([document]))


@tenants_app.command("create")
def create(
    slug: Annotated[str, typer.Argument(help="URL-safe name, e.g. acme.")],
    name: Annotated[str | None, typer.Option(help="Display name (default: the slug).")] = None,
    tier: Annotated[str, typer.Option(help="Tier; the placement policy maps it to pool or silo.")] = "free",
    wait: WaitFlag = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="Key of this request; reuse it to make a re-run the same request (default: random).",
        ),
    ] = None,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Onboard a tenant (a silo tenant's onboarding job runs in the background; --wait waits).

    Retried with one key while unanswered; across re-runs only with --idempotency-key (see the module doc).
    """
    body = {"slug": slug, "name": name or slug, "tier": tier}
    key = idempotency_key or new_idempotency_key()
    with _reported(as_json), _client(state_dir) as client:
        response = _send_idempotent(client, "POST", "/v1/tenants", key=key, json=body)
        document = _checked(response)
        job_id = response.headers.get("X-Tenantctl-Job")
        if wait and job_id:
            job = _wait(client, _call(client, "GET", f"/v1/jobs/{job_id}"))
            document = _call(client, "GET", f"/v1/tenants/{document['id']}")
            if job["status"] != "succeeded":
                raise _fail(f"onboarding job {job_id} {job['status']}: {job['error'] or ''}", "job_failed")
    if as_json:
        print_json({**document, **({"job_id": job_id} if job_id else {})})
    else:
        out.print(_tenant_table([document]))
        if job_id:
            out.print(f"onboarding job {job_id}")


def _transition(verb: str, tenant: str, state_dir: Any, as_json: bool) -> None:
    with _reported(as_json), _client(state_dir) as client:
        document = _call(client, "POST", f"/v1/tenants/{tenant}/{verb}")
    if as_json:
        print_json(document)
    else:
        out.print(_tenant_table([document]))


@tenants_app.command("suspend")
def suspend(tenant: TenantArg, state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Suspend a tenant (its API calls answer 403 tenant_suspended)."""
    _transition("suspend", tenant, state_dir, as_json)


@tenants_app.command("resume")
def resume(tenant: TenantArg, state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Resume a suspended tenant."""
    _transition("resume", tenant, state_dir, as_json)


@tenants_app.command("offboard")
def offboard(
    tenant: TenantArg,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    wait: WaitFlag = False,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Export the tenant's rows, delete them (or drop its silo), then tombstone it."""
    if not yes and not typer.confirm(f"offboard {tenant}? its data will be exported, then deleted"):
        raise typer.Exit(1)
    with _reported(as_json), _client(state_dir) as client:
        job = _call(client, "DELETE", f"/v1/tenants/{tenant}")["job"]
        if wait:
            job = _wait(client, job)
    _show_job(job, as_json)


def _move(verb: str, tenant: str, body: dict[str, Any], wait: bool, state_dir: Any, as_json: bool) -> None:
    with _reported(as_json), _client(state_dir) as client:
        response = _send(client, "POST", f"/v1/tenants/{tenant}/{verb}", json=body)
        if response.status_code in (404, 405):
            # Tell "no such tenant" apart from "this server has no such verb yet".
            _call(client, "GET", f"/v1/tenants/{tenant}")
            if f"/v1/tenants/{{tenant}}/{verb}" not in _call(client, "GET", "/openapi.json")["paths"]:
                message = f"`{verb}` is not available yet on this control plane (it arrives with moves)"
                raise _fail(message, "unsupported")
        job = _checked(response)["job"]
        if wait:
            job = _wait(client, job)
    _show_job(job, as_json)


@tenants_app.command("promote")
def promote(
    tenant: TenantArg,
    mode: Annotated[str | None, typer.Option(help="online (logical replication) or offline.")] = None,
    wait: WaitFlag = False,
    state_dir: StateDir = None,
    as_json: JsonFlag = False,
) -> None:
    """Move a pool tenant into its own silo."""
    _move("promote", tenant, {"mode": mode} if mode else {}, wait, state_dir, as_json)


@tenants_app.command("demote")
def demote(tenant: TenantArg, wait: WaitFlag = False, state_dir: StateDir = None, as_json: JsonFlag = False) -> None:
    """Move a silo tenant back into the pool."""
    _move("demote", tenant, {}, wait, state_dir, as_json)
