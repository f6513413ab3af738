"""Bounded retries of transient provisioning failures (tenacity + structlog).

Only errors that a later attempt can cure are retried: a refused connection,
a server restarting, a concurrent creation of the same silo, a Pulumi stack
locked by another update. Everything else surfaces at once, because retrying
a permission error or a bad configuration only delays the operator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog
import tenacity

log = structlog.get_logger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How long to keep trying. Defaults suit a control-plane job (~1 min worst case)."""

    attempts: int = 5
    initial_wait_s: float = 1.0
    max_wait_s: float = 20.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be >= 1")


def call_with_retry(
    fn: Callable[[], T],
    *,
    operation: str,
    policy: RetryPolicy,
    is_transient: Callable[[BaseException], bool],
    **log_context: object,
) -> T:
    """Run ``fn``; retry it while it raises transient errors, up to ``policy.attempts``.

    The last transient error is re-raised as is (``reraise=True``) so callers
    can translate it into a :class:`~control_plane.exceptions.ProvisioningError`.
    """

    def before_sleep(state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "provisioning.retry",
            operation=operation,
            attempt=state.attempt_number,
            max_attempts=policy.attempts,
            wait_s=round(state.next_action.sleep, 2) if state.next_action else None,
            error=type(error).__name__ if error else None,
            **log_context,
        )

    retrying = tenacity.Retrying(
        stop=tenacity.stop_after_attempt(policy.attempts),
        wait=tenacity.wait_exponential(multiplier=policy.initial_wait_s, max=policy.max_wait_s),
        retry=tenacity.retry_if_exception(is_transient),
        before_sleep=before_sleep,
        reraise=True,
    )
    return retrying(fn)
