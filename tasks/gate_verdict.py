"""Go/no-go gate verdicts (DESIGN.md gate table) as plain data; flows turn them into artifacts and states."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class GateVerdict:
    gate: str  # e.g. "3d_latent_quality", "memory", "convergence", "stability", "joint_progress"
    go: bool
    summary: str  # one line a person reads first
    numbers: dict[str, Any] = field(default_factory=dict)  # the measured values and thresholds
    recommendation: str = ""  # what to do on a no-go (from the gate table)
    rows: list[dict[str, Any]] = field(default_factory=list)  # optional per-item table (per clip, per step)
    evaluated: bool = True  # False: the gate's step was never reached; it decided nothing (go is then True)

    @property
    def head(self) -> str:
        """What a person reads first: GO, NO-GO or NOT EVALUATED (a gate that never ran never says GO)."""
        if not self.evaluated:
            return "NOT EVALUATED"
        return "GO" if self.go else "NO-GO"

    @property
    def state_name(self) -> str:
        return self.head if self.go else f"NO-GO: {self.gate}"
