"""The generated dev signing key and dev tokens (``tenantctl token``).

Only for dev and tests: production refuses this key (see
``CommonSettings._refuse_dev_secrets_in_production``) and mints tokens with the
organisation's identity provider.
"""

from __future__ import annotations

import os
import time
import uuid

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from data_plane.exceptions import ForbiddenError
from data_plane.settings import CommonSettings


def ensure_dev_key(settings: CommonSettings) -> None:
    """Generate the ES256 dev key pair into the state dir once."""
    private_path = settings.dev_private_key_path
    if private_path.exists() and settings.dev_public_key_path.exists():
        return
    settings.dev_key_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    settings.dev_public_key_path.write_bytes(public)


def refuse_in_production(settings: CommonSettings) -> None:
    """Dev tokens are signed with a key anyone with the state dir holds: never in production."""
    if settings.is_production:
        raise ForbiddenError(
            "dev tokens are not minted in production (TENANTCTL_ENVIRONMENT=production); "
            "get a token from your identity provider",
            code="dev_key_refused",
        )


def _sign(settings: CommonSettings, claims: dict[str, object]) -> str:
    refuse_in_production(settings)
    ensure_dev_key(settings)
    key = settings.dev_private_key_path.read_bytes()
    return jwt.encode(claims, key, algorithm="ES256", headers={"kid": "tenantctl-dev"})


def tenant_token(settings: CommonSettings, *, tenant_id: uuid.UUID, subject: str = "dev-user", ttl: int = 3600) -> str:
    now = int(time.time())
    return _sign(
        settings,
        {
            "iss": settings.jwt_issuer,
            "aud": settings.jwt_audience,
            "sub": subject,
            "tenant_id": str(tenant_id),
            "iat": now,
            "exp": now + ttl,
        },
    )


def admin_token(settings: CommonSettings, *, subject: str = "dev-admin", ttl: int = 3600) -> str:
    now = int(time.time())
    return _sign(
        settings,
        {
            "iss": settings.jwt_issuer,
            "aud": settings.jwt_admin_audience,
            "sub": subject,
            "scope": "tenantctl:admin",
            "iat": now,
            "exp": now + ttl,
        },
    )
