"""Shared benchmark plumbing: an embedded stack, server processes, a load generator.

The load generator is a minimal HTTP/1.1 keep-alive client on raw asyncio
streams, run in its own process: httpx would spend more CPU per request than the
servers under test and turn every comparison into a client benchmark.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from control_plane import keys
from control_plane import stack as stack_mod
from control_plane.bootstrap import Roles
from control_plane.dev import EmbeddedStack
from control_plane.stack import Endpoints
from data_plane.settings import DataPlaneSettings


@contextlib.contextmanager
def embedded_stack(*, fast: bool = True) -> Iterator[tuple[EmbeddedStack, Endpoints]]:
    with tempfile.TemporaryDirectory(prefix="tcbench-") as tmp:
        stack = EmbeddedStack(Path(tmp), fast=fast)
        stack.start()
        try:
            endpoints = stack_mod.bootstrap_embedded(stack, Roles())
            stack_mod.migrate_all(endpoints, app_role="tenantctl_app")
            yield stack, endpoints
        finally:
            stack.stop()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def server_process(args: list[str], *, port: int, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, *args], env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                raise RuntimeError(f"server {args} did not start:\n{err}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if proc.stderr:
            proc.stderr.close()


@dataclass
class LoadResult:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        data = sorted(self.latencies_ms)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))]

    def summary(self) -> dict[str, float]:
        return {
            "rps": round(self.rps, 1),
            "p50_ms": round(self.percentile(0.50), 3),
            "p99_ms": round(self.percentile(0.99), 3),
            "errors": self.errors,
        }


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    request: bytes,
    since: float,
    latencies: list[float],
    errors: list[int],
) -> None:
    """One request on a keep-alive connection, its whole response read: its latency from ``since``."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    await reader.readexactly(length)
    latencies.append((time.perf_counter() - since) * 1000)
    if (status := int(head[9:12])) != 200:
        errors.append(status)


async def _worker(port: int, request: bytes, until: float, latencies: list[float], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            await _exchange(reader, writer, request, time.perf_counter(), latencies, errors)
    finally:
        writer.close()


def _get(path: str, headers: dict[str, str]) -> bytes:
    head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode()


async def _load(port: int, path: str, headers: dict[str, str], seconds: float, concurrency: int) -> LoadResult:
    request = _get(path, headers)
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    until = start + seconds
    await asyncio.gather(*(_worker(port, request, until, latencies, errors) for _ in range(concurrency)))
    return LoadResult(len(latencies), len(errors), time.perf_counter() - start, latencies)


def load(port: int, path: str, headers: dict[str, str], *, seconds: float, concurrency: int) -> LoadResult:
    return asyncio.run(_load(port, path, headers, seconds, concurrency))


async def _paced_worker(
    port: int, request: bytes, due: asyncio.Queue[float | None], latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (scheduled := await due.get()) is not None:
            # From when the request was due, not when a connection was free:
            # a server that falls behind is charged the wait (no coordinated omission).
            await _exchange(reader, writer, request, scheduled, latencies, errors)
    finally:
        writer.close()


async def _load_at_rate(
    port: int, path: str, headers: dict[str, str], rate: float, seconds: float, connections: int
) -> LoadResult:
    request = _get(path, headers)
    latencies: list[float] = []
    errors: list[int] = []
    due: asyncio.Queue[float | None] = asyncio.Queue()
    workers = [asyncio.create_task(_paced_worker(port, request, due, latencies, errors)) for _ in range(connections)]
    start = time.perf_counter()
    for i in range(int(rate * seconds)):
        scheduled = start + i / rate
        if (wait := scheduled - time.perf_counter()) > 0:
            await asyncio.sleep(wait)
        due.put_nowait(scheduled)
    for _ in workers:
        due.put_nowait(None)
    await asyncio.gather(*workers)
    return LoadResult(len(latencies), len(errors), time.perf_counter() - start, latencies)


def load_at_rate(
    port: int, path: str, headers: dict[str, str], *, rate: float, seconds: float, connections: int
) -> LoadResult:
    """An open-loop load: ``rate`` requests a second, each sent when due on the first free connection."""
    return asyncio.run(_load_at_rate(port, path, headers, rate, seconds, connections))


def median(values: list[float]) -> float:
    return float(statistics.median(values))


def tenant_api(stack: EmbeddedStack, endpoints: Endpoints, tenant_id: uuid.UUID) -> tuple[str, dict[str, str]]:
    """A token for ``tenant_id`` and the environment of a tenant API server on this stack."""
    settings = DataPlaneSettings(state_dir=stack.state_dir, environment="test")
    keys.ensure_dev_key(settings)
    token = keys.tenant_token(settings, tenant_id=tenant_id, ttl=3600)
    env = {
        "TENANTCTL_STATE_DIR": str(stack.state_dir),
        "TENANTCTL_ENVIRONMENT": "test",
        "TENANTCTL_APP_CATALOG_URL": endpoints.app_catalog_url,
        "TENANTCTL_APP_POOL_URL": endpoints.app_pool_url,
        # The limiter stays in the request path (its cost is measured) but
        # must not refuse the benchmark's own load; no project quota either.
        "TENANTCTL_RATE_LIMITS": '{"standard": "1000000/second"}',
        "TENANTCTL_PROJECT_QUOTAS": "{}",
    }
    return token, env
