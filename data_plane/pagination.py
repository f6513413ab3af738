"""Opaque keyset cursors: ``(created_at, id)`` of the last row, base64url JSON."""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Generic, Protocol, TypeVar

from fastapi import Query
from pydantic import BaseModel

from data_plane.exceptions import InvalidInputError

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size")]
Cursor = Annotated[str | None, Query(max_length=200, description="Opaque cursor from next_cursor")]


class Page(BaseModel, Generic[T]):
    data: list[T]
    next_cursor: str | None


def encode_cursor(created_at: datetime, row_id: uuid.UUID) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, row_id = json.loads(raw)
        # The cursor is client input: both parts must be what encode_cursor
        # writes (uuid.UUID(5) raises AttributeError, not ValueError).
        if not isinstance(created_at, str) or not isinstance(row_id, str):
            raise ValueError("cursor parts must be strings")
        after = datetime.fromisoformat(created_at)
        if after.tzinfo is None:
            raise ValueError("cursor time without a UTC offset")
        # In UTC here, as the database compares it: an instant that exists
        # only with its offset (0001-01-01T00:00+05:00) is refused now rather
        # than by the driver inside the query, which was a 500.
        return after.astimezone(UTC), uuid.UUID(row_id)
    except (binascii.Error, ValueError, TypeError, OverflowError, json.JSONDecodeError) as exc:
        raise InvalidInputError("invalid cursor", code="invalid_cursor") from exc


class _Keyed(Protocol):
    created_at: datetime
    id: uuid.UUID


M = TypeVar("M", bound=BaseModel)


def page_of(rows: Sequence[Any], *, limit: int, model: type[M]) -> Page[M]:
    """Build a page from ``limit + 1`` fetched rows (the extra one means "more")."""
    # Sorted here as well as in SQL: the fused read path (data_plane.session)
    # wraps the query in a join whose output order SQL does not promise.
    ordered = sorted(rows, key=lambda row: (row["created_at"], row["id"]))
    items = [model.model_validate(dict(row)) for row in ordered[:limit]]
    next_cursor = None
    if len(ordered) > limit and items:
        last: _Keyed = items[-1]  # type: ignore[assignment]
        next_cursor = encode_cursor(last.created_at, last.id)
    # Not ``Page[M](...)``: parametrizing by the TypeVar builds a class at run
    # time that pydantic caches only weakly, so it was garbage, collected and
    # rebuilt (a model class each time) after every cyclic collection.
    return Page(data=items, next_cursor=next_cursor)
