"""Settings shared by both planes, and the data plane's own.

Every field maps to an environment variable with the ``TENANTCTL_`` prefix
(``TENANTCTL_JWT_ISSUER`` ...). With no database URL configured the process is
in *embedded* mode: URLs come from the stack that ``tenantctl up`` started in
the state directory.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Self

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

if TYPE_CHECKING:  # settings are read by every CLI command: no web framework import for a type
    from fastapi.telemetry import TelemetryConfig

DEV_HS256_SECRETS = frozenset({"", "secret", "changeme", "change-me", "dev", "tenantctl"})


CredentialsSource = Literal["catalog", "aws"]


class Environment(StrEnum):
    DEV = "dev"
    TEST = "test"
    PRODUCTION = "production"


class LogFormat(StrEnum):
    JSON = "json"
    CONSOLE = "console"


class InsecureSettingsError(ValueError):
    """A production deployment was configured with a dev-only secret, key or database."""


def describe_invalid(exc: ValidationError) -> str:
    """An invalid configuration as one line per problem (for CLIs: a message, not a traceback)."""
    problems = []
    for error in exc.errors():
        cause = error.get("ctx", {}).get("error")
        where = ".".join(str(part) for part in error.get("loc", ()))
        text = str(cause) if cause is not None else error["msg"]
        problems.append(f"{where}: {text}" if where else text)
    return "; ".join(problems)


class CommonSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TENANTCTL_", extra="ignore", frozen=True)

    environment: Environment = Environment.DEV
    state_dir: Path = Path(".tenantctl")
    app_role: str = Field(default="tenantctl_app", description="Login role the data plane uses.")

    jwt_issuer: str = "tenantctl-dev"
    jwt_audience: str = "tenantctl-api"
    jwt_admin_audience: str = "tenantctl-admin"
    jwks_url: str | None = None
    jwt_public_key: str | None = Field(default=None, description="PEM public key (ES256/RS256).")
    jwt_hs256_secret: SecretStr | None = Field(
        default=None, description="Enables HS256; only when explicitly configured."
    )
    jwt_leeway_seconds: int = 10

    log_format: LogFormat | None = Field(
        default=None, description="json | console; default json in production, console otherwise."
    )
    log_level: str = "info"
    metrics_textfile: Path | None = Field(
        default=None, description="Where batch commands (tenantctl migrate) write their last result for Prometheus."
    )
    opentelemetry: bool = Field(
        default=False,
        description="FastAPI's native OpenTelemetry spans, metrics and logs for both APIs, sent to the global "
        "providers of an OpenTelemetry SDK you configure. tenantctl's own signals are Prometheus and the log.",
    )

    @property
    def dev_key_dir(self) -> Path:
        return self.state_dir / "keys"

    @property
    def dev_public_key_path(self) -> Path:
        return self.dev_key_dir / "dev-es256.pub.pem"

    @property
    def dev_private_key_path(self) -> Path:
        return self.dev_key_dir / "dev-es256.pem"

    @property
    def fastapi_telemetry(self) -> TelemetryConfig:
        """``FastAPI(telemetry=...)``: FastAPI's defaults when enabled, every signal off otherwise.

        Off, because FastAPI otherwise asks OpenTelemetry on every request
        whether a global provider has been configured since: ~35,000
        instructions per request with none configured (``bench
        api_instructions``; ~12 us on the benchmark host). ``bench api``'s
        baseline turns it off too.
        """
        if self.opentelemetry:
            return {}
        return {"tracing": False, "metrics": False, "logs": False}

    @property
    def is_production(self) -> bool:
        return self.environment is Environment.PRODUCTION

    @model_validator(mode="after")
    def _refuse_dev_secrets_in_production(self) -> Self:
        # A production stack that silently fell back to the generated dev key
        # would accept tokens minted by anyone holding a laptop's state dir.
        if not self.is_production:
            return self
        if self.jwks_url is None and self.jwt_public_key is None:
            raise InsecureSettingsError(
                "production requires TENANTCTL_JWKS_URL or TENANTCTL_JWT_PUBLIC_KEY; the generated dev key is refused"
            )
        if (
            self.jwt_public_key is not None
            and self.dev_public_key_path.exists()
            and self.dev_public_key_path.read_text().strip() == self.jwt_public_key.strip()
        ):
            raise InsecureSettingsError("production refuses the generated dev signing key")
        if self.jwt_hs256_secret is not None:
            secret = self.jwt_hs256_secret.get_secret_value()
            if secret.lower() in DEV_HS256_SECRETS or len(secret) < 32:
                raise InsecureSettingsError("TENANTCTL_JWT_HS256_SECRET is a default or shorter than 32 characters")
        if self.jwt_issuer == "tenantctl-dev":
            raise InsecureSettingsError("set TENANTCTL_JWT_ISSUER to your issuer in production")
        return self


class DataPlaneSettings(CommonSettings):
    """Settings of one data-plane replica (tenant API)."""

    app_catalog_url: str | None = Field(default=None, description="Catalog DSN for reading routes (application role).")
    app_pool_url: str | None = Field(default=None, description="Pool DSN as the application role.")
    pool_size: int = 10
    silo_pool_size: int = 2
    max_silo_engines: int = 64
    silo_engine_idle_seconds: float = 300.0
    max_body_bytes: int = 64 * 1024
    route_cache_ttl_seconds: float = 30.0
    credentials_source: CredentialsSource = Field(
        default="catalog",
        description="How silo credentials are found: 'catalog' (the location's DSN as stored: local silos) or "
        "'aws' (AWS Secrets Manager behind each location's secret_ref: RDS silos; needs the 'aws' extra).",
    )

    # Operability (issue 8). Dicts are read from JSON, e.g.
    # TENANTCTL_RATE_LIMITS='{"free": "10/second", "enterprise": "1000/second"}'.
    rate_limits: dict[str, str] = Field(
        default_factory=lambda: {"free": "20/second", "standard": "200/second", "enterprise": "2000/second"},
        description="Requests per window per tenant, by tier (`limits` notation: '10/second', '600/minute').",
    )
    default_rate_limit: str = Field(default="200/second", description="Limit of a tier missing from RATE_LIMITS.")
    redis_url: str | None = Field(
        default=None, description="Rate-limit storage shared by all replicas (redis://...); in-memory when unset."
    )
    project_quotas: dict[str, int] = Field(
        default_factory=lambda: {"free": 10, "standard": 1000},
        description="Maximum projects per tenant, by tier; a tier missing here has no quota.",
    )
    usage_flush_seconds: float = Field(default=10.0, gt=0, description="How often metered usage is written.")
    usage_rows_stored_seconds: float = Field(
        default=300.0, gt=0, description="How often, at most, a tenant's stored rows are counted (when it writes)."
    )
    access_log: bool = Field(default=True, description="One structured log line per request.")
    gc_freeze: bool = Field(
        default=True,
        description="Exempt what exists once the API has started from the cyclic garbage collector's full passes "
        "(gc.freeze), so that a full pass, which stalls every request in flight, walks only newer objects.",
    )

    @model_validator(mode="after")
    def _refuse_embedded_in_production(self) -> Self:
        # Without URLs a replica would look for a dev stack's state directory.
        if self.is_production and (self.app_catalog_url is None or self.app_pool_url is None):
            raise InsecureSettingsError(
                "production requires TENANTCTL_APP_CATALOG_URL and TENANTCTL_APP_POOL_URL; "
                "the embedded PostgreSQL of `tenantctl up` is for development only"
            )
        return self
