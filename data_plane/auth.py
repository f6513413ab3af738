"""Bearer-token verification for both APIs (PyJWT).

Keys come from, in order: a JWKS URL (``PyJWKClient``, cached, fetched in a
worker thread because its I/O blocks), a configured PEM public key, or -- in dev
only -- the ES256 key generated into the state directory. HS256 is accepted only
when a secret is explicitly configured. The tenant comes from the verified
``tenant_id`` claim and nowhere else.

Errors (never a 500):

* every problem with the token itself -- malformed, bad signature, unknown
  ``kid``, an algorithm outside the allow-list or not matching the key's type,
  expired, wrong ``aud``/``iss``, a missing or invalid claim -- is a 401
  :class:`AuthenticationError` with a stable ``code``;
* a failure of the key *source* -- the JWKS URL unreachable, answering an error,
  something that is not JSON, or a key set with no usable signing key -- is a
  503 :class:`SigningKeysUnavailableError` (``jwks_unavailable``, Retry-After):
  the token may well be valid, so the client should retry, not re-authenticate.

A key withdrawn from the JWKS stops verifying once the key set's cache lifetime
(``jwks_lifespan``) has passed: keys are looked up in the cached key set, never
in a per-``kid`` cache without expiry, and a verified token is remembered no
longer than the key set it was verified with.
"""

from __future__ import annotations

import math
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import anyio.to_thread
import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from data_plane.exceptions import AuthenticationError, SigningKeysUnavailableError
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
# How long a fetched key set is trusted; also the longest a withdrawn key keeps
# verifying tokens.
JWKS_LIFESPAN_SECONDS = 300.0


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
        if time.monotonic() >= keep_until or time.time() >= expires_at + leeway:
            del self._entries[token]
            return None
        self._entries.move_to_end(token)
        return principal

    def put(self, token: str, principal: Principal, *, keep_until: float) -> None:
        """Remember ``principal`` until ``keep_until`` (monotonic) at the latest."""
        expires_at = float(principal.claims["exp"])
        keep_until = min(keep_until, time.monotonic() + VERIFIED_CACHE_SECONDS)
        self._entries[token] = (keep_until, expires_at, principal)
        self._entries.move_to_end(token)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)


@dataclass(frozen=True)
class _Key:
    """A verification key and how long tokens verified with it may be remembered."""

    key: Any
    keep_until: float = math.inf  # monotonic; a key set's expiry for JWKS keys


class _JwksKeys:
    """Signing keys from a JWKS URL, looked up in PyJWKClient's key-set cache.

    No per-``kid`` cache: ``PyJWKClient(cache_keys=True)`` memoises each key
    with no expiry, so a key withdrawn from the JWKS would verify forever.
    """

    def __init__(self, url: str, *, lifespan: float) -> None:
        self._lifespan = lifespan
        self._client = jwt.PyJWKClient(
            url,
            cache_keys=False,
            lifespan=lifespan,
            timeout=5,
            cooldown_duration=JWKS_REFRESH_COOLDOWN_SECONDS,
        )

    def _key_set_time(self) -> float | None:
        """When the cached key set was fetched (monotonic), if one is cached."""
        cache = self._client.jwk_set_cache
        cached = cache.jwk_set_with_timestamp if cache is not None else None
        return None if cached is None else cached.get_timestamp()

    def _key_set_expiry(self) -> float:
        fetched = self._key_set_time()
        return -math.inf if fetched is None else fetched + self._lifespan

    def _signing_keys(self) -> list[jwt.PyJWK]:
        try:
            keys = _usable(self._client.get_jwk_set())
            fetched = self._key_set_time()
            if not keys and fetched is not None and time.monotonic() - fetched >= JWKS_REFRESH_COOLDOWN_SECONDS:
                # A set without a signing key parses fine and is cached for
                # its whole lifespan: refetch (at most once per cooldown) so
                # that the IdP fixing it ends the outage.
                keys = _usable(self._client.get_jwk_set(refresh=True))
        # ValueError: a body that is not JSON (json.load's error, which
        # PyJWKClient does not wrap); PyJWKSetError: an empty set or one
        # without a key PyJWT can use; PyJWKClientError: not a JSON object,
        # or the fetch failed.
        except (jwt.PyJWTError, ValueError) as exc:
            raise SigningKeysUnavailableError("signing keys unavailable") from exc
        if not keys:
            raise SigningKeysUnavailableError("the key set has no signing key")
        return keys

    def key_for(self, kid: str) -> _Key:
        """Blocking (HTTP on a cache miss): call it in a worker thread."""
        valid_before = self._key_set_expiry()
        signing = next((key for key in self._signing_keys() if key.key_id == kid), None)
        if signing is None:
            # An unknown kid may be a freshly rotated key: PyJWKClient
            # refetches once (cooldown permitting) before giving up.
            try:
                signing = self._client.get_signing_key(kid)
            except (jwt.PyJWKClientConnectionError, jwt.PyJWKSetError, ValueError) as exc:
                raise SigningKeysUnavailableError("signing keys unavailable") from exc
            except jwt.PyJWTError as exc:
                raise AuthenticationError("unknown signing key", code="invalid_signature") from exc
        # The set this key came from expires at one of these (a refresh may
        # have happened in between): remember tokens until the earlier one.
        now = time.monotonic()
        expiries = [e for e in (valid_before, self._key_set_expiry()) if e > now]
        return _Key(signing, keep_until=min(expiries, default=now))


