"""Structured logs (structlog): JSON in production, readable console lines in dev.

:func:`configure_logging` is called by ``create_app`` and the CLI, never at
import. Every event passes :func:`redact_secrets`, so a token, an
``Authorization`` header or a password can never reach a log line even if a
caller passes one by mistake. Row contents are never passed to a logger: the
access log carries method, route template, status, timings and the request's
routing facts (request id, tenant id, tier, placement, route epoch) only; an
exception is rendered by ``format_exc_info_safely``, which replaces the
messages of database and validation errors (they quote row values) with their
diagnostic names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import sys
import time
import traceback
from contextvars import ContextVar
from json.encoder import encode_basestring_ascii
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from data_plane.settings import CommonSettings, Environment, LogFormat

# Keys whose values are secrets whatever they hold.
_SECRET_NAMES = ("authorization", "token", "access_token", "password", "secret", "jwt", "cookie", "set-cookie", "dsn")
SECRET_KEYS = frozenset([*_SECRET_NAMES, *(n.capitalize() for n in _SECRET_NAMES), *(n.upper() for n in _SECRET_NAMES)])
# A bearer token or JWT that slipped into a message or a value.
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
_BEARER = re.compile(r"(?i)bearer\s+\S+")
_DSN_PASSWORD = re.compile(r"(postgres(?:ql)?(?:\+\w+)?://[^:/@\s]+:)[^@\s]+@")
REDACTED = "[redacted]"


def _scrub(value: str) -> str:
    value = _JWT.sub(REDACTED, value)
    value = _BEARER.sub("Bearer " + REDACTED, value)
    return _DSN_PASSWORD.sub(r"\1" + REDACTED + "@", value)


def redact_secrets(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    """Blank secret-named keys and scrub token- or password-shaped text from string values.

    Runs for every log line (the access log included), so the common case --
    no suspicious substring -- costs three ``in`` tests per string value.
    """
    for key, value in event_dict.items():
        if key in SECRET_KEYS:
            event_dict[key] = REDACTED
        elif type(value) is str and ("eyJ" in value or "earer" in value or "://" in value):
            event_dict[key] = _scrub(value)
    return event_dict


# What stands in for a message that may quote row values.
WITHHELD = "[message withheld]"
# SQLSTATE classes whose messages and DETAIL quote the values involved: data
# exceptions ('invalid input syntax for type uuid: "..."'), integrity
# violations ("Failing row contains (...)", "Key (name)=(...) already
# exists") and RAISE in a function (any text at all).
_QUOTING_CLASSES = ("22", "23", "P0")
# Diagnostic fields that name things without quoting values (asyncpg's
# exception attributes; psycopg has the same names on ``exc.diag``).
_DIAGNOSTICS = ("schema_name", "table_name", "column_name", "data_type_name", "constraint_name")


def describe_exception(exc: BaseException) -> str:
    """What a log line or a job's error may say about ``exc``: its message, unless that may quote tenant data.

    A database error keeps its primary message (never its DETAIL) unless its
    SQLSTATE class quotes values, and always gets its SQLSTATE and the names
    of the schema, table, column and constraint involved; a client-side
    argument error, a SQLAlchemy statement error (its text carries the
    statement's parameters) and a validation error (the offending input) are
    described by names only. A 500 caused by a constraint used to write the
    tenant's failing row into the log.
    """
    module = type(exc).__module__
    if module.startswith("sqlalchemy"):
        inner = getattr(exc, "orig", None) or exc.__cause__  # the driver's error, wrapped (maybe twice)
        if isinstance(inner, BaseException) and inner is not exc:
            return describe_exception(inner)
        return WITHHELD if hasattr(exc, "statement") else str(exc)
    if module.startswith(("pydantic", "pydantic_core", "fastapi.exceptions")):
        return _describe_validation(exc)
    if not module.startswith(("asyncpg", "psycopg")):
        return str(exc)
    sqlstate = getattr(exc, "sqlstate", None)
    if not sqlstate:
        # asyncpg's DataError: "invalid input for query argument $1: '<the value>'".
        return WITHHELD if isinstance(exc, ValueError) else str(exc)
    diag = getattr(exc, "diag", exc)
    primary = getattr(diag, "message_primary", None) or getattr(exc, "message", None) or type(exc).__name__
    names = [f"{field}={value}" for field in _DIAGNOSTICS if (value := getattr(diag, field, None))]
    shown = WITHHELD if str(sqlstate)[:2] in _QUOTING_CLASSES else str(primary)
    return " ".join([shown, f"(sqlstate={sqlstate}", *names]) + ")"


def _describe_validation(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    listed: list[str] = []
    if callable(errors):  # pydantic's ValidationError, FastAPI's Request/ResponseValidationError
        with contextlib.suppress(TypeError, AttributeError, ValueError):
            listed = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('type', '?')}" for e in errors()]
    return f"{WITHHELD} {'; '.join(listed)}" if listed else WITHHELD


def format_exception_safely(exc: BaseException) -> str:
    """The chained traceback as Python prints it (frames, source lines), messages by :func:`describe_exception`."""
    chain: list[tuple[BaseException, str | None]] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    link: str | None = None
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append((current, link))
        if current.__cause__ is not None:
            current, link = current.__cause__, "The above exception was the direct cause of the following exception:"
        elif current.__context__ is not None and not current.__suppress_context__:
            current, link = current.__context__, "During handling of the above exception, another exception occurred:"
        else:
            current = None
    parts: list[str] = []
    for error, joined_by in reversed(chain):
        frames = "".join(traceback.format_tb(error.__traceback__))
        if frames:
            parts.append("Traceback (most recent call last):\n" + frames)
        parts.append(f"{type(error).__module__}.{type(error).__qualname__}: {describe_exception(error)}\n")
        if joined_by is not None:
            parts.append(f"\n{joined_by}\n\n")
    return "".join(parts).rstrip("\n")


# structlog's format_exc_info, with the exception rendered by format_exception_safely.
format_exc_info_safely = structlog.processors.ExceptionRenderer(lambda exc_info: format_exception_safely(exc_info[1]))


def _level_number(level: str) -> int:
    number = logging.getLevelName(level.upper())
    return number if isinstance(number, int) else logging.INFO


def configure_logging(settings: CommonSettings, *, stream: TextIO | None = None) -> None:
    """(Re)configure structlog for the process; ``stream`` defaults to stdout (12-factor)."""
    # Console lines only for a developer's terminal; tests, benchmarks and
    # production get JSON (also the cheaper renderer: ~2x faster per line).
    fmt = settings.log_format or (LogFormat.CONSOLE if settings.environment is Environment.DEV else LogFormat.JSON)
    renderer: Processor = (
        structlog.processors.JSONRenderer() if fmt is LogFormat.JSON else structlog.dev.ConsoleRenderer(colors=False)
    )
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        add_request_context,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        format_exc_info_safely,
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
    access_log.configure(
        stream=stream or sys.stdout,
        json_lines=fmt is LogFormat.JSON,
        enabled=_level_number(settings.log_level) <= logging.INFO,
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
        event_dict.setdefault("tenant_id", route.tenant_text)
        event_dict.setdefault("tier", route.tier)
        event_dict.setdefault("placement", route.placement)
        event_dict.setdefault("route_epoch", route.epoch)
    return event_dict


def add_request_context(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
    request = current_request.get()
    if request is None:
        return event_dict
    return request_fields(request[0], request[1], event_dict)


class AccessLog:
    """The one line per request, rendered without structlog's processor chain.

    Measured on this machine, a structlog JSON line costs ~30-40 us (context
    copy, six processors, ``json.dumps``, a flush): several percent of a whole
    request. The access line has fixed fields, so it is formatted directly into
    the same JSON shape the structlog pipeline produces (``event``, ``level``,
    ``timestamp`` plus fields) in a few microseconds. Caller-controlled values
    (path, request id) are JSON-escaped and scrubbed like any other log value.
    In console format (dev) the line goes through structlog for readability.
    """

    def __init__(self) -> None:
        self._stream: TextIO | None = None
        self._json = True
        self._enabled = False
        self._second = -1
        self._second_text = ""

    def _timestamp(self) -> str:
        """Now as structlog's ``TimeStamper(fmt="iso", utc=True)`` writes it.

        The date and time of day are formatted once per second; a line adds
        only the microseconds (a ``datetime`` and its ``isoformat`` cost more
        than the rest of the line).
        """
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1_000_000):06d}Z"

    def configure(self, *, stream: TextIO, json_lines: bool, enabled: bool) -> None:
        self._stream, self._json, self._enabled = stream, json_lines, enabled

    def emit(
        self, *, method: str, route: str, path: str, status: int, duration_ms: float, request_id: str, tenant: Any
    ) -> None:
        if not self._enabled or self._stream is None:
            return
        if "eyJ" in path or "earer" in path or "://" in path:
            path = _scrub(path)
        if not self._json:
            fields: EventDict = {}
            request_fields(request_id, {"route": tenant}, fields)
            structlog.get_logger("tenantctl.access").info(
                "request", method=method, route=route, path=path, status=status, duration_ms=duration_ms, **fields
            )
            return
        timestamp = self._timestamp()
        line = (
            f'{{"event": "request", "level": "info", "timestamp": "{timestamp}", "method": {_json(method)}, '
            f'"route": {_json(route)}, "path": {_encode(path)}, "status": {status}, "duration_ms": {duration_ms}, '
            f'"request_id": {_encode(request_id)}'
        )
        if tenant is not None:
            line += (
                f', "tenant_id": "{tenant.tenant_text}", "tier": {_json(tenant.tier)}, '
                f'"placement": {_json(tenant.placement)}, "route_epoch": {int(tenant.epoch)}'
            )
        self._stream.write(line + "}\n")


# What ``json.dumps`` does for a str (ensure_ascii), without its encoder set-up.
_encode = encode_basestring_ascii
_ENCODED: dict[str, str] = {}


def _json(value: str) -> str:
    # Templates, methods, tiers, placements repeat: encode each distinct one
    # once (bounded, in case a tier name space were ever large).
    encoded = _ENCODED.get(value)
    if encoded is None:
        encoded = json.dumps(value)
        if len(value) <= 64 and len(_ENCODED) < 4096:
            _ENCODED[value] = encoded
    return encoded


access_log = AccessLog()
