"""The control plane's own silo connections take the owner's password from the silo's secret.

RDS silos record DSNs without passwords and name the master secret in the
location's detail. The silo here makes its "master" authenticate for real
(``tests.harness.scram_role``); the secret store is the project's
``StaticSecretStore`` standing in for Secrets Manager (whose client is tested
against botocore's Stubber in tests/provisioning).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import psycopg
import pytest

from control_plane.doctor import run_doctor
from control_plane.fleet import Drift, status_of
from control_plane.fleet.targets import load_targets
from control_plane.moves import engine
from control_plane.moves.engine import Side
from control_plane.provisioning import credentials
from data_plane.dsn import libpq, with_user
from data_plane.secrets import StaticSecretStore
from tests.fleet.conftest import Fleet, revision_of
from tests.harness import PgServers, scram_role, unique_name

PASSWORD = "silo-master-password"
REF = "arn:aws:secretsmanager:eu-west-1:000000000000:secret:tenantctl/silos/silo-x/master-Ab12Cd"


def test_fleet_doctor_and_moves_read_the_master_secret(
    fleet: Fleet, scripts: str, pg_servers: PgServers, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pg_servers.embedded is None:
        pytest.skip("needs the embedded silo server, whose pg_hba.conf this test edits")
    silo = fleet.add_silos(1)[0]
    role = unique_name("tc_master")
    with scram_role(pg_servers.silo_admin, role, PASSWORD, member_of=pg_servers.roles.owner):
        master_dsn = with_user(silo.dsn, role)
        with psycopg.connect(libpq(fleet.catalog), autocommit=True) as cat:
            cat.execute(
                "UPDATE locations SET dsn = %s, detail = %s::jsonb WHERE name = %s",
                (master_dsn, json.dumps({credentials.MASTER_SECRET: REF}), silo.location),
            )
        targets = load_targets(fleet.catalog, fleet.pool)
        assert [t.secret_ref for t in targets] == [None, REF]
        assert PASSWORD not in targets[1].dsn

        # Without the secret: the silo is reported unreachable, alone; nothing crashes.
        monkeypatch.setattr(credentials, "default_store", lambda: StaticSecretStore({}))
        missing = {s.target: s for s in status_of(targets, script_location=scripts).states}
        assert missing[silo.location].drift == Drift.UNREACHABLE
        assert missing["pool"].drift != Drift.UNREACHABLE  # control
        doctor = run_doctor(catalog_dsn=fleet.catalog, pool_dsn=fleet.pool, app_role=pg_servers.roles.app)
        silo_report = next(r for r in doctor["targets"] if r["name"] == silo.location)
        assert [f["check"] for f in silo_report["findings"]] == ["reachable"]

        # With it: the same probe reads the silo's revision through the master's password.
        store = StaticSecretStore({REF: json.dumps({"username": role, "password": PASSWORD})})
        monkeypatch.setattr(credentials, "default_store", lambda: store)
        report = status_of(targets, script_location=scripts)
        found = {s.target: s for s in report.states}
        assert found[silo.location].drift != Drift.UNREACHABLE, found[silo.location].error
        assert found[silo.location].revision == revision_of(silo.dsn)
        assert PASSWORD not in json.dumps(report.to_json())
        doctor = run_doctor(catalog_dsn=fleet.catalog, pool_dsn=fleet.pool, app_role=pg_servers.roles.app)
        assert PASSWORD not in json.dumps(doctor)
        silo_report = next(r for r in doctor["targets"] if r["name"] == silo.location)
        assert "reachable" not in [f["check"] for f in silo_report["findings"]]

        # A move's side: checkpointed without the password, connects with it.
        side = Side(
            kind="silo",
            location_id="x",
            owner_dsn=master_dsn,
            admin_dsn=master_dsn,
            replication_conninfo=with_user(silo.dsn, pg_servers.roles.replication),
            owner_secret=REF,
        )
        assert PASSWORD not in json.dumps(asdict(side))
        with engine.connect(side.owner()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        with engine.connect(side.admin()) as conn:
            assert conn.execute("SELECT current_user").fetchone() == (role,)
        # The check can fail: the stored DSN alone is refused.
        with pytest.raises(psycopg.OperationalError, match="password"), engine.connect(side.owner_dsn):
            pass
