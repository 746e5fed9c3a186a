"""Retrying a fetch: tenacity's exponential backoff with full jitter, at least as long as a server's Retry-After.

tenacity does the loop (attempt counting, the wait, re-raising the last error); the policy only says how many
tries, how long the waits grow and which errors are worth another try.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` is the total number of tries (first try included); waits are drawn from [0, backoff_s * 2**k],
    capped at max_backoff_s (full jitter: many workers that failed together do not retry together)."""

    attempts: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")

    def wait_s(self, state: RetryCallState) -> float:
        """The wait after a failed try; an error carrying `retry_after_s` (a server's Retry-After) waits at least
        that long, within max_backoff_s."""
        step = wait_random_exponential(multiplier=self.backoff_s, max=self.max_backoff_s)(state)
        retry_after = getattr(state.outcome.exception(), "retry_after_s", None) if state.outcome else None
        return min(max(step, retry_after or 0.0), self.max_backoff_s)

    def retrying(self, worth_retrying: Callable[[BaseException], bool]) -> Retrying:
        """Iterate it (`for attempt in policy.retrying(...): with attempt: ...`); after the last try the last error
        is raised as it was."""
        return Retrying(stop=stop_after_attempt(self.attempts), wait=self.wait_s,
                        retry=retry_if_exception(worth_retrying), reraise=True)
