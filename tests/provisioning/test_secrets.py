"""``data_plane.secrets`` against botocore's Stubber (the real client, canned responses, no AWS).

The Stubber checks every request's parameters and fails on any call it was not
told to expect, so "fetched once" and "fetched again" are asserted by the
number of responses queued.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import psycopg
import pytest
from botocore.stub import Stubber

from data_plane.exceptions import ServiceUnavailableError
from data_plane.routing import Route
from data_plane.secrets import (
    AwsSecretsManagerStore,
    AwsSecretsResolver,
    DatabaseSecret,
    SecretMismatchError,
    SecretNotFoundError,
    SecretUnavailableError,
    StaticSecretStore,
    dsn_with_secret,
    region_of,
)

APP_ARN = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tenantctl/silos/silo-acme/app-AbCdEf"
US_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:tenantctl/silos/silo-globex/app-XyZ123"
APP_DSN = "postgresql://tenantctl_app@silo-acme.c0ffee.eu-west-1.rds.amazonaws.com:5432/silo_acme?sslmode=require"


def secret_json(username: str = "tenantctl_app", password: str = "s3cr3t:/@pw") -> str:
    return json.dumps(
        {
            "engine": "postgres",
            "host": "silo-acme.c0ffee.eu-west-1.rds.amazonaws.com",
            "port": 5432,
            "username": username,
            "password": password,
            "dbname": "silo_acme",
        }
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class RecordingClient:
    """The stubbed boto3 client, noting the thread of each call."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.threads: list[int] = []

    def get_secret_value(self, **kwargs: Any) -> Any:
        self.threads.append(threading.get_ident())
        return self._client.get_secret_value(**kwargs)


class Aws:
    """One stubbed Secrets Manager client per region, created on the store's demand."""

    def __init__(self) -> None:
        self.stubbers: dict[str, Stubber] = {}
        self.clients: dict[str, RecordingClient] = {}
        self.created: list[str] = []

    def stubber(self, region: str) -> Stubber:
        if region not in self.stubbers:
            client = boto3.session.Session().client(
                "secretsmanager",
                region_name=region,
                aws_access_key_id="AKIAEXAMPLE",
                aws_secret_access_key="example",
            )
            self.stubbers[region] = Stubber(client)
            self.stubbers[region].activate()
            self.clients[region] = RecordingClient(client)
        return self.stubbers[region]

    def factory(self, region: str) -> RecordingClient:
        self.created.append(region)
        self.stubber(region)
        return self.clients[region]

    def respond(self, arn: str, text: str) -> None:
        region = region_of(arn)
        assert region is not None
        self.stubber(region).add_response(
            "get_secret_value",
            {"ARN": arn, "Name": arn.rsplit(":", 1)[-1], "SecretString": text},
            {"SecretId": arn},
        )

    def fail(self, arn: str, code: str) -> None:
        region = region_of(arn)
        assert region is not None
        self.stubber(region).add_client_error(
            "get_secret_value",
            service_error_code=code,
            service_message=f"{code} for {arn}",
            http_status_code=400,
            expected_params={"SecretId": arn},
        )

    def assert_all_consumed(self) -> None:
        for stubber in self.stubbers.values():
            stubber.assert_no_pending_responses()


@pytest.fixture
def aws() -> Iterator[Aws]:
    stubs = Aws()
    yield stubs
    for stubber in stubs.stubbers.values():
        stubber.deactivate()


def store_for(aws: Aws, clock: Clock | None = None, ttl: float = 300.0) -> AwsSecretsManagerStore:
    return AwsSecretsManagerStore(ttl_seconds=ttl, client_factory=aws.factory, clock=clock or Clock())


def route(*, app_dsn: str | None = APP_DSN, secret_ref: str | None = APP_ARN) -> Route:
    return Route(
        tenant_id=uuid.uuid4(),
        slug="acme",
        tier="enterprise",
        status="active",
        placement="silo",
        epoch=3,
        location_id=uuid.uuid4(),
        location_name="silo-acme",
        app_dsn=app_dsn,
        secret_ref=secret_ref,
    )


async def test_resolver_puts_the_application_secret_into_the_dsn(aws: Aws) -> None:
    aws.respond(APP_ARN, secret_json())
    resolver = AwsSecretsResolver(store_for(aws))
    dsn = await resolver.dsn_for(route())
    parts = psycopg.conninfo.conninfo_to_dict(dsn)
    assert parts["user"] == "tenantctl_app" and parts["password"] == "s3cr3t:/@pw"
    # host, port, database and TLS stay what the catalog says
    assert parts["host"] == "silo-acme.c0ffee.eu-west-1.rds.amazonaws.com" and parts["port"] == "5432"
    assert parts["dbname"] == "silo_acme" and parts["sslmode"] == "require"
    assert aws.created == ["eu-west-1"]  # region taken from the ARN
    aws.assert_all_consumed()


async def test_the_secret_is_fetched_off_the_event_loop(aws: Aws) -> None:
    aws.respond(APP_ARN, secret_json())
    store = store_for(aws)
    secret = await store.get_async(APP_ARN)
    assert secret.username == "tenantctl_app"
    assert aws.clients["eu-west-1"].threads and threading.get_ident() not in aws.clients["eu-west-1"].threads
    # a cache hit needs no thread and no call
    assert await store.get_async(APP_ARN) == secret
    assert len(aws.clients["eu-west-1"].threads) == 1


def test_one_client_per_region(aws: Aws) -> None:
    aws.respond(APP_ARN, secret_json())
    aws.respond(US_ARN, secret_json(password="other"))
    store = store_for(aws)
    assert store.get(APP_ARN).password == "s3cr3t:/@pw"
    assert store.get(US_ARN).password == "other"
    assert aws.created == ["eu-west-1", "us-east-1"]
    aws.assert_all_consumed()


