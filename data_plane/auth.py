"""Bearer-token verification for both APIs (PyJWT).

Keys come from, in order: a JWKS URL (``PyJWKClient``, cached, fetched in a
worker thread because its I/O blocks), a configured PEM public key, or -- in dev
only -- the ES256 key generated into the state directory. HS256 is accepted only
when a secret is explicitly configured. Every problem is a 401 with a stable
code; the tenant comes from the verified ``tenant_id`` claim and nowhere else.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from data_plane.exceptions import AuthenticationError
from data_plane.settings import CommonSettings

ASYMMETRIC_ALGORITHMS = ("ES256", "RS256")
# An ES256 verification costs ~0.1-0.5 ms of CPU, as much as the rest of a
# request. A token string that verified once yields the same claims until it
# expires, so verified tokens are cached -- for at most this long, so that a
# key withdrawn from the JWKS stops being honoured soon after.
VERIFIED_CACHE_SECONDS = 60.0
VERIFIED_CACHE_SIZE = 10_000
# PyJWKClient waits this long after a fetch before an unknown `kid` may force a
# refresh; its default (30 s) refuses a freshly rotated key for half a minute.
JWKS_REFRESH_COOLDOWN_SECONDS = 1.0


@dataclass(frozen=True)
class Principal:
    """The verified caller."""

    subject: str
    tenant_id: uuid.UUID | None
    claims: dict[str, Any]


def _algorithm_for(key: Any) -> str:
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ES256"
    if isinstance(key, rsa.RSAPublicKey):
        return "RS256"
    raise ValueError("public key must be an EC P-256 or RSA key")


class _VerifiedCache:
    """A small LRU of verified tokens with per-entry expiry."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[float, float, Principal]] = OrderedDict()

    def get(self, token: str, *, leeway: float) -> Principal | None:
        entry = self._entries.get(token)
        if entry is None:
            return None
        keep_until, expires_at, principal = entry
        now = time.time()
        if now >= keep_until or now >= expires_at + leeway:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return principal

    def put(self, token: str, principal: Principal) -> None:
        expires_at = float(principal.claims["exp"])
        self._entries[token] = (time.time() + VERIFIED_CACHE_SECONDS, expires_at, principal)
        self._entries.move_to_end(token)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


class TokenVerifier:
    """Verifies tokens for one audience (``tenantctl-api`` or ``tenantctl-admin``)."""

    def __init__(self, settings: CommonSettings, *, audience: str, require_tenant: bool) -> None:
        self._issuer = settings.jwt_issuer
        self._audience = audience
        self._leeway = settings.jwt_leeway_seconds
        self._require_tenant = require_tenant
        self._verified = _VerifiedCache(VERIFIED_CACHE_SIZE)
        self._jwks: jwt.PyJWKClient | None = None
        self._key: Any = None
        self._key_algorithm: str | None = None
        self._hs256_secret = (
            settings.jwt_hs256_secret.get_secret_value() if settings.jwt_hs256_secret is not None else None
        )
        if settings.jwks_url:
            self._jwks = jwt.PyJWKClient(
                settings.jwks_url,
                cache_keys=True,
                lifespan=300,
                timeout=5,
                cooldown_duration=JWKS_REFRESH_COOLDOWN_SECONDS,
            )
        else:
            pem = settings.jwt_public_key
            if pem is None and not settings.is_production and settings.dev_public_key_path.exists():
                pem = settings.dev_public_key_path.read_text()
            if pem is not None:
                self._key = load_pem_public_key(pem.encode())
                self._key_algorithm = _algorithm_for(self._key)
        if self._jwks is None and self._key is None and self._hs256_secret is None:
            raise ValueError(
                "no token verification key: set TENANTCTL_JWKS_URL or TENANTCTL_JWT_PUBLIC_KEY "
                "(or run `tenantctl up` once to generate the dev key)"
            )

    async def _key_for(self, token: str, algorithm: str) -> Any:
        if algorithm == "HS256":
            if self._hs256_secret is None:
                raise AuthenticationError("algorithm not allowed", code="invalid_algorithm")
            return self._hs256_secret
        if algorithm not in ASYMMETRIC_ALGORITHMS:
            raise AuthenticationError("algorithm not allowed", code="invalid_algorithm")
        if self._jwks is not None:
            jwks = self._jwks
            try:
                signing = await anyio.to_thread.run_sync(jwks.get_signing_key_from_jwt, token)
            except jwt.PyJWKClientConnectionError as exc:
                raise AuthenticationError("signing keys unavailable", code="jwks_unavailable") from exc
            except (jwt.PyJWKClientError, jwt.DecodeError) as exc:
                raise AuthenticationError("unknown signing key", code="invalid_signature") from exc
            return signing.key
        if self._key is None or algorithm != self._key_algorithm:
            raise AuthenticationError("algorithm not allowed", code="invalid_algorithm")
        return self._key

    async def verify(self, token: str) -> Principal:
        cached = self._verified.get(token, leeway=self._leeway)
        if cached is not None:
            return cached
        principal = await self._verify_uncached(token)
        self._verified.put(token, principal)
        return principal

    async def _verify_uncached(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as exc:
            raise AuthenticationError("malformed token", code="malformed_token") from exc
        algorithm = str(header.get("alg", ""))
        key = await self._key_for(token, algorithm)
        required = ["exp", "iss", "aud", "sub"] + (["tenant_id"] if self._require_tenant else [])
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": required},
            )
        except jwt.ExpiredSignatureError as exc:
            raise AuthenticationError("token expired", code="token_expired") from exc
        except jwt.InvalidAudienceError as exc:
            raise AuthenticationError("wrong audience", code="invalid_audience") from exc
        except jwt.InvalidIssuerError as exc:
            raise AuthenticationError("wrong issuer", code="invalid_issuer") from exc
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"missing claim {exc.claim!r}", code="missing_claim") from exc
        except jwt.InvalidSignatureError as exc:
            raise AuthenticationError("bad signature", code="invalid_signature") from exc
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError("invalid token", code="invalid_token") from exc
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthenticationError("invalid claim 'sub'", code="invalid_claim")
        tenant_id: uuid.UUID | None = None
        if self._require_tenant:
            raw = claims.get("tenant_id")
            try:
                tenant_id = uuid.UUID(str(raw)) if isinstance(raw, str) else None
            except ValueError:
                tenant_id = None
            if tenant_id is None:
                raise AuthenticationError("invalid claim 'tenant_id'", code="invalid_claim")
        return Principal(subject=subject, tenant_id=tenant_id, claims=claims)


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationError("missing bearer token", code="missing_token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing bearer token", code="missing_token")
    return token.strip()
