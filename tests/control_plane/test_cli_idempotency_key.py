"""`tenantctl tenants create`'s Idempotency-Key: one per invocation, shared by its own retries."""

from __future__ import annotations

import httpx
import pytest
from tenacity import wait_none

from control_plane.catalog import cli


def test_each_create_invocation_has_a_key_of_its_own() -> None:
    # A key derived from (slug, name, tier) was shared by every later create of
    # that slug: after an offboarding, the old 201 "active" was replayed.
    assert cli.new_idempotency_key() != cli.new_idempotency_key()


def test_a_create_is_retried_with_the_same_key_until_it_has_an_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "RETRY_WAIT", wait_none())
    seen: list[str | None] = []
    answers = [
        httpx.ConnectError("connection reset"),
        httpx.Response(503, json={"error": {"code": "unavailable", "message": "later"}}),
        httpx.Response(409, json={"error": {"code": "idempotency_in_flight", "message": "running"}}),
        httpx.Response(201, json={"id": "t"}),
    ]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("Idempotency-Key"))
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    with httpx.Client(transport=httpx.MockTransport(handler), base_url="http://admin") as client:
        response = cli._send_idempotent(client, "POST", "/v1/tenants", key="k-1", json={})
    assert response.status_code == 201
    assert seen == ["k-1"] * 4

    # A refusal is an answer: not retried.
    refusals = [httpx.Response(409, json={"error": {"code": "slug_taken", "message": "taken"}})]
    with httpx.Client(transport=httpx.MockTransport(lambda _: refusals.pop(0)), base_url="http://admin") as client:
        assert cli._send_idempotent(client, "POST", "/v1/tenants", key="k-2", json={}).status_code == 409
