"""Admin API on real PostgreSQL: auth, lifecycle, concurrency, idempotency, audit."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from control_plane import keys
from control_plane.settings import ControlPlaneSettings
from control_plane.stack import Endpoints
from tests.control_plane.conftest import audit_entries, ownership


async def create(admin: httpx.AsyncClient, slug: str, tier: str = "free", **headers: str) -> httpx.Response:
    return await admin.post("/v1/tenants", json={"slug": slug, "name": slug.title(), "tier": tier}, headers=headers)


async def test_pool_tenant_is_active_at_once_and_claimed_in_the_pool(
    admin: httpx.AsyncClient, endpoints: Endpoints
) -> None:
    response = await create(admin, "acme")
    assert response.status_code == 201, response.text
    tenant = response.json()
    assert tenant["slug"] == "acme"
    assert tenant["status"] == "active"
    assert tenant["placement"] == {"kind": "pool", "location": "pool"}
    assert tenant["route_epoch"] == 1
    assert set(tenant) >= {"id", "slug", "name", "tier", "status", "placement", "route_epoch"}
    assert ownership(endpoints.pool_url, tenant["id"]) == ("active", 1)

    by_slug = await admin.get("/v1/tenants/acme")
    by_id = await admin.get(f"/v1/tenants/{tenant['id']}")
    assert by_slug.json() == by_id.json() == tenant
    assert (await admin.get("/v1/tenants/nope")).status_code == 404


async def test_create_validates_input_and_refuses_a_taken_slug(admin: httpx.AsyncClient) -> None:
    assert (await create(admin, "acme")).status_code == 201
    taken = await create(admin, "acme")
    assert taken.status_code == 409
    assert taken.json()["error"]["code"] == "slug_taken"
    for body in (
        {"slug": "Bad Slug", "name": "x", "tier": "free"},
        {"slug": "okay", "name": "", "tier": "free"},
        {"slug": "okay", "name": "x", "tier": "platinum"},
        {"slug": "okay", "name": "x"},
    ):
        response = await admin.post("/v1/tenants", json=body)
        assert response.status_code == 422, body
        assert response.json()["error"]["code"] == "invalid_input"


async def test_lifecycle_transitions_and_every_illegal_one(admin: httpx.AsyncClient) -> None:
    tenant_id = (await create(admin, "acme")).json()["id"]

    async def act(verb: str) -> httpx.Response:
        return await admin.post(f"/v1/tenants/{tenant_id}/{verb}")

    illegal = await act("resume")  # active -> active
    assert illegal.status_code == 409
    assert illegal.json()["error"]["code"] == "illegal_transition"

    suspended = await act("suspend")
    assert suspended.status_code == 200
    assert suspended.json()["status"] == "suspended"
    assert (await act("suspend")).json()["error"]["code"] == "illegal_transition"
    resumed = await act("resume")
    assert resumed.json()["status"] == "active"

    deleting = await admin.delete(f"/v1/tenants/{tenant_id}")
    assert deleting.status_code == 202
    job = deleting.json()["job"]
    assert job["kind"] == "offboarding"
    assert job["status"] == "pending"
    assert job["tenant_id"] == tenant_id
    assert set(job) >= {"id", "kind", "tenant_id", "status", "step", "progress", "error"}
    assert (await admin.get(f"/v1/tenants/{tenant_id}")).json()["status"] == "offboarding"
    for verb in ("suspend", "resume"):
        response = await act(verb)
        assert response.status_code == 409, verb
        assert response.json()["error"]["code"] == "illegal_transition"
    second = await admin.delete(f"/v1/tenants/{tenant_id}")
    assert second.status_code == 409
    patched = await admin.patch(f"/v1/tenants/{tenant_id}", json={"name": "New"})
    assert patched.status_code == 409

    # Cancelling the job before it starts puts the tenant back where it was.
    cancelled = await admin.post(f"/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json()["job"]["status"] == "cancelled"
    assert (await admin.get(f"/v1/tenants/{tenant_id}")).json()["status"] == "active"
    again = await admin.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_not_cancellable"
    assert (await admin.get(f"/v1/jobs/{job['id']}")).json()["status"] == "cancelled"


def test_state_machine_table_allows_exactly_the_documented_edges() -> None:
    from control_plane.catalog.lifecycle import Action, Status, next_status
    from control_plane.exceptions import IllegalTransitionError

    allowed = {
        (Action.ACTIVATE, Status.PROVISIONING): Status.ACTIVE,
        (Action.SUSPEND, Status.ACTIVE): Status.SUSPENDED,
        (Action.RESUME, Status.SUSPENDED): Status.ACTIVE,
        (Action.START_MOVE, Status.ACTIVE): Status.MOVING,
        (Action.FINISH_MOVE, Status.MOVING): Status.ACTIVE,
        (Action.OFFBOARD, Status.PROVISIONING): Status.OFFBOARDING,
        (Action.OFFBOARD, Status.ACTIVE): Status.OFFBOARDING,
        (Action.OFFBOARD, Status.SUSPENDED): Status.OFFBOARDING,
        (Action.TOMBSTONE, Status.OFFBOARDING): Status.DELETED,
    }
    for action in Action:
        for status in Status:
            if action is Action.CANCEL_OFFBOARD:
                continue
            if (action, status) in allowed:
                assert next_status(action, status) is allowed[(action, status)]
            else:
                with pytest.raises(IllegalTransitionError):
                    next_status(action, status)
    assert next_status(Action.CANCEL_OFFBOARD, "offboarding", previous="suspended") is Status.SUSPENDED
    with pytest.raises(IllegalTransitionError):
        next_status(Action.CANCEL_OFFBOARD, "offboarding", previous="deleted")
    with pytest.raises(IllegalTransitionError):
        next_status(Action.CANCEL_OFFBOARD, "active", previous="active")


async def test_patch_with_optimistic_concurrency(admin: httpx.AsyncClient) -> None:
    created = await create(admin, "acme")
    tenant_id = created.json()["id"]
    version = created.json()["version"]
    assert created.headers["ETag"] == f'"{version}"'

    ok = await admin.patch(
        f"/v1/tenants/{tenant_id}", json={"tier": "enterprise"}, headers={"If-Match": f'"{version}"'}
    )
    assert ok.status_code == 200, ok.text
    assert ok.json()["tier"] == "enterprise"
    # Changing the tier moves no data: still in the pool.
    assert ok.json()["placement"] == {"kind": "pool", "location": "pool"}
    assert ok.json()["version"] == version + 1

    stale = await admin.patch(f"/v1/tenants/{tenant_id}", json={"name": "Stale"}, headers={"If-Match": str(version)})
    assert stale.status_code == 409
    assert stale.json()["error"]["code"] == "version_conflict"
    stale_body = await admin.patch(f"/v1/tenants/{tenant_id}", json={"name": "Stale", "version": version})
    assert stale_body.json()["error"]["code"] == "version_conflict"
    fresh = await admin.patch(f"/v1/tenants/{tenant_id}", json={"name": "Fresh", "version": version + 1})
    assert fresh.json()["name"] == "Fresh"
    unconditional = await admin.patch(f"/v1/tenants/{tenant_id}", json={"name": "Again"})
    assert unconditional.json()["name"] == "Again"
    assert (await admin.patch(f"/v1/tenants/{tenant_id}", json={"tier": "gold"})).status_code == 422
    assert (await admin.patch(f"/v1/tenants/{tenant_id}", json={"status": "deleted"})).status_code == 422


async def test_list_filters_and_cursor_pagination(admin: httpx.AsyncClient) -> None:
    slugs = [f"t{i:02d}" for i in range(7)]
    for i, slug in enumerate(slugs):
        assert (await create(admin, slug, tier="standard" if i % 2 else "free")).status_code == 201
    await admin.post("/v1/tenants/t00/suspend")

    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, str | int] = {"limit": 3}
        if cursor:
            params["cursor"] = cursor
        page = (await admin.get("/v1/tenants", params=params)).json()
        seen += [t["slug"] for t in page["data"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == slugs
    assert pages == 3

    standard = (await admin.get("/v1/tenants", params={"tier": "standard"})).json()
    assert [t["slug"] for t in standard["data"]] == ["t01", "t03", "t05"]
    suspended = (await admin.get("/v1/tenants", params={"status": "suspended"})).json()
    assert [t["slug"] for t in suspended["data"]] == ["t00"]
    assert (await admin.get("/v1/tenants", params={"placement": "silo"})).json()["data"] == []
    assert (await admin.get("/v1/tenants", params={"status": "weird"})).status_code == 422
    assert (await admin.get("/v1/tenants", params={"cursor": "!!"})).status_code == 422
    assert (await admin.get("/v1/tenants", params={"limit": 0})).status_code == 422


async def test_idempotency_key_semantics(admin: httpx.AsyncClient, endpoints: Endpoints) -> None:
    first = await create(admin, "acme", **{"Idempotency-Key": "k1"})
    replay = await create(admin, "acme", **{"Idempotency-Key": "k1"})
    assert first.status_code == replay.status_code == 201
    assert replay.json() == first.json()
    assert replay.headers["Idempotent-Replayed"] == "true"
    listed = (await admin.get("/v1/tenants")).json()["data"]
    assert len(listed) == 1  # executed once

    # Same key, different body -> 422; key order in the body does not matter.
    other = await create(admin, "other", **{"Idempotency-Key": "k1"})
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_key_reused"
    reordered = await admin.post(
        "/v1/tenants",
        content=b'{"tier": "free", "name": "Acme", "slug": "acme"}',
        headers={"Idempotency-Key": "k1", "Content-Type": "application/json"},
    )
    assert reordered.status_code == 201

    # A refusal is stored too: replaying it does not re-run the action.
    tenant_id = first.json()["id"]
    refused = await admin.post(f"/v1/tenants/{tenant_id}/resume", headers={"Idempotency-Key": "k2"})
    assert refused.status_code == 409
    await admin.post(f"/v1/tenants/{tenant_id}/suspend")
    refused_again = await admin.post(f"/v1/tenants/{tenant_id}/resume", headers={"Idempotency-Key": "k2"})
    assert refused_again.status_code == 409
    assert (await admin.get(f"/v1/tenants/{tenant_id}")).json()["status"] == "suspended"

    # Keys are per caller: bob's k1 is a new request.
    bob = {"Authorization": f"Bearer {keys.admin_token(admin_settings(admin), subject='bob')}"}
    bobs = await admin.post(
        "/v1/tenants",
        json={"slug": "bobco", "name": "B", "tier": "free"},
        headers={**bob, "Idempotency-Key": "k1"},
    )
    assert bobs.status_code == 201


def admin_settings(admin: httpx.AsyncClient) -> ControlPlaneSettings:
    transport = admin._transport
    assert isinstance(transport, httpx.ASGITransport)
    settings: ControlPlaneSettings = transport.app.state.settings  # type: ignore[attr-defined]
    return settings


async def test_concurrent_duplicate_is_409(admin: httpx.AsyncClient, endpoints: Endpoints) -> None:
    import psycopg

    from data_plane.dsn import libpq

    # Hold the pool's ownership table so the first request stays in flight.
    with psycopg.connect(libpq(endpoints.pool_url)) as blocker:
        blocker.execute("LOCK TABLE tenantctl.tenant_ownership IN ACCESS EXCLUSIVE MODE")
        first = asyncio.create_task(create(admin, "acme", **{"Idempotency-Key": "dup"}))
        for _ in range(100):
            await asyncio.sleep(0.02)
            with psycopg.connect(libpq(endpoints.catalog_url)) as conn:
                if conn.execute("SELECT 1 FROM idempotency_keys WHERE key = 'dup'").fetchone():
                    break
        second = await create(admin, "acme", **{"Idempotency-Key": "dup"})
        assert second.status_code == 409
        assert second.json()["error"]["code"] == "idempotency_in_flight"
        blocker.rollback()
    assert (await first).status_code == 201


async def test_every_admin_action_is_audited_with_the_token_subject(
    admin: httpx.AsyncClient, endpoints: Endpoints
) -> None:
    tenant_id = (await create(admin, "acme")).json()["id"]
    await admin.patch(f"/v1/tenants/{tenant_id}", json={"name": "Renamed"})
    await admin.post(f"/v1/tenants/{tenant_id}/suspend")
    await admin.post(f"/v1/tenants/{tenant_id}/resume")
    job = (await admin.delete(f"/v1/tenants/{tenant_id}")).json()["job"]
    await admin.post(f"/v1/jobs/{job['id']}/cancel")
    assert audit_entries(endpoints.catalog_url, tenant_id) == [
        ("alice", "tenant.create"),
        ("alice", "tenant.activate"),
        ("alice", "tenant.update"),
        ("alice", "tenant.suspend"),
        ("alice", "tenant.resume"),
        ("alice", "tenant.offboard"),
        ("alice", "tenant.cancel_offboard"),
        ("alice", "job.cancel"),
    ]


async def test_tokens_other_than_admin_are_refused(admin: httpx.AsyncClient, cp_settings: ControlPlaneSettings) -> None:
    import time
    import uuid

    import jwt

    tenant_token = keys.tenant_token(cp_settings, tenant_id=uuid.uuid4())
    for headers in (
        {"Authorization": f"Bearer {tenant_token}"},
        {"Authorization": ""},
        {"Authorization": "Bearer junk"},
    ):
        response = await admin.get("/v1/tenants", headers=headers)
        assert response.status_code == 401, headers
        assert response.headers["WWW-Authenticate"] == "Bearer"
    now = int(time.time())
    key = cp_settings.dev_private_key_path.read_bytes()
    claims = {
        "iss": cp_settings.jwt_issuer,
        "aud": cp_settings.jwt_admin_audience,
        "sub": "x",
        "exp": now + 60,
    }
    no_scope = jwt.encode(claims, key, algorithm="ES256")
    response = await admin.get("/v1/tenants", headers={"Authorization": f"Bearer {no_scope}"})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"
    smuggled = jwt.encode(
        {**claims, "scope": "tenantctl:admin", "tenant_id": str(uuid.uuid4())}, key, algorithm="ES256"
    )
    response = await admin.get("/v1/tenants", headers={"Authorization": f"Bearer {smuggled}"})
    assert response.status_code == 401


async def test_health_metrics_and_openapi_error_schemas(admin: httpx.AsyncClient) -> None:
    assert (await admin.get("/healthz")).json() == {"status": "ok"}
    await admin.get("/v1/tenants")
    metrics = await admin.get("/metrics")
    assert 'tenantctl_admin_requests_total{method="GET",route="/v1/tenants",status="200"}' in metrics.text
    spec = (await admin.get("/openapi.json")).json()
    post = spec["paths"]["/v1/tenants"]["post"]
    assert {"201", "401", "403", "409", "422"} <= set(post["responses"])
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert "/v1/jobs/{job_id}/cancel" in spec["paths"]


async def test_suspend_and_resume_notify_the_route_channel(admin: httpx.AsyncClient, endpoints: Endpoints) -> None:
    import psycopg

    from data_plane.dsn import libpq

    tenant_id = (await create(admin, "acme")).json()["id"]
    with psycopg.connect(libpq(endpoints.app_catalog_url), autocommit=True) as listener:
        listener.execute("LISTEN tenant_routes")
        await admin.post(f"/v1/tenants/{tenant_id}/suspend")
        # The payload (catalog_0013): id, route epoch, status, tier, placement, location, next location.
        payloads = [n.payload.split(" ") for n in listener.notifies(timeout=2, stop_after=1)]
        assert [(p[0], p[2], len(p)) for p in payloads] == [(tenant_id, "suspended", 7)]
        route = listener.execute("SELECT status FROM tenant_routes WHERE tenant_id = %s", (tenant_id,)).fetchone()
        assert route == ("suspended",)
        await admin.post(f"/v1/tenants/{tenant_id}/resume")
        payloads = [n.payload.split(" ") for n in listener.notifies(timeout=2, stop_after=1)]
        assert [(p[0], p[2], p[-1]) for p in payloads] == [(tenant_id, "active", "-")]


async def test_a_pool_onboarding_that_died_before_activation_is_resumed_by_a_retry(
    admin: httpx.AsyncClient, endpoints: Endpoints
) -> None:
    import psycopg

    from data_plane.dsn import libpq

    # What a crash between "recorded" and "claimed" leaves behind.
    with psycopg.connect(libpq(endpoints.catalog_url)) as conn:
        conn.execute(
            "INSERT INTO tenants (slug, name, tier, status, placement, location_id) "
            "SELECT 'halfway', 'Halfway', 'free', 'provisioning', 'pool', id FROM locations WHERE name = 'pool'"
        )
    different = await admin.post("/v1/tenants", json={"slug": "halfway", "name": "Other", "tier": "free"})
    assert different.status_code == 409
    retried = await admin.post("/v1/tenants", json={"slug": "halfway", "name": "Halfway", "tier": "free"})
    assert retried.status_code == 201
    assert retried.json()["status"] == "active"
    assert ownership(endpoints.pool_url, retried.json()["id"]) == ("active", 1)


async def test_an_oversized_body_is_413(admin: httpx.AsyncClient) -> None:
    response = await admin.post(
        "/v1/tenants", json={"slug": "big", "name": "x" * 70_000, "tier": "free"}, headers={"Idempotency-Key": "big"}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


async def test_admin_requests_carry_a_request_id_in_headers_and_logs(
    cp_settings: ControlPlaneSettings, endpoints: Endpoints
) -> None:
    import io
    import json

    import structlog

    from control_plane.api import create_app
    from data_plane.logs import configure_logging
    from data_plane.settings import LogFormat
    from tests.conftest import asgi_client
    from tests.control_plane.conftest import admin_headers

    settings = cp_settings.model_copy(update={"log_format": LogFormat.JSON})
    app = create_app(settings, endpoints)
    stream = io.StringIO()
    configure_logging(settings, stream=stream)
    try:
        async for client in asgi_client(app):
            client.headers.update(admin_headers(settings))
            created = await client.post(
                "/v1/tenants",
                json={"slug": "traced", "name": "Traced", "tier": "free"},
                headers={"X-Request-ID": "adm-42"},
            )
            assert created.status_code == 201 and created.headers["x-request-id"] == "adm-42"
            missing = await client.get("/v1/tenants/nope")
            assert missing.status_code == 404
            generated = missing.headers["x-request-id"]
            assert generated and generated != "adm-42"
            forged = await client.get("/v1/tenants", headers={"X-Request-ID": "x\nforged"})
            assert forged.headers["x-request-id"] != "x\nforged"
    finally:
        structlog.reset_defaults()
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line.strip()]
    access = {line["request_id"]: line for line in lines if line["event"] == "request"}
    assert access["adm-42"]["route"] == "/v1/tenants" and access["adm-42"]["status"] == 201
    assert access[generated]["route"] == "/v1/tenants/{tenant}" and access[generated]["status"] == 404
    assert "x\nforged" not in access
    assert "Bearer" not in stream.getvalue()


async def test_jobs_list_filters_and_keyset_cursor_pagination(admin: httpx.AsyncClient, endpoints: Endpoints) -> None:
    import psycopg

    from data_plane.dsn import libpq

    tenant_ids = [(await create(admin, f"j{i:02d}")).json()["id"] for i in range(5)]
    offboardings = [(await admin.delete(f"/v1/tenants/{t}")).json()["job"]["id"] for t in tenant_ids]
    with psycopg.connect(libpq(endpoints.catalog_url)) as conn:
        # Two jobs with the same created_at: the id breaks the tie, no page loses or repeats one.
        tied = [
            str(row[0])
            for row in conn.execute(
                "INSERT INTO jobs (id, kind, tenant_id, status, created_by, created_at) "
                "SELECT gen_random_uuid(), 'promotion', NULL, 'failed', 'test', '2026-01-01T00:00:00Z' "
                "FROM generate_series(1, 2) RETURNING id"
            ).fetchall()
        ]
    expected = {*offboardings, *tied}

    async def pages(params: dict[str, str | int], *, between: Any = None) -> list[list[dict[str, Any]]]:
        result, cursor = [], None
        while True:
            response = await admin.get("/v1/jobs", params={**params, **({"cursor": cursor} if cursor else {})})
            assert response.status_code == 200, response.text
            result.append(response.json()["data"])
            cursor = response.json()["next_cursor"]
            if cursor is None:
                return result
            if between is not None:
                await between()
                between = None

    async def a_new_job_arrives() -> None:
        await admin.delete(f"/v1/tenants/{(await create(admin, 'late')).json()['id']}")

    paged = await pages({"limit": 3}, between=a_new_job_arrives)
    assert [len(page) for page in paged] == [3, 3, 1]
    seen = [job["id"] for page in paged for job in page]
    assert len(seen) == len(set(seen)) and set(seen) == expected  # the late job shifted nothing
    created = [job["created_at"] for page in paged for job in page]
    assert created == sorted(created, reverse=True)  # newest first
    assert seen[-2:] == sorted(tied, reverse=True)

    assert len(await pages({"limit": 200})) == 1
    mine = (await admin.get("/v1/jobs", params={"tenant_id": tenant_ids[2]})).json()
    assert [job["id"] for job in mine["data"]] == [offboardings[2]] and mine["next_cursor"] is None
    failed = (await admin.get("/v1/jobs", params={"status": "failed", "kind": "promotion"})).json()["data"]
    assert {job["id"] for job in failed} == set(tied)
    assert (await admin.get("/v1/jobs", params={"kind": "offboarding", "status": "failed"})).json()["data"] == []
    assert (await admin.get("/v1/jobs", params={"status": "weird"})).status_code == 422
    assert (await admin.get("/v1/jobs", params={"cursor": "!!"})).status_code == 422
    assert (await admin.get("/v1/jobs", params={"limit": 0})).status_code == 422


def _audit_details(catalog_url: str, tenant_id: str, action: str) -> list[tuple[str, dict[str, Any]]]:
    import psycopg

    from data_plane.dsn import libpq

    with psycopg.connect(libpq(catalog_url)) as conn:
        rows = conn.execute(
            "SELECT actor, detail FROM audit_log WHERE tenant_id = %s AND action = %s ORDER BY id", (tenant_id, action)
        ).fetchall()
    return [(str(actor), dict(detail)) for actor, detail in rows]


async def test_promote_and_demote_are_audited_with_their_job(admin: httpx.AsyncClient, endpoints: Endpoints) -> None:
    import psycopg

    from data_plane.dsn import libpq

    pool_tenant = (await create(admin, "grows")).json()["id"]
    promoted = await admin.post(f"/v1/tenants/{pool_tenant}/promote", json={"mode": "offline"})
    assert promoted.status_code == 202, promoted.text
    job = promoted.json()["job"]
    assert _audit_details(endpoints.catalog_url, pool_tenant, "tenant.start_move") == [
        (
            "alice",
            {
                "from": "active",
                "to": "moving",
                "placement": "silo",
                "mode": "offline",
                "job_id": job["id"],
                "kind": "promotion",
            },
        )
    ]

    # An active silo tenant (recorded directly: no executor runs in this test).
    with psycopg.connect(libpq(endpoints.catalog_url)) as conn:
        silo_tenant = str(
            conn.execute(
                "WITH l AS (INSERT INTO locations (name, kind, provider, dsn) "
                "VALUES ('silo-shrinks', 'silo', 'local', 'postgresql://x@127.0.0.1:1/x') RETURNING id) "
                "INSERT INTO tenants (slug, name, tier, status, placement, location_id) "
                "SELECT 'shrinks', 'Shrinks', 'enterprise', 'active', 'silo', id FROM l RETURNING id"
            ).fetchone()[0]  # type: ignore[index]
        )
    demoted = await admin.post(f"/v1/tenants/{silo_tenant}/demote")
    assert demoted.status_code == 202, demoted.text
    details = _audit_details(endpoints.catalog_url, silo_tenant, "tenant.start_move")
    assert [(actor, d["job_id"], d["kind"], d["placement"]) for actor, d in details] == [
        ("alice", demoted.json()["job"]["id"], "demotion", "pool")
    ]
    # Control: a refused move (already in the pool) writes nothing.
    assert (await admin.post(f"/v1/tenants/{silo_tenant}/promote")).status_code == 409
    assert len(_audit_details(endpoints.catalog_url, silo_tenant, "tenant.start_move")) == 1


async def test_a_patch_that_changes_nothing_is_not_audited_and_keeps_the_version(
    admin: httpx.AsyncClient, endpoints: Endpoints
) -> None:
    """Documented choice (PATCH /v1/tenants/{id}): the audit log records changes of state;
    a PATCH restating the current values changes nothing, so it bumps no version and
    writes no entry (a stale If-Match is still refused)."""
    created = (await create(admin, "steady")).json()
    same = await admin.patch(f"/v1/tenants/{created['id']}", json={"name": created["name"], "tier": created["tier"]})
    assert same.status_code == 200 and same.json()["version"] == created["version"]
    assert ("alice", "tenant.update") not in audit_entries(endpoints.catalog_url, created["id"])
    stale = await admin.patch(
        f"/v1/tenants/{created['id']}", json={"name": created["name"], "version": created["version"] + 1}
    )
    assert stale.status_code == 409
    # Control: a real change is audited.
    assert (await admin.patch(f"/v1/tenants/{created['id']}", json={"name": "Moved On"})).status_code == 200
    assert audit_entries(endpoints.catalog_url, created["id"])[-1] == ("alice", "tenant.update")


def test_the_database_refuses_to_rewrite_or_erase_the_audit_log(endpoints: Endpoints) -> None:
    import psycopg

    from data_plane.dsn import libpq

    # As the owner role, which owns the table: only the trigger stands in the way.
    with psycopg.connect(libpq(endpoints.catalog_url), autocommit=True) as conn:
        row = conn.execute(
            "INSERT INTO audit_log (actor, action, detail) VALUES ('test', 'probe', '{}') RETURNING id"
        ).fetchone()
        assert row is not None  # control: appending works
        for statement in (
            "UPDATE audit_log SET actor = 'forged' WHERE id = %s",
            "DELETE FROM audit_log WHERE id = %s",
        ):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(statement, (row[0],))
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
            conn.execute("TRUNCATE audit_log")
        assert conn.execute("SELECT actor FROM audit_log WHERE id = %s", (row[0],)).fetchone() == ("test",)


async def test_a_slug_in_the_form_of_an_id_is_refused_so_a_reference_names_one_tenant(
    admin: httpx.AsyncClient,
) -> None:
    """``{id or slug}`` reads any UUID-parsable string as an id; a slug of that form would
    address the tenant whose id it spells (or nobody), so create refuses it."""
    victim = (await create(admin, "victim")).json()
    for slug in (
        victim["id"].replace("-", ""),  # another tenant's id without dashes
        victim["id"],  # ... and with them
        "0123456789abcdef0123456789abcdef",  # an id of no tenant
        "0123456789abcdef-0123456789abcdef",  # uuid.UUID ignores dashes wherever they are
    ):
        refused = await admin.post("/v1/tenants", json={"slug": slug, "name": "Hex", "tier": "free"})
        assert refused.status_code == 422, slug
        error = refused.json()["error"]
        assert error["code"] == "invalid_input" and "UUID" in error["message"], error
    assert [t["slug"] for t in (await admin.get("/v1/tenants")).json()["data"]] == ["victim"]
    assert (await admin.get(f"/v1/tenants/{victim['id'].replace('-', '')}")).json()["id"] == victim["id"]
    assert (await admin.get("/v1/tenants/0123456789abcdef0123456789abcdef")).status_code == 404

    # Control: hex digits in a slug are fine when it cannot be read as an id.
    for slug in ("0123456789abcdef0123456789abcde", "cafe-1234", "0123456789abcdef0123456789abcdefa"):
        made = await admin.post("/v1/tenants", json={"slug": slug, "name": "Hex", "tier": "free"})
        assert made.status_code == 201, made.text
        assert (await admin.get(f"/v1/tenants/{slug}")).json()["id"] == made.json()["id"]
    assert (await admin.get(f"/v1/tenants/{victim['id']}")).json()["status"] == "active"


async def test_a_refusal_to_retry_later_is_not_replayed_to_the_retry(
    admin: httpx.AsyncClient, endpoints: Endpoints
) -> None:
    """``migration_in_progress`` says "retry when it is over": the retry with the same
    Idempotency-Key then runs, instead of getting the stored 409 forever."""
    import psycopg

    from control_plane.interlock import FLEET_MIGRATION_KEY, INTERLOCK_NAMESPACE
    from data_plane.dsn import libpq

    tenant_id = (await create(admin, "acme")).json()["id"]
    key = {"Idempotency-Key": "promote-acme-1"}
    with psycopg.connect(libpq(endpoints.catalog_url), autocommit=True) as fleet:
        fleet.execute("SELECT pg_advisory_lock(%s, %s)", (INTERLOCK_NAMESPACE, FLEET_MIGRATION_KEY))
        refused = await admin.post(f"/v1/tenants/{tenant_id}/promote", headers=key)
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "migration_in_progress"
        again = await admin.post(f"/v1/tenants/{tenant_id}/promote", headers=key)
        assert again.json()["error"]["code"] == "migration_in_progress"
        assert "Idempotent-Replayed" not in again.headers  # asked again, not replayed
        fleet.execute("SELECT pg_advisory_unlock(%s, %s)", (INTERLOCK_NAMESPACE, FLEET_MIGRATION_KEY))
    retried = await admin.post(f"/v1/tenants/{tenant_id}/promote", headers=key)
    assert retried.status_code == 202, retried.text
    assert "Idempotent-Replayed" not in retried.headers
    # What ran is stored as before: the next retry replays the 202, starting no second move.
    replayed = await admin.post(f"/v1/tenants/{tenant_id}/promote", headers=key)
    assert replayed.status_code == 202 and replayed.headers["Idempotent-Replayed"] == "true"
    assert replayed.json() == retried.json()


def test_only_refusals_of_requests_that_ran_are_stored_for_replay() -> None:
    from control_plane.catalog.idempotency import is_stored
    from control_plane.exceptions import (
        IllegalTransitionError,
        JobInProgressError,
        MigrationInProgressError,
        OperationLockedError,
        VersionConflictError,
    )
    from data_plane.exceptions import (
        InvalidInputError,
        NotFoundError,
        RateLimitedError,
        ServiceUnavailableError,
        TenantctlError,
        TenantFencedError,
    )

    passing = (
        MigrationInProgressError(),
        OperationLockedError(),
        JobInProgressError(),
        RateLimitedError(),
        TenantFencedError(),
        ServiceUnavailableError(),
        TenantctlError(),
    )
    assert not any(is_stored(exc) for exc in passing)
    assert all(
        is_stored(exc)
        for exc in (IllegalTransitionError(), VersionConflictError(), NotFoundError(), InvalidInputError())
    )


def _age_idempotency_keys(catalog_url: str, hours: float) -> None:
    import psycopg

    from data_plane.dsn import libpq

    with psycopg.connect(libpq(catalog_url)) as conn:
        conn.execute("UPDATE idempotency_keys SET created_at = now() - make_interval(secs => %s)", (hours * 3600,))


async def test_an_idempotency_key_expires_after_a_day_and_is_then_purged(
    admin: httpx.AsyncClient, endpoints: Endpoints
) -> None:
    """A stored answer is for retries of one request, not forever: a day on, the key runs
    its request again (here: refused, the slug is taken) instead of replaying the old 201."""
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from control_plane.catalog import idempotency
    from data_plane.dsn import async_url

    first = await create(admin, "acme", **{"Idempotency-Key": "k1"})
    assert first.status_code == 201
    _age_idempotency_keys(endpoints.catalog_url, hours=23)
    replayed = await create(admin, "acme", **{"Idempotency-Key": "k1"})  # control: still within the day
    assert replayed.status_code == 201 and replayed.headers["Idempotent-Replayed"] == "true"

    _age_idempotency_keys(endpoints.catalog_url, hours=25)
    ran = await create(admin, "acme", **{"Idempotency-Key": "k1"})
    assert ran.status_code == 409 and ran.json()["error"]["code"] == "slug_taken"
    assert "Idempotent-Replayed" not in ran.headers
    # The key now holds that answer, for a day from this request.
    assert (await create(admin, "acme", **{"Idempotency-Key": "k1"})).headers["Idempotent-Replayed"] == "true"
    # An expired key may even be reused for another request.
    _age_idempotency_keys(endpoints.catalog_url, hours=25)
    assert (await create(admin, "other", **{"Idempotency-Key": "k1"})).status_code == 201

    assert (await create(admin, "fresh", **{"Idempotency-Key": "k2"})).status_code == 201
    engine = create_async_engine(async_url(endpoints.catalog_url))
    try:
        _age_idempotency_keys(endpoints.catalog_url, hours=0)
        async with async_sessionmaker(engine)() as session:
            assert await idempotency.purge_expired(session) == 0
        with psycopg_conn(endpoints.catalog_url) as conn:
            conn.execute("UPDATE idempotency_keys SET created_at = now() - interval '25 hours' WHERE key = 'k1'")
        async with async_sessionmaker(engine)() as session:
            assert await idempotency.purge_expired(session) == 1
    finally:
        await engine.dispose()
    with psycopg_conn(endpoints.catalog_url) as conn:
        assert conn.execute("SELECT key FROM idempotency_keys").fetchall() == [("k2",)]


def psycopg_conn(catalog_url: str) -> Any:
    import psycopg

    from data_plane.dsn import libpq

    return psycopg.connect(libpq(catalog_url))


@pytest.mark.parametrize(
    "query",
    [
        {"to": "0001-01-01T00:00:00Z"},  # the default from, a day earlier, is before year 1
        {"from": "0001-01-01T00:00:00+01:00", "to": "2026-01-01T00:00:00Z"},  # year 0 in UTC
        {"from": "2026-01-01T00:00:00Z", "to": "9999-12-31T23:59:59-01:00"},  # year 10000 in UTC
        {"from": "2026-01-01T00:00:00", "to": "2026-01-02T00:00:00Z"},  # no time zone
    ],
)
async def test_a_usage_range_outside_what_the_database_holds_is_422(
    admin: httpx.AsyncClient, query: dict[str, str]
) -> None:
    await create(admin, "acme")
    response = await admin.get("/v1/tenants/acme/usage", params=query)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_input"
    # Control: the extreme instants themselves are fine.
    edges = {"from": "0001-01-01T00:00:00Z", "to": "9999-12-31T23:59:59Z"}
    whole = await admin.get("/v1/tenants/acme/usage", params=edges)
    assert whole.status_code == 200, whole.text
    assert whole.json()["totals"]["requests"] == 0


def _cursor(created_at: str, ident: str = "00000000-0000-0000-0000-000000000000") -> str:
    import base64
    import json

    return base64.urlsafe_b64encode(json.dumps([created_at, ident]).encode()).decode().rstrip("=")


@pytest.mark.parametrize("path", ["/v1/tenants", "/v1/jobs"])
@pytest.mark.parametrize(
    "cursor",
    [
        _cursor("0001-01-01T00:00:00+01:00"),  # year 0 in UTC
        _cursor("9999-12-31T23:59:59-01:00"),  # year 10000 in UTC
        _cursor("2026-01-01T00:00:00"),  # naive: never written by the API
        _cursor("2026-01-01T00:00:00Z", ident="5"),
        "WzEsIDJd",  # [1, 2]
    ],
)
async def test_a_crafted_list_cursor_is_422_invalid_cursor(admin: httpx.AsyncClient, path: str, cursor: str) -> None:
    await create(admin, "acme")
    response = await admin.get(path, params={"cursor": cursor})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_cursor"
    # Control: a cursor from a time zone other than UTC is still a position.
    fine = await admin.get(path, params={"cursor": _cursor("2026-01-01T01:00:00+01:00")})
    assert fine.status_code == 200, fine.text


@pytest.mark.parametrize(
    "method,path,body,status",
    [
        ("GET", "/v1/tenants/a%00b", None, 404),
        ("GET", "/v1/tenants/a%00b/usage", None, 404),
        ("POST", "/v1/tenants/a%00b/suspend", None, 404),
        ("POST", "/v1/tenants/a%00b/promote", None, 404),
        ("PATCH", "/v1/tenants/a%00b", {"name": "x"}, 404),
        ("DELETE", "/v1/tenants/a%00b", None, 404),
        ("GET", "/v1/tenants?tier=a%00b", None, 422),
        ("GET", "/v1/jobs?kind=a%00b", None, 422),
        ("POST", "/v1/tenants", {"slug": "nul", "name": "a\u0000b", "tier": "free"}, 422),
        ("POST", "/v1/tenants", {"slug": "nul", "name": "Nul", "tier": "fr\u0000ee"}, 422),
        ("PATCH", "/v1/tenants/acme", {"name": "a\u0000b"}, 422),
        ("PATCH", "/v1/tenants/acme", {"tier": "a\u0000b"}, 422),
    ],
)
async def test_a_nul_character_anywhere_in_a_request_is_refused_in_the_error_shape(
    admin: httpx.AsyncClient, method: str, path: str, body: dict[str, str] | None, status: int
) -> None:
    """PostgreSQL text cannot hold NUL: a reference with one names no tenant (404), a value
    with one is invalid (422) -- never a 500 from the driver."""
    await create(admin, "acme")
    response = await admin.request(method, path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == {404: "not_found", 422: "invalid_input"}[status]
    assert (await admin.get("/v1/tenants/acme")).json()["name"] == "Acme"  # control: nothing changed


async def test_a_reference_that_is_neither_id_nor_slug_is_404_and_a_real_one_resolves(
    admin: httpx.AsyncClient,
) -> None:
    tenant = (await create(admin, "acme")).json()
    for ref in ("ACME", "acme%0A", "a", "acme%20", "-acme"):
        response = await admin.get(f"/v1/tenants/{ref}")
        assert response.status_code == 404, ref
        assert response.json()["error"]["code"] == "not_found"
    for ref in ("acme", tenant["id"], tenant["id"].upper(), tenant["id"].replace("-", "")):
        assert (await admin.get(f"/v1/tenants/{ref}")).json()["id"] == tenant["id"], ref
    assert [t["slug"] for t in (await admin.get("/v1/tenants", params={"tier": "free"})).json()["data"]] == ["acme"]
    assert (await admin.get("/v1/jobs", params={"kind": "offboarding"})).json()["data"] == []
