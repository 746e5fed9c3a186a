"""How a trainer process ended, written per rank so the flow can tell OOM, NaN and crashes apart.

torchrun reports any failed worker as exit code 1, so the reason travels in status-rank{r}.json instead.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

COMPLETED = "completed"  # reached total_steps
STOPPED = "stopped"  # left at stop_at_step after a checkpoint (simulated interruption)
OOM = "oom"
NONFINITE = "nonfinite"
ERROR = "error"

EXIT_CODES = {COMPLETED: 0, STOPPED: 0, OOM: 3, NONFINITE: 4, ERROR: 1}


@dataclass(frozen=True)
class RunStatus:
    rank: int
    status: str
    step: int  # optimizer steps completed when the process ended
    error: Optional[str] = None


def status_path(out_dir: str | Path, rank: int) -> Path:
    return Path(out_dir) / f"status-rank{rank}.json"


def write_status(out_dir: str | Path, status: RunStatus) -> None:
    path = status_path(out_dir, status.rank)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(status)))
    os.replace(tmp, path)


def read_statuses(out_dir: str | Path) -> list[RunStatus]:
    return [RunStatus(**json.loads(p.read_text())) for p in sorted(Path(out_dir).glob("status-rank*.json"))]


def clear_statuses(out_dir: str | Path) -> None:
    for path in Path(out_dir).glob("status-rank*.json"):
        path.unlink(missing_ok=True)  # another node sharing the run dir may have removed it first
