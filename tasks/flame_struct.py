"""The FLAME struct source: per-clip FLAME tracker files -> struct rows + keep mask, aligned to the crop's frames.

Used when the 3D-latent quality gate says LivePortrait's motion is not good enough (tasks/pose_check.py): the struct
step re-runs with source "flame" over the files given by `--flame-dir` (<flame_dir>/<clip_id>.npz, the format
tasks/pose_check.py documents). A tracker runs on the crop, so its file has one row per crop frame; a file with
another row count belongs to another cut of the clip and is refused, never stretched. Frames the tracker could not
fit (non-finite values) get keep = False: no loss falls on them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from models.flame_struct import FlameStruct, flame_struct
from tasks.errors import ClipRejected
from tasks.pose_check import load_flame_npz

FLAME_SOURCE = "flame"
LIVEPORTRAIT_SOURCE = "liveportrait"
DEFAULT_FLAME_EXPRESSION = 50  # DECA / EMOCA / SMIRK fit 50 expression coefficients; others are padded or cut


def flame_file(flame_dir: str | Path, clip_id: str) -> Path:
    return Path(flame_dir) / f"{clip_id}.npz"


def flame_struct_for_clip(path: Path, frames: int, n_exp: Optional[int] = DEFAULT_FLAME_EXPRESSION) -> FlameStruct:
    """Read and convert one clip's FLAME file; ClipRejected when it is missing, unreadable or not this crop's."""
    if not path.is_file():
        raise ClipRejected("no_flame", f"no FLAME file {path}")
    try:
        params = load_flame_npz(path)
        converted = flame_struct({k: v for k, v in params.items() if k != "frame"}, frame=params["frame"], n_exp=n_exp)
    except (ValueError, OSError) as exc:
        raise ClipRejected("bad_flame", f"{path}: {exc}") from None
    if len(converted.struct) != frames:
        raise ClipRejected("flame_mismatch", f"{path} has {len(converted.struct)} frames, the crop {frames}")
    if not converted.valid.any():
        raise ClipRejected("bad_flame", f"{path}: no frame has finite FLAME parameters")
    return converted


def keep_ratio(result: FlameStruct) -> float:
    return float(np.mean(result.valid)) if len(result.valid) else 0.0
