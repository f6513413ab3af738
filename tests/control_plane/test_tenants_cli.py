"""`tenantctl tenants ...` against a live admin API (uvicorn in a thread) and the session executor."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from control_plane.api import create_app
from control_plane.cli import app as cli_app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from control_plane.workflows.executor import Executor

pytestmark = pytest.mark.slow


@pytest.fixture
def admin_url(executor: Executor, wf_settings: ControlPlaneSettings, wf_endpoints: Endpoints) -> Iterator[str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(create_app(wf_settings, wf_endpoints), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_tenants_cli_round_trip(admin_url: str, wf_settings: ControlPlaneSettings) -> None:
    runner = CliRunner()
    env = {
        "TENANTCTL_ADMIN_URL": admin_url,
        "TENANTCTL_STATE_DIR": str(wf_settings.state_dir),
        "TENANTCTL_ENVIRONMENT": "test",
    }

    def doc(text: str) -> Any:
        # The session executor runs in this process and logs (structlog) to the
        # same captured stdout; a real CLI process prints only its document.
        start = text.index("{") if text.startswith("{") else text.index("\n{") + 1
        return json.JSONDecoder().raw_decode(text[start:])[0]

    def run(*args: str, ok: bool = True) -> str:
        result = runner.invoke(cli_app, ["tenants", *args], env=env)
        assert (result.exit_code == 0) is ok, result.output
        return result.stdout

    slug = f"cli-{uuid.uuid4().hex[:8]}"
    created = doc(run("create", slug, "--name", "Cli Co", "--tier", "standard", "--json"))
    assert created["status"] == "active"
    assert created["placement"]["kind"] == "pool"
    assert doc(run("show", slug, "--json"))["id"] == created["id"]
    assert slug in [t["slug"] for t in doc(run("list", "--tier", "standard", "--json"))["data"]]
    table = run("list", "--tier", "standard")  # the human table
    assert "slug" in table
    assert "active" in table
    assert doc(run("suspend", slug, "--json"))["status"] == "suspended"
    assert doc(run("resume", slug, "--json"))["status"] == "active"
    run("resume", slug, ok=False)  # illegal transition: a one-line error, exit 1

    silo = doc(run("create", f"{slug}-big", "--tier", "enterprise", "--wait", "--json"))
    assert silo["status"] == "active"
    assert silo["placement"]["kind"] == "silo"

    # Whether or not moves are deployed, an unknown tenant is a one-line error.
    failed = runner.invoke(cli_app, ["tenants", "promote", "no-such-tenant"], env=env)
    assert failed.exit_code == 1
    assert "tenant not found" in failed.output

    job = doc(run("offboard", slug, "--yes", "--wait", "--json"))["job"]
    assert job["status"] == "succeeded"
    assert doc(run("show", slug, "--json"))["status"] == "deleted"
    # The same create again is a new request: refused, not the first create's 201 "active" replayed.
    again = runner.invoke(cli_app, ["tenants", "create", slug, "--name", "Cli Co", "--tier", "standard"], env=env)
    assert again.exit_code == 1 and "slug_taken" in again.output, again.output
    assert doc(run("show", slug, "--json"))["status"] == "deleted"


def test_create_is_idempotent_across_reruns_with_a_key_and_failures_print_a_json_error(
    admin_url: str, wf_settings: ControlPlaneSettings, tmp_path: Any
) -> None:
    runner = CliRunner()
    env = {
        "TENANTCTL_ADMIN_URL": admin_url,
        "TENANTCTL_STATE_DIR": str(wf_settings.state_dir),
        "TENANTCTL_ENVIRONMENT": "test",
    }

    def invoke(*args: str, environment: dict[str, str] = env) -> tuple[int, Any]:
        result = runner.invoke(cli_app, ["tenants", *args], env=environment)
        text = result.stdout
        start = text.index("{") if text.startswith("{") else text.index("\n{") + 1
        return result.exit_code, json.JSONDecoder().raw_decode(text[start:])[0]

    slug = f"rerun-{uuid.uuid4().hex[:8]}"
    rerun = ("create", slug, "--tier", "enterprise", "--idempotency-key", f"rerun-{slug}", "--json")
    code, first = invoke(*rerun)
    assert code == 0 and first["status"] == "provisioning" and first["job_id"]
    # The operator's terminal died; the same command with the same key is the same request.
    code, again = invoke(*rerun)
    assert code == 0, again
    assert (again["id"], again["job_id"]) == (first["id"], first["job_id"])
    code, listed = invoke("list", "--json")
    assert [t["slug"] for t in listed["data"]].count(slug) == 1
    # Without a key each invocation is a request of its own: this one is refused.
    code, unkeyed = invoke("create", slug, "--tier", "enterprise", "--json")
    assert code == 1 and unkeyed["error"]["code"] == "slug_taken"

    # Control: a different request under the same slug is still refused, as JSON.
    code, other = invoke("create", slug, "--name", "Someone Else", "--json")
    assert code == 1 and other["error"]["code"] == "slug_taken"
    # An explicit key: re-runs replay; reused for another request, the API's 422, as JSON.
    key = f"key-{slug}"
    code, keyed = invoke("create", f"{slug}-k", "--idempotency-key", key, "--json")
    assert code == 0 and keyed["status"] == "active"
    code, replayed = invoke("create", f"{slug}-k", "--idempotency-key", key, "--json")
    assert code == 0 and replayed["id"] == keyed["id"]
    code, clash = invoke("create", f"{slug}-k2", "--idempotency-key", key, "--json")
    assert code == 1 and clash["error"]["code"] == "idempotency_key_reused"

    code, missing = invoke("show", "no-such-tenant", "--json")
    assert code == 1 and missing["error"]["code"] == "not_found"
    no_stack = {"TENANTCTL_STATE_DIR": str(tmp_path / "nothing"), "TENANTCTL_ENVIRONMENT": "test"}
    code, unreachable = invoke("list", "--json", environment=no_stack)
    assert code == 1 and unreachable["error"]["code"] == "no_stack"
