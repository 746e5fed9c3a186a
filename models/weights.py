"""Locating and checking model weights before any work starts (nothing is ever downloaded)."""
from __future__ import annotations

import torch.nn as nn


class WeightsError(RuntimeError):
    """Model weights are missing or do not fit the architecture; the message says which file and why."""


def check_state_dict(model: nn.Module, state: dict, source: str) -> None:
    """Raise WeightsError listing missing keys, unexpected keys and shape mismatches (all of them at once)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(getattr(state[k], "shape", ())) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
        raise WeightsError(f"{source} does not fit {type(model).__name__}: " + " | ".join(parts))
