"""Loss curves from metrics.jsonl records as a PNG (for gate artifacts and reports)."""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_losses(records: Sequence[dict[str, Any]], path: Path, title: str = "training loss") -> Path:
    """Total, video and struct loss against step; non-finite points are left out. Written temp + rename."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=80)
    for key, style in (("loss", "-"), ("video_loss", "--"), ("struct_loss", ":")):
        points = [
            (r["step"], float(r[key])) for r in records if r.get(key) is not None and math.isfinite(float(r[key]))
        ]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, style, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
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
