"""docker-compose.yml: valid against the Compose Specification, and shaped as the ops docs say.

No Docker engine exists here, so the file is validated offline against the
compose-spec JSON schema vendored by ``check-jsonschema`` (a dev dependency;
schema from github.com/compose-spec/compose-spec, Apache-2.0, license shipped
beside it in the package).
"""

from __future__ import annotations

import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
VARIABLE = re.compile(r"\$\{([A-Z0-9_]+)(:?[?-])?([^}]*)\}")
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|_KEY$", re.I)
URL_PASSWORD = re.compile(r"://[^:/@\s]+:([^@\s]+)@")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(document, dict)
    return document


def compose_schema() -> dict[str, Any]:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendor / "compose-spec.json").read_text())
    return schema


def test_valid_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors)


def test_the_validator_rejects_a_broken_file(compose: dict[str, Any]) -> None:
    # Control: the schema is not so loose that anything passes.
    schema = compose_schema()
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["depends_on"]["bootstrap"]["condition"] = "whenever"
    broken["services"]["catalog-db"]["healthcheck"]["interval"] = {"seconds": 5}
    assert len(list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))) >= 2


def _command(service: dict[str, Any]) -> str:
    command = service.get("command", "")
    return " ".join(command) if isinstance(command, list) else str(command)


def test_services_replicas_healthchecks_and_dependencies(compose: dict[str, Any]) -> None:
    services: dict[str, dict[str, Any]] = compose["services"]
    data_planes = [name for name, s in services.items() if "data_plane.api:create_app" in _command(s)]
    assert len(data_planes) == 2
    assert {s["ports"][0].split(":")[0] for s in (services[n] for n in data_planes)} == {"8000", "8010"}
    postgres = [name for name, s in services.items() if str(s.get("image", "")).startswith("postgres:16")]
    assert sorted(postgres) == ["catalog-db", "silo-db"]
    for name in postgres:
        assert "wal_level=logical" in _command(services[name])
    assert "control_plane.deploy:admin_app" in _command(services["control-plane"])
    assert _command(services["worker"]).startswith("tenantctl worker")
    for name, service in services.items():
        if name == "bootstrap":  # a one-shot job: others wait for it to complete
            assert service["restart"] == "no"
            continue
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    conditions = {"service_healthy", "service_completed_successfully", "service_started"}
    for name, service in services.items():
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in services
            assert spec["condition"] in conditions, (name, dependency)
    for name in [*data_planes, "control-plane", "worker"]:
        assert services[name]["depends_on"]["bootstrap"]["condition"] == "service_completed_successfully"
        assert services[name]["depends_on"]["catalog-db"]["condition"] == "service_healthy"
    for name in data_planes:
        env = services[name]["environment"]
        assert env["TENANTCTL_REDIS_URL"].startswith("redis://redis:")  # limits shared by both replicas
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


def _environment_values(compose: dict[str, Any]) -> list[tuple[str, str, str]]:
    found = []
    for name, service in compose["services"].items():
        env = service.get("environment", {})
        assert isinstance(env, dict), f"{name}: use a mapping for environment"
        found += [(name, key, str(value)) for key, value in env.items()]
    return found


def test_no_literal_secrets(compose: dict[str, Any]) -> None:
    values = _environment_values(compose)
    checked = 0
    for service, key, value in values:
        if SECRET_NAME.search(key):
            match = VARIABLE.fullmatch(value)
            assert match is not None and match.group(2) in (":?", "?"), f"{service}.{key} must be ${{VAR:?}}"
            checked += 1
        for password in URL_PASSWORD.findall(value):
            match = VARIABLE.fullmatch(password)
            assert match is not None and match.group(2) in (":?", "?"), f"{service}.{key} has a literal password"
            checked += 1
    assert checked >= 10  # control: the scan did look at the secrets
    # Every variable a secret depends on is required, never defaulted to a value.
    text = COMPOSE.read_text()
    for name, operator, _ in VARIABLE.findall(text):
        if SECRET_NAME.search(name):
            assert operator in (":?", "?"), f"${{{name}}} must be required"


def test_dockerfile_runs_unprivileged() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M)
    assert "pip install ." in dockerfile
