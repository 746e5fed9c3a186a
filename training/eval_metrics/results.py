"""What every evaluation metric returns: a number, or the reason there is none."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Literal, Optional


@dataclass
class MetricResult:
    """One metric of one clip (or of a set of clips, for FID / FVD).

    `value` is None exactly when `status` is "skipped" (missing weights, no face, too few frames): a skipped
    metric never carries a made-up number. `series`: the per-frame / per-window / per-second values behind
    `value` where the metric has them (NaN where a frame had no face). `details`: secondary numbers (per-axis
    errors, the chosen audio offset, frame counts). `reason` on an "ok" result is a caveat, such as an
    untrained dry-run network.
    """

    name: str
    value: Optional[float]
    status: Literal["ok", "skipped"] = "ok"
    reason: str = ""
    series: Optional[list[float]] = None
    seconds: float = 0.0
    details: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if (self.status == "skipped") != (self.value is None):
            raise ValueError(f"{self.name}: a skipped metric has no value and an ok one has one ({self.status}, {self.value})")
        if self.status == "skipped" and not self.reason:
            raise ValueError(f"{self.name}: a skipped metric needs a reason")

    @classmethod
    def skipped(cls, name: str, reason: str, seconds: float = 0.0) -> "MetricResult":
        return cls(name, None, "skipped", reason, seconds=seconds)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict:
        """A JSON-safe dict (NaN series entries become None)."""
        out = asdict(self)
        if self.series is not None:
            out["series"] = [None if math.isnan(v) else v for v in self.series]
        return out


class Stopwatch:
    """Seconds since the block began (frozen when it ends): read inside for an early return, or after."""

    def __init__(self):
        self._start = time.perf_counter()
        self._end: Optional[float] = None

    @property
    def seconds(self) -> float:
        return (self._end or time.perf_counter()) - self._start


@contextmanager
def stopwatch() -> Iterator[Stopwatch]:
    """Wall time of a block, for MetricResult.seconds."""
    watch = Stopwatch()
    try:
        yield watch
    finally:
        watch._end = time.perf_counter()
