"""Structured logs (structlog): JSON in production, readable console lines in dev.

:func:`configure_logging` is called by ``create_app`` and the CLI, never at
import. Every event passes :func:`redact_secrets`, so a token, an
``Authorization`` header or a password can never reach a log line even if a
caller passes one by mistake. Row contents are never passed to a logger: the
access log carries method, route template, status, timings and the request's
routing facts (request id, tenant id, tier, placement, route epoch) only.
"""

from __future__ import annotations

import logging
import re
import sys
from contextvars import ContextVar
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from data_plane.settings import CommonSettings, LogFormat

# Keys whose values are secrets whatever they hold.
SECRET_KEYS = frozenset(
    {"authorization", "token", "access_token", "password", "secret", "jwt", "cookie", "set-cookie", "dsn"}
)
# A bearer token or JWT that slipped into a message or a value.
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)bearer\s+\S+")
_DSN_PASSWORD = re.compile(r"(postgres(?:ql)?(?:\+\w+)?://[^:/@\s]+:)[^@\s]+@")
REDACTED = "[redacted]"


def _scrub(value: str) -> str:
    if "eyJ" in value or "earer" in value or "://" in value:
        value = _JWT.sub(REDACTED, value)
        value = _BEARER.sub("Bearer " + REDACTED, value)
        value = _DSN_PASSWORD.sub(r"\1" + REDACTED + "@", value)
    return value


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Drop secret-named keys and scrub token- or password-shaped text from string values."""
    for key in list(event_dict):
        value = event_dict[key]
        if key.lower() in SECRET_KEYS:
            event_dict[key] = REDACTED
        elif isinstance(value, str):
            event_dict[key] = _scrub(value)
    return event_dict


def _level_number(level: str) -> int:
    number = logging.getLevelName(level.upper())
    return number if isinstance(number, int) else logging.INFO


def configure_logging(settings: CommonSettings, *, stream: TextIO | None = None) -> None:
    """(Re)configure structlog for the process; ``stream`` defaults to stdout (12-factor)."""
    fmt = settings.log_format or (LogFormat.JSON if settings.is_production else LogFormat.CONSOLE)
    renderer: Processor = (
        structlog.processors.JSONRenderer() if fmt is LogFormat.JSON else structlog.dev.ConsoleRenderer(colors=False)
    )
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_request_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        redact_secrets,
        renderer,
    ]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_level_number(settings.log_level)),
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        # Loggers are module-level proxies; caching them would pin the first
        # configuration (tests and `tenantctl up` reconfigure).
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (uvicorn, DBOS) share
    # the level; their records are not rendered by structlog.
    logging.getLogger().setLevel(_level_number(settings.log_level))


# The request being served, for log lines emitted while serving it: the request
# id and the ASGI scope's state dict, where the tenant dependency puts the
# route. Read lazily by :func:`add_request_context`, so a request that logs
# nothing pays one ContextVar.set and nothing more.
current_request: ContextVar[tuple[str, dict[str, Any]] | None] = ContextVar("current_request", default=None)


def request_fields(request_id: str, state: dict[str, Any], event_dict: EventDict) -> EventDict:
    event_dict.setdefault("request_id", request_id)
    route = state.get("route")
    if route is not None:
        event_dict.setdefault("tenant_id", str(route.tenant_id))
        event_dict.setdefault("tier", route.tier)
        event_dict.setdefault("placement", route.placement)
        event_dict.setdefault("route_epoch", route.epoch)
    return event_dict


def add_request_context(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    request = current_request.get()
    if request is None:
        return event_dict
    return request_fields(request[0], request[1], event_dict)
