"""Run Pulumi programs against Pulumi's own mocks (no CLI, no cloud).

Pulumi's runtime state (settings, root stack, the event loop it pumps) is
process-global. :func:`run_program` installs the mocks on a private event
loop and always restores the defaults and closes that loop, so nothing leaks
into other tests (pytest runs with ``-W error``, where an unclosed loop would
fail a later test).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pulumi
from pulumi.runtime import settings as pulumi_settings

ACCOUNT = "123456789012"
REGION = "eu-west-1"


# Resources whose physical name the provider would generate when none is given.
NAMED_BY_PULUMI = (
    "aws:rds/parameterGroup:ParameterGroup",
    "aws:rds/clusterParameterGroup:ClusterParameterGroup",
    "aws:rds/subnetGroup:SubnetGroup",
)


@dataclass
class Registered:
    typ: str
    name: str
    inputs: dict[str, Any]
    state: dict[str, Any]


@dataclass
class RecordingMocks(pulumi.runtime.Mocks):
    """Returns plausible computed attributes and records every resource."""

    shared_outputs: dict[str, Any] = field(default_factory=dict)
    resources: list[Registered] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)

    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str, dict[str, Any]]:
        name, typ = args.name, args.typ
        state = dict(args.inputs)
        resource_id = f"{name}-id"
        if typ == "pulumi:pulumi:StackReference":
            state = {"name": args.inputs.get("name", name), "outputs": self.shared_outputs}
            resource_id = str(args.inputs.get("name", name))
        elif typ == "aws:kms/key:Key":
            resource_id = f"key-{name}"
            state |= {"arn": f"arn:aws:kms:{REGION}:{ACCOUNT}:key/{resource_id}", "keyId": resource_id}
        elif typ == "aws:secretsmanager/secret:Secret":
            state |= {"arn": f"arn:aws:secretsmanager:{REGION}:{ACCOUNT}:secret:{name}-AbCdEf"}
        elif typ == "aws:rds/instance:Instance":
            state |= {
                "address": f"{args.inputs['identifier']}.c0ffee.{REGION}.rds.amazonaws.com",
                "port": 5432,
            }
        elif typ == "aws:rds/cluster:Cluster":
            state |= {
                "endpoint": f"{args.inputs['clusterIdentifier']}.cluster-c0ffee.{REGION}.rds.amazonaws.com",
                "port": 5432,
            }
        elif typ == "aws:ec2/securityGroup:SecurityGroup":
            resource_id = f"sg-{name}"
        elif typ == "random:index/randomPassword:RandomPassword":
            # Distinct per resource, so a test can tell whose password went where.
            state |= {"result": f"mock-{name}"}
        elif typ == "random:index/randomId:RandomId":
            state |= {"hex": "0badf00d"}
        elif typ in NAMED_BY_PULUMI:
            state.setdefault("name", name)
        self.resources.append(Registered(typ=typ, name=name, inputs=dict(args.inputs), state=state))
        return resource_id, state

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        self.calls.append(args.token)
        if args.token == "aws:index/getAvailabilityZones:getAvailabilityZones":
            return {"names": [f"{REGION}a", f"{REGION}b", f"{REGION}c"], "zoneIds": ["z1", "z2", "z3"]}, []
        return {}, []

    # -- queries --------------------------------------------------------------

    def of_type(self, typ: str) -> list[Registered]:
        return [r for r in self.resources if r.typ == typ]

    def one(self, typ: str) -> Registered:
        found = self.of_type(typ)
        assert len(found) == 1, f"expected one {typ}, got {[r.name for r in found]}"
        return found[0]


def run_program(
    program: Callable[[], Any], mocks: RecordingMocks, *, stack: str = "test"
) -> tuple[Any, dict[str, Any]]:
    """Run ``program`` on the mocks; return its resolved result and the stack exports.

    ``program`` may return Outputs (e.g. a component's attributes); they are
    resolved before returning, as are the values given to ``pulumi.export``.
    """
    loop = asyncio.new_event_loop()
    # Pulumi's mock monitor runs in executor threads and gives each of them an
    # event loop of its own; an executor we own lets us close those loops.
    executor = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="pulumi-mock")
    loop.set_default_executor(executor)
    asyncio.set_event_loop(loop)
    captured: dict[str, Any] = {}
    try:
        pulumi.runtime.set_mocks(mocks, project="tenantctl-test", stack=stack, preview=False)

        @pulumi.runtime.test  # type: ignore[misc]
        def body() -> pulumi.Output[Any]:
            result = program()
            root = pulumi_settings.get_root_resource()
            exports: dict[str, Any] = dict(getattr(root, "outputs", {}) or {})

            def keep(values: list[Any]) -> None:
                captured["result"], captured["exports"] = values[0], values[1]

            return pulumi.Output.all(pulumi.Output.from_input(result), pulumi.Output.from_input(exports)).apply(keep)

        body()
        return captured["result"], captured["exports"]
    finally:
        pulumi_settings.reset_options()
        _close_worker_loops(executor)
        executor.shutdown(wait=True)
        loop.close()
        asyncio.set_event_loop(None)


WORKERS = 4


def _close_worker_loops(executor: ThreadPoolExecutor) -> None:
    """Close the event loop each worker thread was given, on that thread.

    One task per worker, all meeting at a barrier, so every worker thread runs
    exactly one of them (a worker busy at the barrier cannot take a second).
    """
    workers = len(executor._threads)
    if workers == 0:
        return
    barrier = threading.Barrier(workers, timeout=10)

    def close_own_loop() -> None:
        barrier.wait()
        policy = asyncio.get_event_loop_policy()
        try:
            own = policy.get_event_loop()
        except RuntimeError:  # this worker never got a loop
            return
        own.close()
        policy.set_event_loop(None)

    for future in [executor.submit(close_own_loop) for _ in range(workers)]:
        future.result()
