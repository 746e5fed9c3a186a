"""The FLAME struct source: per-clip FLAME tracker files -> struct rows + keep mask, aligned to the crop's frames.

Used when the 3D-latent quality gate says LivePortrait's motion is not good enough (tasks/steps/pose_check.py): the struct
step re-runs with source "flame" over the files given by `--flame-dir` (<flame_dir>/<clip_id>.npz, the format
tasks/steps/pose_check.py documents). A tracker runs on the crop, so its file has one row per crop frame; a file with
another row count belongs to another cut of the clip and is refused, never stretched. Frames the tracker could not
fit (non-finite values) get keep = False: no loss falls on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np

from datasets_manifest.schema import ClipRow
from models.flame_layout import FlameStruct, flame_struct
from tasks.errors import ClipRejected
from tasks.step_store import fingerprint, save_npy
from tasks.steps.crop import CropStep, crop_frames
from tasks.steps.motion import STRUCT_FILE
from tasks.steps.pose_check import KEEP_MASK_FILE, load_flame_npz

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


@dataclass
class FlameStructStep:
    """Step 3 with the FLAME source (the 3D-latent gate's fallback): struct rows and keep mask from a FLAME
    tracker's file per clip, instead of LivePortrait's motion and the pose check."""

    flame_dir: str
    n_exp: int = DEFAULT_FLAME_EXPRESSION
    name: ClassVar[str] = "flame_struct"
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = (CropStep.name,)

    def fingerprint(self) -> str:
        return fingerprint(self.n_exp)

    def row_fields(self, row: ClipRow) -> dict:
        # the tracker file is this step's input besides the crop: a re-fitted file is a different result
        from tasks.fetchers.cache import sha256_file

        path = flame_file(self.flame_dir, row.clip_id)
        return {"flame_file": sha256_file(path) if path.is_file() else None}

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        import json

        result = flame_struct_for_clip(flame_file(self.flame_dir, row.clip_id), crop_frames(inputs[CropStep.name]),
                                       self.n_exp)
        save_npy(out_dir / STRUCT_FILE, result.struct)
        save_npy(out_dir / KEEP_MASK_FILE, result.valid)
        info = {"struct_dim": result.layout.dim, "n_exp": result.layout.n_exp, "keep_ratio": round(keep_ratio(result), 4),
                "shape": None if result.shape is None else [round(float(v), 6) for v in result.shape]}
        (out_dir / "flame.json").write_text(json.dumps(info, sort_keys=True))
        return info
