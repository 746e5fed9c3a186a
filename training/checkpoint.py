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
WEIGHTS_FILE = "weights.safetensors"


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


def weights_path(ckpt_dir: Path, tag: str) -> Path:
    return ckpt_dir / tag / WEIGHTS_FILE


def save_module_weights(engine, zero_stage: int, ckpt_dir: Path, tag: str, rank: int) -> Optional[Path]:
    """The module's weights as one fp32 safetensors file (rank 0; temp + rename): what a later stage starts from
    (the program's pretrain -> joint) without reading ZeRO optimizer shards. ZeRO-3 gathers the partitions
    (every rank takes part); below stage 3 every rank holds the whole module."""
    import deepspeed
    from safetensors.torch import save_file

    module = engine.module
    if zero_stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            state = {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()} if rank == 0 else None
    else:
        state = {k: v.detach().float().cpu().contiguous() for k, v in module.state_dict().items()} if rank == 0 else None
    if state is None:
        return None
    path = weights_path(ckpt_dir, tag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors weights file (no pickle: safetensors holds tensors and a JSON header only)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} not found")
    return load_file(str(path))


def latest_tag(ckpt_dir: Path) -> Optional[str]:
    latest = ckpt_dir / LATEST
    return latest.read_text().strip() if latest.exists() else None


def latest_step(ckpt_dir: Path) -> int:
    """The step of the newest complete checkpoint (0: none)."""
    tag = latest_tag(ckpt_dir)
    return int(tag.removeprefix("step")) if tag else 0


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
