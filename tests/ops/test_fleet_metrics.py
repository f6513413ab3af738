"""``tenantctl migrate`` leaves its result for Prometheus' textfile collector."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from control_plane.cli import app
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints


def test_migrate_writes_its_results_as_metrics(
    cp_settings: ControlPlaneSettings, endpoints: Endpoints, tmp_path: Path
) -> None:
    textfile = tmp_path / "tenantctl_fleet.prom"
    env = {
        "TENANTCTL_CATALOG_URL": endpoints.catalog_url,
        "TENANTCTL_POOL_URL": endpoints.pool_url,
        "TENANTCTL_SILO_SERVER_URL": endpoints.silo_server_url,
        "TENANTCTL_STATE_DIR": str(cp_settings.state_dir),
    }
    result = CliRunner().invoke(app, ["migrate", "upgrade", "--json"], env=env)
    assert result.exit_code == 0, result.output
    assert not textfile.exists()  # control: nothing written unless configured
    result = CliRunner().invoke(
        app, ["migrate", "upgrade", "--json"], env={**env, "TENANTCTL_METRICS_TEXTFILE": str(textfile)}
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)["summary"]
    text = textfile.read_text()
    expected = 'tenantctl_fleet_migration_targets{action="upgrade",kind="pool",status="skipped-up-to-date"}'
    assert f"{expected} {float(summary['skipped-up-to-date'])}" in text
    assert "tenantctl_fleet_migration_failed 0.0" in text
    assert "tenantctl_fleet_migration_last_run_timestamp_seconds" in text
