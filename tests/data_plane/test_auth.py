"""Token verification: every problem is a 401 with a stable code, never a 500."""

from __future__ import annotations

import asyncio
import json
import socket
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
from data_plane.api import create_app
from data_plane.auth import TokenVerifier
from data_plane.exceptions import AuthenticationError, ForbiddenError, SigningKeysUnavailableError
from data_plane.settings import CommonSettings, DataPlaneSettings, Environment
from tests.data_plane.conftest import World
from tests.harness import asgi_client


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
        ({"iss": None}, "missing_claim"),
        ({"aud": None}, "missing_claim"),
        ({"tenant_id": "not-a-uuid"}, "invalid_claim"),
        ({"tenant_id": ""}, "invalid_claim"),
        ({"tenant_id": "12345678-1234-1234-1234-12345678901"}, "invalid_claim"),  # one digit short
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


async def test_leeway_accepts_slight_clock_skew_only(verifier: TokenVerifier, dp_settings: DataPlaneSettings) -> None:
    assert dp_settings.jwt_leeway_seconds == DataPlaneSettings.model_fields["jwt_leeway_seconds"].default
    now = int(time.time())
    just_expired = _dev_sign(dp_settings, _claims(dp_settings, exp=now - 5))
    assert (await verifier.verify(just_expired)).subject == "user-1"  # within the default leeway
    long_expired = _dev_sign(dp_settings, _claims(dp_settings, exp=now - 60))
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify(long_expired)
    assert info.value.code == "token_expired"


def _raw_token(header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A token with an arbitrary header (PyJWT's encoder would refuse some of these)."""
    parts = [jwt.utils.base64url_encode(json.dumps(part).encode()).decode() for part in (header, claims)]
    return ".".join([*parts, jwt.utils.base64url_encode(b"x" * 64).decode()])


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
        (_raw_token({"alg": "ES256", "kid": 7}, claims), "malformed_token"),
        (_raw_token({"alg": "ES256", "kid": ["k1"]}, claims), "malformed_token"),
        (_raw_token({"alg": "ES256", "crit": "exp"}, claims), "malformed_token"),
        (_raw_token({"alg": ["ES256"]}, claims), "invalid_algorithm"),
        (_raw_token({"typ": "JWT"}, claims), "invalid_algorithm"),
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
        self.keys: dict[str, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey] = {}
        self.with_alg = True  # publish each key's "alg" (else PyJWT derives it from "kty")
        self.body: bytes | None = None  # served instead of the key set when set
        self.status = 200
        self.fetches = 0

    def document(self) -> bytes:
        if self.body is not None:
            return self.body
        jwks = []
        for kid, key in self.keys.items():
            if isinstance(key, rsa.RSAPrivateKey):
                jwk, alg = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key())), "RS256"
            else:
                jwk, alg = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())), "ES256"
            jwks.append(jwk | {"kid": kid, "use": "sig"} | ({"alg": alg} if self.with_alg else {}))
        return json.dumps({"keys": jwks}).encode()


@pytest.fixture
def jwks_server() -> Iterator[tuple[str, _Jwks]]:
    state = _Jwks()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.fetches += 1
            body = state.document()
            self.send_response(state.status)
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


def _jwks_verifier(settings: DataPlaneSettings, url: str, **kw: Any) -> TokenVerifier:
    jwks_settings = DataPlaneSettings(**{**settings.model_dump(), "jwks_url": url})
    return TokenVerifier(jwks_settings, audience=jwks_settings.jwt_audience, require_tenant=True, **kw)


@pytest.mark.parametrize("with_alg", [True, False], ids=["jwk-alg", "alg-from-kty"])
async def test_jwks_header_algorithm_must_match_the_key(
    dp_settings: DataPlaneSettings, jwks_server: tuple[str, _Jwks], with_alg: bool
) -> None:
    url, jwks = jwks_server
    jwks.with_alg = with_alg
    ec_key, rsa_key = ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)
    jwks.keys |= {"k-ec": ec_key, "k-rsa": rsa_key}
    verifier = _jwks_verifier(dp_settings, url)
    claims = _claims(dp_settings)
    # Controls: each key verifies tokens of its own algorithm.
    assert (await verifier.verify(jwt.encode(claims, ec_key, "ES256", headers={"kid": "k-ec"}))).subject
    assert (await verifier.verify(jwt.encode(claims, rsa_key, "RS256", headers={"kid": "k-rsa"}))).subject
    # A header algorithm that names the other key type is a token problem (it
    # used to reach the RSA code with an EC key: TypeError, a 500).
    for token in (
        jwt.encode(claims, rsa_key, "RS256", headers={"kid": "k-ec"}),
        jwt.encode(claims, ec_key, "ES256", headers={"kid": "k-rsa"}),
        _raw_token({"alg": "RS256", "kid": "k-ec"}, claims),
        _raw_token({"alg": "HS256", "kid": "k-ec"}, claims),  # HS256 is not configured
    ):
        with pytest.raises(AuthenticationError) as info:
            await verifier.verify(token)
        assert (info.value.status_code, info.value.code) == (401, "invalid_algorithm")
    no_kid = jwt.encode(claims, ec_key, "ES256")
    with pytest.raises(AuthenticationError) as info:
        await verifier.verify(no_kid)
    assert info.value.code == "invalid_signature"


