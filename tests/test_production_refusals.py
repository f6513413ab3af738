"""TENANTCTL_ENVIRONMENT=production refuses the dev conveniences: embedded PostgreSQL and dev-key tokens.

Each refusal is a clear message and a non-zero exit on the CLI, never a
traceback; each is paired with the dev/test control that is allowed.
"""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pydantic import ValidationError
from typer.testing import CliRunner

from control_plane.cli import app
from control_plane.settings import ControlPlaneSettings
from data_plane.settings import DataPlaneSettings

URLS = {
    # Nothing listens on port 1: a command that reached a database would fail differently.
    "TENANTCTL_CATALOG_URL": "postgresql://owner@127.0.0.1:1/catalog",
    "TENANTCTL_POOL_URL": "postgresql://owner@127.0.0.1:1/pool",
    "TENANTCTL_SILO_SERVER_URL": "postgresql://admin@127.0.0.1:1/postgres",
}


@pytest.fixture
def production(tmp_path: Path) -> dict[str, str]:
    """A production environment that is otherwise valid: the IdP's public key and issuer."""
    public = ec.generate_private_key(ec.SECP256R1()).public_key()
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    return {
        "TENANTCTL_ENVIRONMENT": "production",
        "TENANTCTL_JWT_PUBLIC_KEY": pem,
        "TENANTCTL_JWT_ISSUER": "https://idp.example",
        "TENANTCTL_STATE_DIR": str(tmp_path / "state"),
    }


def _settings_kwargs(env: dict[str, str]) -> dict[str, str]:
    return {key.removeprefix("TENANTCTL_").lower(): value for key, value in env.items()}


def test_settings_refuse_the_embedded_fallback_in_production(production: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match="embedded PostgreSQL"):
        ControlPlaneSettings(**_settings_kwargs(production))
    with pytest.raises(ValidationError, match="embedded PostgreSQL"):
        DataPlaneSettings(**_settings_kwargs(production))
    # Controls: with URLs production is accepted, and dev may stay embedded.
    assert ControlPlaneSettings(**_settings_kwargs(production | URLS)).is_production
    app_urls = {
        "TENANTCTL_APP_CATALOG_URL": URLS["TENANTCTL_CATALOG_URL"],
        "TENANTCTL_APP_POOL_URL": URLS["TENANTCTL_POOL_URL"],
    }
    assert DataPlaneSettings(**_settings_kwargs(production | app_urls)).is_production
    assert ControlPlaneSettings(environment="dev").embedded


def _invoke(env: dict[str, str], *args: str) -> tuple[int, str, str, BaseException | None]:
    result = CliRunner().invoke(app, list(args), env=env)
    return result.exit_code, result.stdout, result.stderr, result.exception


def test_up_refuses_to_start_embedded_postgres_in_production(production: dict[str, str], tmp_path: Path) -> None:
    code, _, stderr, exception = _invoke(production, "up", "--api-port", "1", "--admin-port", "1")
    assert code == 1
    assert isinstance(exception, SystemExit)  # a message, not a traceback
    assert "embedded PostgreSQL" in stderr and "development only" in stderr
    assert not (tmp_path / "state" / "pg").exists()  # nothing was started


def test_dev_tokens_are_refused_in_production(production: dict[str, str]) -> None:
    env = production | URLS
    for command in (["token", "admin"], ["token", "tenant", "--tenant", "acme"]):
        code, stdout, stderr, exception = _invoke(env, *command)
        assert code == 1, command
        assert isinstance(exception, SystemExit), command
        assert "not minted in production" in stderr, command
        assert stdout == "", command  # no token
    # A production environment without the IdP key is a configuration error, said so.
    incomplete = {k: v for k, v in env.items() if k != "TENANTCTL_JWT_PUBLIC_KEY"}
    code, _, stderr, exception = _invoke(incomplete, "token", "admin")
    assert code == 1 and isinstance(exception, SystemExit)
    assert "invalid configuration" in stderr and "TENANTCTL_JWKS_URL" in stderr


def test_dev_tokens_are_minted_outside_production(tmp_path: Path) -> None:
    env = {"TENANTCTL_ENVIRONMENT": "test", "TENANTCTL_STATE_DIR": str(tmp_path / "state")}
    code, stdout, _, _ = _invoke(env, "token", "admin")
    assert code == 0
    claims = jwt.decode(stdout.strip(), options={"verify_signature": False})
    assert claims["aud"] == "tenantctl-admin"
