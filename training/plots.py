"""Loss and memory curves from metrics.jsonl records as PNGs (gate artifacts, reports). Written temp + rename."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _points(records: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in records if r.get(key) is not None and math.isfinite(float(r[key]))]


def plot_losses(records: Sequence[dict[str, Any]], path: Path, title: str = "training loss") -> Path:
    """Total, video and struct loss against step; non-finite points are left out."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for key, style in (("loss", "-"), ("video_loss", "--"), ("struct_loss", ":")):
        points = _points(records, key)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, style, label=key)
    return _save(fig, ax, path, title, "loss")


def plot_memory(
    records: Sequence[dict[str, Any]], path: Path, budget_mb: Optional[float] = None, title: str = "peak memory"
) -> Path:
    """Peak memory per device (metrics' memory_mb: GPU max allocated, CPU peak RSS) against step, with the budget."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    points = _points(records, "memory_mb")
    if points:
        steps, values = zip(*points)
        ax.plot(steps, values, "-o", markersize=3, label="peak memory_mb")
    if budget_mb is not None:
        ax.axhline(budget_mb, color="tab:red", linestyle="--", label=f"budget {budget_mb:.0f} MB")
    return _save(fig, ax, path, title, "MB per device")


def _save(fig, ax, path: Path, title: str, ylabel: str) -> Path:
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if ax.lines:
        ax.legend()
    ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
