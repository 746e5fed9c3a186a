"""Trainer-side checkpoint state beside DeepSpeed's: RNGs, data position and EMA, one file per rank.

DeepSpeed saves module, optimizer and LR scheduler under <ckpt_dir>/<tag>/ and writes `latest` last; our
per-rank file is written (temp + rename) into the same tag directory before that, so `latest` never points
at a tag without it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

from training.safe_checkpoint import load_weights_only

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def state_path(ckpt_dir: Path, tag: str, rank: int) -> Path:
    return ckpt_dir / tag / f"trainer_state_rank{rank}.pt"


def save_trainer_state(ckpt_dir: Path, tag: str, rank: int, state: dict[str, Any]) -> None:
    path = state_path(ckpt_dir, tag, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    latest = ckpt_dir / LATEST
    return latest.read_text().strip() if latest.exists() else None


def load_trainer_state(ckpt_dir: Path, tag: str, rank: int) -> dict[str, Any]:
    path = state_path(ckpt_dir, tag, rank)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {tag} has no trainer state for rank {rank} ({path}); was it written by a run with "
            f"a different number of processes?"
        )
    return load_weights_only(path)


def prune(ckpt_dir: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` step tags (never the one `latest` names)."""
    current = latest_tag(ckpt_dir)
    tags = sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())
    doomed = [t for t in tags[: max(0, len(tags) - keep)] if t != current]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    return doomed
