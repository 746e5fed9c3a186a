"""How long to wait between attempts: exponential backoff with jitter, honouring a server's Retry-After."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` is the total number of tries (first try included); waits grow as backoff_s * 2**k."""

    attempts: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 60.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"attempts must be >= 1, got {self.attempts}")
        if self.backoff_s < 0 or self.max_backoff_s < 0:
            raise ValueError("backoff_s and max_backoff_s must be >= 0")

    def delay_s(self, failures: int, retry_after_s: Optional[float] = None) -> float:
        """Wait before the next try after `failures` failed tries (>= 1).

        Jitter (50-100 % of the step) keeps many workers that failed together from retrying together.
        """
        step = self.backoff_s * (2 ** (failures - 1)) * (0.5 + random.random() / 2)
        if retry_after_s is not None:
            step = max(step, retry_after_s)
        return min(step, self.max_backoff_s)
