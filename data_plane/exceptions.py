"""One exception hierarchy for tenantctl, translated to HTTP in one handler.

Services raise these; only :func:`install_error_handlers` knows about HTTP.
Every error leaves the API as ``{"error": {"code": ..., "message": ...}}``.

    TenantctlError                     500 internal_error
    ├── AuthenticationError            401 invalid_token (+ specific codes)
    ├── ForbiddenError                 403 forbidden
    │   ├── TenantUnknownError         403 tenant_unknown
    │   ├── TenantSuspendedError       403 tenant_suspended
    │   └── TenantDeletedError         403 tenant_deleted
    ├── NotFoundError                  404 not_found
    ├── ConflictError                  409 conflict
    │   └── StaleRouteError            409 stale_route (retried once before it surfaces)
    ├── PayloadTooLargeError           413 payload_too_large
    ├── InvalidInputError              422 invalid_input
    │   └── QuotaExceededError         422 quota_exceeded
    ├── RateLimitedError               429 rate_limited (Retry-After)
    └── ServiceUnavailableError        503 unavailable (Retry-After)
        ├── TenantFencedError          503 tenant_fenced
        └── SigningKeysUnavailableError 503 jwks_unavailable (the JWKS source failed, not the token)

The control plane extends this tree in ``control_plane.exceptions``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger(__name__)


class TenantctlError(Exception):
    status_code: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.code)
        self.message = message or (self.__class__.__doc__ or self.code).strip()
        if code is not None:
            self.code = code  # type: ignore[misc]  # per-instance refinement of the class code

    def headers(self) -> dict[str, str] | None:
        return None


class AuthenticationError(TenantctlError):
    """The bearer token is missing or invalid."""

    status_code = 401
    code = "invalid_token"

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class ForbiddenError(TenantctlError):
    """The caller may not do this."""

    status_code = 403
    code = "forbidden"


class TenantUnknownError(ForbiddenError):
    """The token's tenant is not known."""

    code = "tenant_unknown"


class TenantSuspendedError(ForbiddenError):
    """The tenant is suspended."""

    code = "tenant_suspended"


class TenantDeletedError(ForbiddenError):
    """The tenant has been offboarded."""

    code = "tenant_deleted"


class NotFoundError(TenantctlError):
    """Not found."""

    status_code = 404
    code = "not_found"


class ConflictError(TenantctlError):
    """The request conflicts with the current state."""

    status_code = 409
    code = "conflict"


class StaleRouteError(ConflictError):
    """The tenant's route changed while the request was running."""

    code = "stale_route"


class PayloadTooLargeError(TenantctlError):
    """The request body is too large."""

    status_code = 413
    code = "payload_too_large"


class InvalidInputError(TenantctlError):
    """The request is invalid."""

    status_code = 422
    code = "invalid_input"


class QuotaExceededError(InvalidInputError):
    """The tenant's quota for this resource is used up."""

    code = "quota_exceeded"


class _RetryAfterError(TenantctlError):
    def __init__(self, message: str = "", *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class RateLimitedError(_RetryAfterError):
    """Too many requests."""

    status_code = 429
    code = "rate_limited"


class ServiceUnavailableError(_RetryAfterError):
    """The service is temporarily unavailable."""

    status_code = 503
    code = "unavailable"


class TenantFencedError(ServiceUnavailableError):
    """The tenant is being moved; retry shortly."""

    code = "tenant_fenced"


class SigningKeysUnavailableError(ServiceUnavailableError):
    """The token signing keys cannot be fetched; retry shortly."""

    code = "jwks_unavailable"


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    """The JSON shape of every error response."""

    error: ErrorBody


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(
        status_code=status,
        content={"error": {"code": code, "message": message}},
        headers=headers,
    )


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        401: "Missing or invalid bearer token",
        403: "Tenant unknown, suspended or deleted, or scope missing",
        404: "Not found (also for another tenant's object)",
        409: "Conflicting state",
        413: "Request body too large",
        422: "Invalid input",
        429: "Rate limited",
        503: "Tenant fenced during a cutover",
    }.items()
}


_STATUS_CODES = {
    400: "bad_request",
    401: "invalid_token",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def install_error_handlers(app: FastAPI) -> None:
    """Translate every error to the §5 JSON shape; a 500 never carries internals."""

    async def on_tenantctl_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TenantctlError)
        if exc.status_code >= 500 and not isinstance(exc, ServiceUnavailableError):
            log.error("internal_error", error_type=type(exc).__name__, error=exc.message)
            return error_response(500, "internal_error", "internal error")
        return error_response(exc.status_code, exc.code, exc.message, exc.headers())

    async def on_validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        # Only locations and messages: echoing the input ("input" key) could
        # reflect request content into logs or caches.
        parts = [f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in exc.errors()]
        return error_response(422, "invalid_input", "; ".join(parts) or "invalid input")

    async def on_http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = _STATUS_CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), getattr(exc, "headers", None))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Only an exception raised outside UnexpectedErrors (in an outer middleware) gets here.
        log.exception("unhandled_error", error_type=type(exc).__name__)
        return error_response(500, "internal_error", "internal error")

    app.add_exception_handler(TenantctlError, on_tenantctl_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)
    # Added first, so the innermost middleware: the app's own middleware (metrics, access log) sees a plain 500.
    app.add_middleware(UnexpectedErrors)


class UnexpectedErrors:
    """Answer an unexpected exception with the §5 500 and stop it here.

    Starlette's outermost middleware answers with the ``Exception`` handler
    and then re-raises to the server, and uvicorn logs the exception with its
    message: a database error's message quotes the row ("Failing row contains
    (...)"), so tenant data reached the server's log. Here the exception is
    logged once, through ``data_plane.logs`` (which logs names, not those
    messages), and goes no further.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            log.exception("unhandled_error", error_type=type(exc).__name__, response_started=started)
            if not started:
                await error_response(500, "internal_error", "internal error")(scope, receive, send)