def _usable(jwk_set: jwt.PyJWKSet) -> list[jwt.PyJWK]:
    """The set's signing keys (PyJWKClient's own filter: ``use`` sig or absent, a ``kid``)."""
    return [key for key in jwk_set.keys if key.public_key_use in ("sig", None) and key.key_id]


class TokenVerifier:
    """Verifies tokens for one audience (``tenantctl-api`` or ``tenantctl-admin``)."""

    def __init__(
        self,
        settings: CommonSettings,
        *,
        audience: str,
        require_tenant: bool,
        jwks_lifespan: float = JWKS_LIFESPAN_SECONDS,
    ) -> None:
        self._issuer = settings.jwt_issuer
        self._audience = audience
        self._leeway = settings.jwt_leeway_seconds
        self._require_tenant = require_tenant
        self._verified = _VerifiedCache(VERIFIED_CACHE_SIZE)
        self._jwks: _JwksKeys | None = None
        self._key: Any = None
        self._key_algorithm: str | None = None
        self._hs256_secret = (
            settings.jwt_hs256_secret.get_secret_value() if settings.jwt_hs256_secret is not None else None
        )
        if settings.jwks_url:
            self._jwks = _JwksKeys(settings.jwks_url, lifespan=jwks_lifespan)
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

    async def _key_for(self, header: dict[str, Any], algorithm: str) -> _Key:
        if algorithm == "HS256":
            if self._hs256_secret is None:
                raise AuthenticationError("algorithm not allowed", code="invalid_algorithm")
            return _Key(self._hs256_secret)
        if algorithm not in ASYMMETRIC_ALGORITHMS:
            raise AuthenticationError("algorithm not allowed", code="invalid_algorithm")
        if self._jwks is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not kid:
                raise AuthenticationError("token names no signing key", code="invalid_signature")
            # A PyJWK, not its bare key: jwt.decode then refuses a header
            # algorithm that differs from the key's (InvalidAlgorithmError)
            # instead of failing with a TypeError inside the RSA/EC code.
            return await anyio.to_thread.run_sync(self._jwks.key_for, kid)
        if self._key is None or algorithm != self._key_algorithm:
            raise AuthenticationError("algorithm not allowed", code="invalid_algorithm")
        return _Key(self._key)

    async def verify(self, token: str) -> Principal:
        cached = self._verified.get(token, leeway=self._leeway)
        if cached is not None:
            return cached
        principal, key = await self._verify_uncached(token)
        self._verified.put(token, principal, keep_until=key.keep_until)
        return principal

    async def _verify_uncached(self, token: str) -> tuple[Principal, _Key]:
        try:
            header = jwt.get_unverified_header(token)
        # InvalidTokenError, not only DecodeError: a non-string `kid` or a bad
        # `crit` header raises the base class.
        except jwt.InvalidTokenError as exc:
            raise AuthenticationError("malformed token", code="malformed_token") from exc
        algorithm = str(header.get("alg", ""))
        key = await self._key_for(header, algorithm)
        claims = self._decode(token, key, algorithm)
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
        return Principal(subject=subject, tenant_id=tenant_id, claims=claims), key

    def _decode(self, token: str, key: _Key, algorithm: str) -> dict[str, Any]:
        required = ["exp", "iss", "aud", "sub"] + (["tenant_id"] if self._require_tenant else [])
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key.key,
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
        except jwt.InvalidAlgorithmError as exc:
            raise AuthenticationError("algorithm does not match the signing key", code="invalid_algorithm") from exc
        # PyJWTError, not only InvalidTokenError: InvalidKeyError (a key the
        # algorithm cannot use) derives from the base class.
        except jwt.PyJWTError as exc:
            raise AuthenticationError("invalid token", code="invalid_token") from exc
        return claims


def bearer_token(authorization: str | None) -> str:
    if not authorization:
        raise AuthenticationError("missing bearer token", code="missing_token")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("missing bearer token", code="missing_token")
    return token.strip()
