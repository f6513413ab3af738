"""``Idempotency-Key`` storage for admin POSTs (table ``idempotency_keys``).

Keys are scoped by caller (token ``sub``). The first request with a key
records it ``in_flight`` in its own committed transaction, runs, then stores
its response (status, body, chosen headers). Then, for the same key:

* same request (method, path, body hash), response stored -> that response again;
* same request still running -> 409 ``idempotency_in_flight``;
* a different request -> 422 ``idempotency_key_reused``.

A 5xx is not stored (the key is released so a retry runs again), nor is a
refusal about a passing state (:data:`PASSING_STATE`: a fleet migration or
another job holds the tenant, rate limited, fenced): "retry then" must not be
answered with the same refusal once then has come. An ``in_flight`` row older
than ``STALE_AFTER`` (its process died) is taken over.

A key lives ``KEY_TTL`` (24 h) from its first request: after that it is free
again -- the next request with it runs, whatever it is -- and
:func:`purge_expired` deletes it. A key is for retrying one request, not a
name for the result forever: a stored 201 replayed months later would
describe a tenant that may long be gone.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from control_plane.catalog.models import idempotency_keys
from control_plane.exceptions import (
    IdempotencyInFlightError,
    IdempotencyKeyReusedError,
    JobInProgressError,
    OperationLockedError,
)
from data_plane.exceptions import InvalidInputError, RateLimitedError, ServiceUnavailableError, TenantctlError

STALE_AFTER = timedelta(minutes=5)
KEY_TTL = timedelta(hours=24)
MAX_KEY_LENGTH = 255

# Refusals that say "not now" rather than "no": the request did not run, and a
# retry once the state has passed (migration over, job finished, window
# elapsed, cutover done) must run. OperationLockedError covers
# migration_in_progress; ServiceUnavailableError every 503 (tenant_fenced too).
PASSING_STATE: tuple[type[TenantctlError], ...] = (
    OperationLockedError,
    JobInProgressError,
    IdempotencyInFlightError,
    RateLimitedError,
    ServiceUnavailableError,
)


def is_stored(exc: TenantctlError) -> bool:
    """Whether a refusal is an answer to replay (the same retry gets the same refusal)."""
    return exc.status_code < 500 and not isinstance(exc, PASSING_STATE)


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)


def request_hash(method: str, path: str, body: bytes) -> str:
    """Hash of the request; JSON bodies are canonicalised so key order does not matter."""
    try:
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except ValueError:
        canonical = body
    digest = hashlib.sha256()
    for part in (method.upper().encode(), path.encode(), canonical):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def validate_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH:
        raise InvalidInputError(f"Idempotency-Key must be 1..{MAX_KEY_LENGTH} characters")
    return key


def _expired(ttl: timedelta) -> sa.ColumnElement[bool]:
    return idempotency_keys.c.created_at < sa.func.now() - sa.cast(ttl, sa.Interval)


async def begin(
    session: AsyncSession, *, actor: str, key: str, fingerprint: str, ttl: timedelta = KEY_TTL
) -> StoredResponse | None:
    """Claim ``key`` (None: go ahead) or return the stored response to replay.

    A key older than ``ttl`` is claimed as if it were new (its stored answer dropped).
    """
    table = idempotency_keys
    async with session.begin():
        statement = insert(table).values(actor=actor, key=key, request_hash=fingerprint, state="in_flight")
        claimed = await session.scalar(
            statement.on_conflict_do_update(
                index_elements=[table.c.actor, table.c.key],
                set_={
                    "request_hash": statement.excluded.request_hash,
                    "state": "in_flight",
                    "response_status": None,
                    "response_body": None,
                    "response_headers": sa.text("'{}'::jsonb"),
                    "created_at": sa.func.now(),
                    "updated_at": sa.func.now(),
                },
                where=_expired(ttl),
            ).returning(table.c.key)
        )
        if claimed is not None:
            return None
        row = (
            await session.execute(
                sa.select(
                    table,
                    (table.c.updated_at < sa.func.now() - sa.cast(STALE_AFTER, sa.Interval)).label("stale"),
                )
                .where(table.c.actor == actor, table.c.key == key)
                .with_for_update(of=table)
            )
        ).one()
        if row.request_hash != fingerprint:
            raise IdempotencyKeyReusedError("this Idempotency-Key was used for a different request")
        if row.state == "done":
            return StoredResponse(
                status=int(row.response_status), body=row.response_body, headers=dict(row.response_headers)
            )
        if not row.stale:
            raise IdempotencyInFlightError("a request with this Idempotency-Key is still in progress")
        await session.execute(
            sa.update(table).where(table.c.actor == actor, table.c.key == key).values(updated_at=sa.func.now())
        )
        return None


async def complete(session: AsyncSession, *, actor: str, key: str, response: StoredResponse) -> None:
    table = idempotency_keys
    async with session.begin():
        await session.execute(
            sa.update(table)
            .where(table.c.actor == actor, table.c.key == key)
            .values(
                state="done",
                response_status=response.status,
                response_body=response.body,
                response_headers=response.headers,
                updated_at=sa.func.now(),
            )
        )


async def release(session: AsyncSession, *, actor: str, key: str) -> None:
    table = idempotency_keys
    async with session.begin():
        await session.execute(
            sa.delete(table).where(table.c.actor == actor, table.c.key == key, table.c.state == "in_flight")
        )


async def purge_expired(session: AsyncSession, *, ttl: timedelta = KEY_TTL) -> int:
    """Delete keys older than ``ttl`` (never replayed again anyway); how many."""
    async with session.begin():
        result = await session.execute(sa.delete(idempotency_keys).where(_expired(ttl)))
    return int(getattr(result, "rowcount", 0) or 0)
