"""Plots of an evaluation: one PNG per metric over time.

Per-frame metrics (identity, landmark distances, pose and expression error) are drawn against the frame, one line
per clip; the latent-space rows' and the long generation's per-second series (latent MSE, struct errors, identity,
pose and latent drift) against the second.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from training.eval_metrics.latent import PER_SECOND


def _finite(series: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in series], np.float64)


def plot_metric_series(data: dict[str, Any], out_dir: Path) -> list[Path]:
    """metric-<name>.png for every metric with a series; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_metric: dict[str, list[tuple[str, np.ndarray]]] = {}
    for clip in data["clips"]:
        for r in clip["results"]:
            if r.get("series"):
                per_metric.setdefault(r["name"], []).append((clip["key"], _finite(r["series"])))
    long = {r["name"]: _finite(r["series"]) for r in data["long_sequence"] if r.get("series")}
    written = []
    for name, lines in [*per_metric.items(), *((n, [("long generation", s)]) for n, s in long.items())]:
        fig, ax = plt.subplots(figsize=(6.4, 3.2))
        for label, series in lines[:12]:
            ax.plot(np.arange(len(series)), series, label=label, linewidth=1)
        ax.set_xlabel("second" if name in long or name in PER_SECOND else "frame")
        ax.set_title(name, fontsize=10)
        if len(lines) <= 12:
            ax.legend(fontsize=6)
        fig.tight_layout()
        path = out_dir / f"metric-{name}.png"
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        written.append(tmp.replace(path))
    return written