def test_ttl_cache_serves_until_expiry_then_refetches(aws: Aws) -> None:
    aws.respond(APP_ARN, secret_json(password="first"))
    aws.respond(APP_ARN, secret_json(password="rotated"))
    clock = Clock()
    store = store_for(aws, clock, ttl=60.0)
    assert store.get(APP_ARN).password == "first"
    clock.now += 59.0
    assert store.get(APP_ARN).password == "first"
    assert store.fetches == 1
    clock.now += 1.0
    assert store.get(APP_ARN).password == "rotated"
    assert store.fetches == 2
    aws.assert_all_consumed()


def test_invalidate_forces_a_fresh_read(aws: Aws) -> None:
    aws.respond(APP_ARN, secret_json(password="first"))
    aws.respond(APP_ARN, secret_json(password="rotated"))
    store = store_for(aws)
    resolver = AwsSecretsResolver(store)
    assert store.get(APP_ARN).password == "first"
    resolver.invalidate(route())
    assert store.get(APP_ARN).password == "rotated"
    aws.assert_all_consumed()


async def test_a_secret_of_another_user_is_refused(aws: Aws) -> None:
    # e.g. the master secret recorded as an application location's reference
    aws.respond(APP_ARN, secret_json(username="tenantctl_owner"))
    resolver = AwsSecretsResolver(store_for(aws))
    with pytest.raises(SecretMismatchError, match=r"'tenantctl_owner'.*'tenantctl_app'"):
        await resolver.dsn_for(route())
    assert SecretMismatchError.status_code == 500  # logged, never shown to the client


def test_dsn_with_secret_requires_the_dsn_to_name_its_user() -> None:
    secret = DatabaseSecret(username="tenantctl_app", password="pw")
    with pytest.raises(SecretMismatchError, match="names no user"):
        dsn_with_secret("postgresql://silo-acme.example:5432/silo_acme", secret)
    # control: the matching user gets the password, everything else is kept
    dsn = dsn_with_secret("postgresql://tenantctl_app@/silo_acme?host=/run/pg&port=5433", secret)
    assert psycopg.conninfo.conninfo_to_dict(dsn) == {
        "user": "tenantctl_app",
        "password": "pw",
        "dbname": "silo_acme",
        "host": "/run/pg",
        "port": "5433",
    }


async def test_a_missing_secret_is_a_clear_error_and_not_cached(aws: Aws) -> None:
    aws.fail(APP_ARN, "ResourceNotFoundException")
    aws.respond(APP_ARN, secret_json())
    resolver = AwsSecretsResolver(store_for(aws))
    with pytest.raises(SecretNotFoundError) as info:
        await resolver.dsn_for(route())
    error = info.value
    assert isinstance(error, ServiceUnavailableError) and error.status_code == 503
    assert error.code == "secret_not_found"
    assert APP_ARN in error.detail and "ResourceNotFoundException" in error.detail
    assert APP_ARN not in error.message  # what a client may see names nothing
    # the failure was not cached: the next call reads again and succeeds
    assert "password" in psycopg.conninfo.conninfo_to_dict(await resolver.dsn_for(route()))
    aws.assert_all_consumed()


def test_access_denied_is_unavailable_not_missing(aws: Aws) -> None:
    aws.fail(APP_ARN, "AccessDeniedException")
    with pytest.raises(SecretUnavailableError) as info:
        store_for(aws).get(APP_ARN)
    assert not isinstance(info.value, SecretNotFoundError)
    assert "AccessDeniedException" in info.value.detail


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        (json.dumps({"username": "tenantctl_app"}), "lacks a username or password"),
        (json.dumps({"password": "pw"}), "lacks a username or password"),
    ],
)
def test_malformed_secrets_are_refused_without_echoing_them(aws: Aws, text: str, fragment: str) -> None:
    aws.respond(APP_ARN, text)
    with pytest.raises(SecretUnavailableError) as info:
        store_for(aws).get(APP_ARN)
    assert fragment in info.value.detail
    assert "pw" not in info.value.detail


def test_a_bare_name_needs_a_default_region(aws: Aws) -> None:
    with pytest.raises(SecretUnavailableError, match="no default region"):
        store_for(aws).get("tenantctl/silos/silo-acme/app")
    assert aws.created == []


def test_the_password_is_never_in_a_repr() -> None:
    secret = DatabaseSecret.parse(secret_json(password="hunter2-very-secret"), ref=APP_ARN)
    assert "hunter2" not in repr(secret) and secret.password == "hunter2-very-secret"


async def test_routes_without_a_secret_use_the_stored_dsn_and_need_one() -> None:
    resolver = AwsSecretsResolver(StaticSecretStore({}))
    plain = "postgresql://tenantctl_app@/silo_x?host=/tmp"
    assert await resolver.dsn_for(route(app_dsn=plain, secret_ref=None)) == plain
    with pytest.raises(ServiceUnavailableError, match="no application DSN"):
        await resolver.dsn_for(route(app_dsn=None))
    with pytest.raises(SecretNotFoundError):
        await resolver.dsn_for(route())


def test_concurrent_reads_share_one_cache_entry(aws: Aws) -> None:
    aws.respond(APP_ARN, secret_json())
    store = store_for(aws)
    store.get(APP_ARN)

    async def many() -> list[DatabaseSecret]:
        return list(await asyncio.gather(*(store.get_async(APP_ARN) for _ in range(20))))

    assert len(set(asyncio.run(many()))) == 1
    assert store.fetches == 1
