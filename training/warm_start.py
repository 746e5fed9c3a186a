"""Where a run's video DiT started: the Wan transfer's report beside the run, and the check before any launch.

The trainer does the transfer (every rank, same weights) and rank 0 writes `wan_transfer.json` / `.md` into the
run's folder; the train flow and the program check the plan first, from the checkpoint's headers only, so weights
that do not fit stop the run with every problem listed before a process is started (exit 7).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

from models.dualforce.wan_transfer import WanTransfer, plan_from_path
from training.train_config import TrainConfig

REPORT_JSON = "wan_transfer.json"
REPORT_MD = "wan_transfer.md"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_transfer_report(transfer: WanTransfer, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_atomic(run_dir / REPORT_MD, transfer.markdown())
    _write_atomic(run_dir / REPORT_JSON, json.dumps(transfer.to_json(), indent=1) + "\n")
    return run_dir / REPORT_JSON


def read_transfer_report(run_dir: Optional[str | Path]) -> Optional[dict[str, Any]]:
    path = Path(run_dir) / REPORT_JSON if run_dir else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def check_wan_init(cfg: TrainConfig) -> Optional[WanTransfer]:
    """The plan of cfg's Wan warm start (None without one); WeightsError listing every problem when it cannot run."""
    if cfg.init_from_wan is None:
        return None
    plan = plan_from_path(cfg.model_config(), cfg.init_from_wan.path, cfg.init_from_wan.layers)
    plan.raise_if_unfit()
    return plan


def provenance_of_start(cfg: TrainConfig, run_dir: Path) -> dict[str, Any]:
    """Where the exported weights' training started: from scratch, from Wan (the transfer's summary), or from a
    pretrain run's weights (and where that run started)."""
    if cfg.init_from_wan is not None:
        report = read_transfer_report(run_dir) or {}
        return {"from": "wan", "path": cfg.init_from_wan.path, "layers": report.get("layers", cfg.init_from_wan.layers),
                "summary": report.get("summary")}
    if cfg.init_from:
        weights = Path(cfg.init_from)  # RUN/checkpoints/<tag>/weights.safetensors
        parent_run = weights.parents[2] if len(weights.parents) > 2 else None
        report = read_transfer_report(parent_run)
        parent = {"from": "wan", "path": report["source"], "layers": report["layers"],
                  "summary": report["summary"]} if report else {"from": "scratch"}
        return {"from": "pretrain", "weights": str(weights), "pretrain_started": parent}
    return {"from": "scratch"}
