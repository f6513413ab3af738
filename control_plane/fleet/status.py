"""``tenantctl migrate status``: every target's revision and its drift from head."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from control_plane.fleet.models import Target, TargetKind
from control_plane.fleet.probe import DEFAULT_PROBE_CONCURRENCY, probe_all
from control_plane.fleet.scripts import Drift, ScriptInfo
from data_plane.dsn import redact


@dataclass(frozen=True)
class TargetState:
    target: str
    kind: TargetKind
    tenant: str | None
    dsn: str
    revision: str | None
    drift: Drift
    behind_by: int | None
    duration_s: float
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "kind": self.kind,
            "tenant": self.tenant,
            "dsn": redact(self.dsn),
            "revision": self.revision,
            "drift": self.drift.value,
            "behind_by": self.behind_by,
            "duration_s": round(self.duration_s, 4),
            "error": self.error,
        }


@dataclass(frozen=True)
class StatusReport:
    head: str | None
    script_location: str
    states: list[TargetState]
    duration_s: float

    def counts(self) -> dict[str, int]:
        counts = {drift.value: 0 for drift in Drift}
        for state in self.states:
            counts[state.drift.value] += 1
        return counts

    @property
    def exit_code(self) -> int:
        """0: all at head; 1: some target unreachable; 3: drift (behind, ahead, unversioned, unknown)."""
        if any(s.drift is Drift.UNREACHABLE for s in self.states):
            return 1
        if any(s.drift is not Drift.AT_HEAD for s in self.states):
            return 3
        return 0

    def to_json(self) -> dict[str, Any]:
        return {
            "head": self.head,
            "script_location": self.script_location,
            "duration_s": round(self.duration_s, 4),
            "summary": self.counts(),
            "targets": [s.to_json() for s in self.states],
        }


def status_of(
    targets: Sequence[Target],
    *,
    script_location: str | None = None,
    concurrency: int = DEFAULT_PROBE_CONCURRENCY,
) -> StatusReport:
    """One query per target, run concurrently; classify each revision against the script directory."""
    started = time.monotonic()
    script = ScriptInfo.load(script_location)
    probes = probe_all(targets, concurrency=concurrency)
    states = []
    for target in targets:
        probe = probes[target.name]
        drift = Drift.UNREACHABLE if not probe.reachable else script.classify(probe.revision)
        states.append(
            TargetState(
                target=target.name,
                kind=target.kind,
                tenant=target.tenant,
                dsn=target.dsn,
                revision=probe.revision,
                drift=drift,
                behind_by=script.behind_by(probe.revision) if probe.reachable else None,
                duration_s=probe.duration_s,
                error=probe.error,
            )
        )
    return StatusReport(
        head=script.head,
        script_location=script.location,
        states=states,
        duration_s=time.monotonic() - started,
    )
