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


def plot_conditioning_use(report, path: Path, title: str = "conditioning use") -> Path:
    """Each use ratio (altered / true loss; median with its q25-q75 spread) as a bar against the line at 1 (input
    ignored), and, when measured, the drift ratio per latent frame. `report`: a training.conditioning_use
    ConditioningUse."""
    panels = 2 if report.drift else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), dpi=80, squeeze=False)
    ax = axes[0][0]
    figures = report.figures
    if figures:
        med = [f.ratio_median for f in figures]
        err = [[f.ratio_median - f.ratio_q25 for f in figures], [f.ratio_q75 - f.ratio_median for f in figures]]
        colors = {"audio": "tab:blue", "reference": "tab:orange", "bridge": "tab:green"}
        ax.barh(range(len(figures)), med, xerr=err, color=[colors[f.probe] for f in figures], alpha=0.8)
        ax.set_yticks(range(len(figures)), [f"{f.probe}: {f.altered} ({f.stream})" for f in figures], fontsize=8)
        ax.axvline(1.0, color="black", linestyle="--", label="1.00 = input ignored")
        lo = min(min(f.ratio_q25 for f in figures), 1.0)
        ax.set_xlim(lo - 0.02 * abs(lo), max(max(f.ratio_q75 for f in figures), 1.0) * 1.02 + 1e-3)
    ax.set_xlabel("loss ratio, altered / true input (median, q25-q75)")
    ax.set_title(f"{title} ({report.windows} {report.split} windows)")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    if report.drift:
        ax2 = axes[0][1]
        ax2.plot(report.drift["ratio"], "-o", markersize=3, label="rollout / teacher-forced MSE")
        ax2.axhline(1.0, color="black", linestyle="--")
        ax2.set_xlabel("latent frame")
        ax2.set_title(f"drift ({report.drift['windows']} windows)")
        ax2.legend(fontsize=8)
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, format="png")
    plt.close(fig)
    os.replace(tmp, path)
    return path
