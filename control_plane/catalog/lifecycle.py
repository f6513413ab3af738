"""The tenant lifecycle state machine -- the one place that decides transitions.

::

    provisioning ──activate──▶ active ◀──resume── suspended
         │                      │  ▲ └──suspend──────▲
         │                      │  └─finish_move─ moving ◀─start_move─ (active)
         └──────offboard──────▶ offboarding ◀──offboard── active | suspended
                                 │ └─cancel_offboard─▶ (the status it came from)
                                 └─tombstone─▶ deleted

Every service function and workflow asks :func:`next_status`; an action not
allowed from the current status raises :class:`IllegalTransitionError` (409).
"""

from __future__ import annotations

from enum import StrEnum

from control_plane.exceptions import IllegalTransitionError


class Status(StrEnum):
    PROVISIONING = "provisioning"
    ACTIVE = "active"
    SUSPENDED = "suspended"
    MOVING = "moving"
    OFFBOARDING = "offboarding"
    DELETED = "deleted"


class Action(StrEnum):
    ACTIVATE = "activate"
    SUSPEND = "suspend"
    RESUME = "resume"
    START_MOVE = "start_move"
    FINISH_MOVE = "finish_move"
    OFFBOARD = "offboard"
    CANCEL_OFFBOARD = "cancel_offboard"
    TOMBSTONE = "tombstone"


S = Status
# action -> (statuses it is allowed from, resulting status; None = "the
# status recorded before", used by compensations that undo an action)
TRANSITIONS: dict[Action, tuple[frozenset[Status], Status | None]] = {
    Action.ACTIVATE: (frozenset({S.PROVISIONING}), S.ACTIVE),
    Action.SUSPEND: (frozenset({S.ACTIVE}), S.SUSPENDED),
    Action.RESUME: (frozenset({S.SUSPENDED}), S.ACTIVE),
    Action.START_MOVE: (frozenset({S.ACTIVE}), S.MOVING),
    Action.FINISH_MOVE: (frozenset({S.MOVING}), S.ACTIVE),
    Action.OFFBOARD: (frozenset({S.PROVISIONING, S.ACTIVE, S.SUSPENDED}), S.OFFBOARDING),
    Action.CANCEL_OFFBOARD: (frozenset({S.OFFBOARDING}), None),
    Action.TOMBSTONE: (frozenset({S.OFFBOARDING}), S.DELETED),
}
# Where a compensation may return to.
RESTORABLE = frozenset({S.PROVISIONING, S.ACTIVE, S.SUSPENDED})
# Name, tier and the like may change in these statuses only.
EDITABLE = frozenset({S.PROVISIONING, S.ACTIVE, S.SUSPENDED, S.MOVING})


def next_status(action: Action, current: str, *, previous: str | None = None) -> Status:
    """The status after ``action`` from ``current``, or IllegalTransitionError."""
    allowed, target = TRANSITIONS[action]
    status = Status(current)
    if status not in allowed:
        raise IllegalTransitionError(f"cannot {action.value.replace('_', ' ')} a tenant that is {status.value}")
    if target is None:
        if previous is None or Status(previous) not in RESTORABLE:
            raise IllegalTransitionError(f"cannot {action.value} to {previous!r}")
        return Status(previous)
    return target


def check_editable(current: str) -> None:
    if Status(current) not in EDITABLE:
        raise IllegalTransitionError(f"a tenant that is {current} cannot be changed")