_EC_ENC = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (200, b'{"keys": []}'),  # PyJWKSetError
        (200, b"{}"),
        (200, b'{"keys": [{"kty": "XYZ", "kid": "k1"}]}'),  # no usable key
        (200, b'{"keys": "k1"}'),
        (200, json.dumps({"keys": [_EC_ENC | {"kid": "k1", "use": "enc"}]}).encode()),  # no signing key
        (200, b"<html>maintenance</html>"),  # not JSON
        (200, b"\xff\xfe"),  # not even text
        (200, b"[1, 2]"),  # JSON, not an object
        (500, b"oops"),
        (302, b""),  # redirects are not followed
    ],
    ids=["empty", "no-keys", "unsupported", "keys-not-list", "enc-only", "html", "binary", "array", "500", "302"],
)
async def test_broken_key_source_is_503_then_recovers(
    dp_settings: DataPlaneSettings, jwks_server: tuple[str, _Jwks], status: int, body: bytes
) -> None:
    url, jwks = jwks_server
    key = ec.generate_private_key(ec.SECP256R1())
    jwks.keys["k1"] = key
    jwks.status, jwks.body = status, body
    verifier = _jwks_verifier(dp_settings, url)
    token = jwt.encode(_claims(dp_settings), key, "ES256", headers={"kid": "k1"})
    with pytest.raises(SigningKeysUnavailableError) as info:
        await verifier.verify(token)
    assert (info.value.status_code, info.value.code) == (503, "jwks_unavailable")
    assert info.value.headers() == {"Retry-After": "1"}
    jwks.status, jwks.body = 200, None  # control: once the source is fixed, the same token verifies
    if status == 200 and b'"enc"' in body:
        await asyncio.sleep(1.1)  # a set that parsed (cached) is refetched only after the cooldown
    assert (await verifier.verify(token)).subject == "user-1"


async def test_unreachable_key_source_is_503(dp_settings: DataPlaneSettings) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    verifier = _jwks_verifier(dp_settings, f"http://127.0.0.1:{port}/jwks.json")
    token = jwt.encode(_claims(dp_settings), ec.generate_private_key(ec.SECP256R1()), "ES256", headers={"kid": "k1"})
    with pytest.raises(SigningKeysUnavailableError):
        await verifier.verify(token)


async def test_withdrawn_key_stops_verifying_after_the_key_set_lifespan(
    dp_settings: DataPlaneSettings, jwks_server: tuple[str, _Jwks]
) -> None:
    url, jwks = jwks_server
    old, new = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    jwks.keys |= {"old": old, "new": new}
    lifespan = 1.0
    verifier = _jwks_verifier(dp_settings, url, jwks_lifespan=lifespan)
    claims = _claims(dp_settings)
    seen = jwt.encode(claims, old, "ES256", headers={"kid": "old"})
    assert (await verifier.verify(seen)).subject == "user-1"
    del jwks.keys["old"]  # the IdP withdraws the key (e.g. it leaked)
    await asyncio.sleep(lifespan + 0.2)
    fresh = jwt.encode(claims | {"jti": "2"}, old, "ES256", headers={"kid": "old"})
    for token in (seen, fresh):  # neither the verified-token cache nor a per-kid cache keeps it alive
        with pytest.raises(AuthenticationError) as info:
            await verifier.verify(token)
        assert info.value.code == "invalid_signature"
    # Control: the key still published verifies.
    assert (await verifier.verify(jwt.encode(claims, new, "ES256", headers={"kid": "new"}))).subject == "user-1"


async def test_http_jwks_problems_are_json_401_and_503_never_500(
    dp_settings: DataPlaneSettings, world: World, jwks_server: tuple[str, _Jwks]
) -> None:
    url, jwks = jwks_server
    ec_key, rsa_key = ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)
    jwks.keys |= {"k-ec": ec_key}
    settings = DataPlaneSettings(**{**dp_settings.model_dump(), "jwks_url": url})
    claims = _claims(settings, tenant_id=str(world["A"].id))
    good = jwt.encode(claims, ec_key, "ES256", headers={"kid": "k-ec"})
    mismatched = jwt.encode(claims, rsa_key, "RS256", headers={"kid": "k-ec"})
    async for client in asgi_client(create_app(settings)):
        ok = await client.get("/v1/projects", headers={"Authorization": f"Bearer {good}"})
        assert ok.status_code == 200  # control
        refused = await client.get("/v1/projects", headers={"Authorization": f"Bearer {mismatched}"})
        assert refused.status_code == 401
        assert refused.json() == {"error": {"code": "invalid_algorithm", "message": refused.json()["error"]["message"]}}
        jwks.body = b"<html>"
        unseen = jwt.encode(claims | {"jti": "x"}, ec_key, "ES256", headers={"kid": "k-new"})
        await asyncio.sleep(1.1)  # past the refresh cooldown, so the unknown kid refetches
        unavailable = await client.get("/v1/projects", headers={"Authorization": f"Bearer {unseen}"})
        assert unavailable.status_code == 503
        assert unavailable.json()["error"]["code"] == "jwks_unavailable"
        assert unavailable.headers["Retry-After"] == "1"


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
    with pytest.raises(ForbiddenError, match="not minted in production"):
        keys.admin_token(ok)
