"""Token verification: every problem is a 401 with a stable code, never a 500."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import ValidationError

from control_plane import keys
from data_plane.auth import TokenVerifier
from data_plane.exceptions import AuthenticationError
from data_plane.settings import CommonSettings, DataPlaneSettings, Environment
from tests.data_plane.conftest import World


def _claims(settings: CommonSettings, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": "user-1",
        "tenant_id": str(uuid.uuid4()),
        "iat": now,
        "exp": now + 300,
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _dev_sign(settings: CommonSettings, claims: dict[str, Any], **kw: Any) -> str:
    return jwt.encode(claims, settings.dev_private_key_path.read_bytes(), algorithm="ES256", **kw)


@pytest.fixture
def verifier(dp_settings: DataPlaneSettings) -> TokenVerifier:
    return TokenVerifier(dp_settings, audience=dp_settings.jwt_audience, require_tenant=True)


async def test_valid_token_yields_the_tenant(verifier: TokenVerifier, dp_settings: DataPlaneSettings) -> None:
    claims = _claims(dp_settings)
    principal = await verifier.verify(_dev_sign(dp_settings, claims))
    assert principal.tenant_id == uuid.UUID(claims["tenant_id"])
    assert principal.subject == "user-1"


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"exp": int(time.time()) - 3600}, "token_expired"),
        ({"aud": "tenantctl-admin"}, "invalid_audience"),
        ({"iss": "someone-else"}, "invalid_issuer"),
        ({"tenant_id": None}, "missing_claim"),
        ({"exp": None}, "missing_claim"),
        ({"sub": None}, "missing_claim"),
        ({"tenant_id": "not-a-uuid"}, "invalid_claim"),
        ({"tenant_id": 12345}, "invalid_claim"),
        ({"sub": ""}, "invalid_claim"),
    ],
)
async def test_claim_problems_are_401(
    verifier: TokenVerifier, dp_settings: DataPlaneSettings, overrides: dict[str, Any], code: str
) -> None:
    token = _dev_sign(dp_settings, _claims(dp_settings, **overrides))
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify(token)
    assert info.value.code == code
    assert info.value.status_code == 401


async def test_forged_and_malformed_tokens_are_401(verifier: TokenVerifier, dp_settings: DataPlaneSettings) -> None:
    claims = _claims(dp_settings)
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(claims, other_key, algorithm="ES256")
    unsigned = jwt.encode(claims, key=None, algorithm="none")  # type: ignore[arg-type]
    hs = jwt.encode(claims, "a" * 40, algorithm="HS256")
    tampered_parts = _dev_sign(dp_settings, claims).split(".")
    payload = jwt.utils.base64url_encode(json.dumps(claims | {"tenant_id": str(uuid.uuid4())}).encode())
    tampered = ".".join([tampered_parts[0], payload.decode(), tampered_parts[2]])
    for token, code in [
        (forged, "invalid_signature"),
        (unsigned, "invalid_algorithm"),
        (hs, "invalid_algorithm"),
        (tampered, "invalid_signature"),
        ("garbage", "malformed_token"),
        ("a.b.c", "malformed_token"),
    ]:
        with pytest.raises(AuthenticationError) as info:
            await verifier.verify(token)
        assert info.value.code == code, token


async def test_hs256_only_when_configured(dp_settings: DataPlaneSettings) -> None:
    secret = "s" * 40
    settings = DataPlaneSettings(**{**dp_settings.model_dump(), "jwt_hs256_secret": secret})
    verifier = TokenVerifier(settings, audience=settings.jwt_audience, require_tenant=True)
    claims = _claims(settings)
    assert (await verifier.verify(jwt.encode(claims, secret, algorithm="HS256"))).tenant_id is not None
    with pytest.raises(AuthenticationError):
        await verifier.verify(jwt.encode(claims, "t" * 40, algorithm="HS256"))


async def test_configured_rsa_public_key(dp_settings: DataPlaneSettings) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    settings = DataPlaneSettings(**{**dp_settings.model_dump(), "jwt_public_key": pem.decode()})
    verifier = TokenVerifier(settings, audience=settings.jwt_audience, require_tenant=True)
    claims = _claims(settings)
    assert (await verifier.verify(jwt.encode(claims, key, algorithm="RS256"))).subject == "user-1"
    with pytest.raises(AuthenticationError) as info:  # the dev EC key no longer counts
        await verifier.verify(_dev_sign(settings, claims))
    assert info.value.code == "invalid_algorithm"


class _Jwks:
    def __init__(self) -> None:
        self.keys: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.fetches = 0

    def document(self) -> bytes:
        jwks = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
            jwks.append(jwk | {"kid": kid, "alg": "ES256", "use": "sig"})
        return json.dumps({"keys": jwks}).encode()


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, _Jwks]]:
    state = _Jwks()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.fetches += 1
            body = state.document()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/jwks.json", state
    finally:
        server.shutdown()
        server.server_close()


async def test_jwks_is_cached_and_a_rotated_key_is_fetched_once(
    dp_settings: DataPlaneSettings, jwks_server: tuple[str, _Jwks]
) -> None:
    url, jwks = jwks_server
    jwks.keys["k1"] = ec.generate_private_key(ec.SECP256R1())
    settings = DataPlaneSettings(**{**dp_settings.model_dump(), "jwks_url": url})
    verifier = TokenVerifier(settings, audience=settings.jwt_audience, require_tenant=True)
    claims = _claims(settings)
    for _ in range(3):
        await verifier.verify(jwt.encode(claims, jwks.keys["k1"], algorithm="ES256", headers={"kid": "k1"}))
    assert jwks.fetches == 1  # cached

    time.sleep(1.1)  # past the refresh cooldown
    jwks.keys["k2"] = ec.generate_private_key(ec.SECP256R1())
    token = jwt.encode(claims, jwks.keys["k2"], algorithm="ES256", headers={"kid": "k2"})
    assert (await verifier.verify(token)).subject == "user-1"
    assert jwks.fetches == 2  # unknown kid → exactly one refresh

    unknown = jwt.encode(claims, ec.generate_private_key(ec.SECP256R1()), algorithm="ES256", headers={"kid": "k9"})
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify(unknown)
    assert info.value.code == "invalid_signature"


async def test_http_auth_failures_are_401_json(client: httpx.AsyncClient, world: World) -> None:
    admin = keys.admin_token(world.settings)
    for headers in (
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic abc"},
        {"Authorization": f"Bearer {admin}"},
    ):
        response = await client.get("/v1/projects", headers=headers)
        assert response.status_code == 401, headers
        assert set(response.json()["error"]) == {"code", "message"}
    assert (await client.get("/v1/projects", headers=world["A"].headers)).status_code == 200


async def test_unknown_tenant_is_403(client: httpx.AsyncClient, world: World) -> None:
    token = keys.tenant_token(world.settings, tenant_id=uuid.uuid4())
    response = await client.get("/v1/projects", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "tenant_unknown"


def test_production_refuses_dev_key_and_default_secrets(tmp_path: Path) -> None:
    dev = CommonSettings(state_dir=tmp_path)
    keys.ensure_dev_key(dev)
    with pytest.raises(ValidationError, match="JWKS_URL or TENANTCTL_JWT_PUBLIC_KEY"):
        CommonSettings(state_dir=tmp_path, environment=Environment.PRODUCTION, jwt_issuer="https://idp")
    with pytest.raises(ValidationError, match="refuses the generated dev signing key"):
        CommonSettings(
            state_dir=tmp_path,
            environment=Environment.PRODUCTION,
            jwt_issuer="https://idp",
            jwt_public_key=dev.dev_public_key_path.read_text(),
        )
    with pytest.raises(ValidationError, match="HS256_SECRET is a default"):
        CommonSettings(
            state_dir=tmp_path,
            environment=Environment.PRODUCTION,
            jwt_issuer="https://idp",
            jwks_url="https://idp/jwks",
            jwt_hs256_secret="changeme",
        )
    with pytest.raises(ValidationError, match="TENANTCTL_JWT_ISSUER"):
        CommonSettings(state_dir=tmp_path, environment=Environment.PRODUCTION, jwks_url="https://idp/jwks")
    # control: a proper production configuration is accepted
    ok = CommonSettings(
        state_dir=tmp_path,
        environment=Environment.PRODUCTION,
        jwt_issuer="https://idp",
        jwks_url="https://idp/jwks",
    )
    assert ok.is_production
    with pytest.raises(RuntimeError):
        keys.admin_token(ok)
