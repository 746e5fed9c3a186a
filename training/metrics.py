"""Per-step training metrics: metrics.jsonl (what the flow's gates read) and TensorBoard scalars."""
from __future__ import annotations

import json
import math
import os
import resource
from pathlib import Path
from typing import Any

import torch

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def peak_memory_mb() -> float:
    """GPU: peak allocated by torch; CPU: peak resident set size of this process."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Step records in step order; a torn last line (a run killed mid-write) is ignored."""
    records = []
    path = Path(path)
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint so the file reads as one uninterrupted run."""
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


class MetricsWriter:
    def __init__(self, out_dir: Path, resume_step: int = 0):
        self.path = out_dir / METRICS_FILE
        if resume_step > 0:
            truncate_after(self.path, resume_step)
        elif self.path.exists():
            self.path.unlink()
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(str(out_dir / TENSORBOARD_DIR), purge_step=resume_step + 1 if resume_step else None)
        self.file = self.path.open("a")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        self.file.close()
        self.tb.close()
