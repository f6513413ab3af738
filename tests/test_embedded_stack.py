"""The embedded stack: start, reuse, crash recovery, `tenantctl up` (its in-process executor) and Ctrl-C."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import psycopg
import pytest

from control_plane import keys
from control_plane.dev import EmbeddedCluster, EmbeddedStack
from control_plane.exceptions import StackAlreadyRunningError
from control_plane.settings import ControlPlaneSettings

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _postgres_processes(pgdata: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].endswith("postgres") and str(pgdata) in cmdline:
            found.append(proc)
    return found


def _described(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return f"pid {proc.pid} ppid {proc.ppid()} {proc.status()}: {' '.join(proc.cmdline())}"
    return f"pid {proc.pid} (gone)"


def test_cluster_start_is_reused_and_recovers_a_stale_pid_file(tmp_path: Path) -> None:
    cluster = EmbeddedCluster(tmp_path / "c", fast=True)
    try:
        assert cluster.start() is True
        assert cluster.start() is False  # second start reuses the running server
        with psycopg.connect(cluster.dsn()) as conn:
            assert conn.execute("SHOW wal_level").fetchone() == ("logical",)

        # Simulate a crash: kill -9 the postmaster; the pid file survives and
        # then names a PID that is not a postmaster of this data directory.
        pid = cluster.running_pid()
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        psutil.Process(pid).wait(10)
        for child in _postgres_processes(cluster.pgdata):
            child.kill()
        pid_file = cluster.pgdata / "postmaster.pid"
        lines = pid_file.read_text().splitlines()
        lines[0] = str(os.getpid())  # a live process that is not postgres
        pid_file.write_text("\n".join(lines) + "\n")

        assert cluster.start() is True
        with psycopg.connect(cluster.dsn()) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        cluster.stop()
    assert cluster.running_pid() is None


def test_second_holder_of_the_state_dir_is_refused(tmp_path: Path) -> None:
    stack = EmbeddedStack(tmp_path / "state")
    with stack.exclusive(), pytest.raises(StackAlreadyRunningError, match="already running"):  # noqa: SIM117
        with EmbeddedStack(tmp_path / "state").exclusive():
            pass
    with stack.exclusive():  # released: a later `up` may take it (control)
        pass


def _in_process_executor_runs_an_onboarding(state: Path, admin_port: int) -> None:
    """`up` runs a job executor in-process: a silo tenant's onboarding job finishes."""
    token = keys.admin_token(ControlPlaneSettings(state_dir=state, environment="dev"))
    with httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", headers={"Authorization": f"Bearer {token}"}) as admin:
        created = admin.post("/v1/tenants", json={"slug": "bigco", "name": "Big Co", "tier": "enterprise"})
        assert created.status_code == 201, created.text
        assert created.json()["status"] == "provisioning"
        job_id = created.headers["X-Tenantctl-Job"]
        deadline = time.monotonic() + 90
        while (job := admin.get(f"/v1/jobs/{job_id}").json())["status"] in ("pending", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.2)
        assert job["status"] == "succeeded", (job["step"], job["error"])
        tenant = admin.get("/v1/tenants/bigco").json()
    assert tenant["status"] == "active" and tenant["placement"]["kind"] == "silo"


def test_tenantctl_up_serves_both_apis_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    state = tmp_path / "state"
    api_port, admin_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TENANTCTL_")}
    cmd = [sys.executable, "-m", "control_plane.cli", "up", "--state-dir", str(state)]
    proc = subprocess.Popen(
        [*cmd, "--api-port", str(api_port), "--admin-port", str(admin_port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 90
        healthy = False
        while time.monotonic() < deadline and not healthy:
            try:
                healthy = all(
                    httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
                    for port in (api_port, admin_port)
                )
            except httpx.HTTPError:
                time.sleep(0.2)
        assert healthy, "both APIs should answer /healthz"

        status = subprocess.run(
            [sys.executable, "-m", "control_plane.cli", "status", "--json", "--state-dir", str(state)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        document = json.loads(status.stdout)
        assert document["api_url"] == f"http://127.0.0.1:{api_port}"
        assert "tenantctl_app" in document["dsn"]["pool"]["app"]
        with psycopg.connect(document["dsn"]["pool"]["owner"]) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchone() is not None

        _in_process_executor_runs_an_onboarding(state, admin_port)

        second = subprocess.run(
            [*cmd, "--api-port", str(_free_port()), "--admin-port", str(_free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == 1
        assert "already running" in second.stderr

        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "admin token" in output
    assert proc.returncode == 0, output
    for cluster in ("main", "silos"):
        # pg_ctl -w returns once the pid file is gone; the postmaster exits a
        # moment later (once, on a loaded CI machine, more than 10 s later).
        _, alive = psutil.wait_procs(_postgres_processes(state.resolve() / "pg" / cluster), timeout=30)
        assert alive == [], (cluster, [_described(p) for p in alive])
    assert not (state / "stack.json").exists()
