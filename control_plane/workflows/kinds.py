"""Job kinds: pure data, importable without DBOS (the API only enqueues)."""

from __future__ import annotations

from dataclasses import dataclass

JOB_QUEUE = "tenantctl_jobs"


@dataclass(frozen=True)
class JobKind:
    """One kind of long operation.

    ``point_of_no_return`` names the first step that cannot be undone: a
    cancel request arriving while that step (or a later one) runs is refused
    with 409; before it, the workflow compensates and ends ``cancelled``.
    """

    name: str
    workflow_name: str
    steps: tuple[str, ...]
    point_of_no_return: str | None = None
    # Steps that record their own entry (and check for a due cancel) in their
    # first transaction instead of a separate ``enter`` step: those that run
    # inside a write pause, where each step's checkpoint is felt.
    enters_itself: frozenset[str] = frozenset()

    def cancellable_at(self, step: str | None) -> bool:
        if step is None or self.point_of_no_return is None:
            return True
        return self.steps.index(step) < self.steps.index(self.point_of_no_return)

    def may_stop_before(self, step: str) -> bool:
        """Whether a requested cancel is still honoured when ``step`` is about to start."""
        if self.point_of_no_return is None:
            return True
        return self.steps.index(step) <= self.steps.index(self.point_of_no_return)

    def fraction_before(self, step: str) -> float:
        """Progress when ``step`` starts (steps weigh the same)."""
        return self.steps.index(step) / len(self.steps)


ONBOARDING = JobKind(
    name="onboarding",
    workflow_name="tenantctl.onboarding",
    steps=("provision", "record_location", "migrate", "claim", "activate"),
    point_of_no_return="activate",
)

OFFBOARDING = JobKind(
    name="offboarding",
    workflow_name="tenantctl.offboarding",
    steps=("fence", "export", "delete", "tombstone"),
    point_of_no_return="delete",
)

_MOVE_STEPS = (
    "prepare",
    "replicate",
    "catch_up",
    "cutover",
    "flip",
    "retire",
    "stop_replication",
    "cleanup",
)

PROMOTION = JobKind(
    name="promotion",
    workflow_name="tenantctl.promotion",
    steps=("provision", "migrate", "plan", *_MOVE_STEPS),
    point_of_no_return="flip",
    enters_itself=frozenset({"flip"}),
)

DEMOTION = JobKind(
    name="demotion",
    workflow_name="tenantctl.demotion",
    # migrate: the silo (the source) is brought to the pool's revision first.
    steps=("migrate", "plan", *_MOVE_STEPS),
    point_of_no_return="flip",
    enters_itself=frozenset({"flip"}),
)

KINDS: dict[str, JobKind] = {kind.name: kind for kind in (ONBOARDING, OFFBOARDING, PROMOTION, DEMOTION)}


def kind_of(name: str) -> JobKind:
    return KINDS[name]
