"""Step 3: per-frame LivePortrait motion (kp, exp, pitch/yaw/roll, scale, t) from the 512x512 crop."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Iterator

import cv2
import numpy as np
import torch

from datasets_manifest.schema import ClipRow
from models.motion_extractor import INPUT_SIZE, MotionExtractor
from models.precision import extractor_autocast, extractor_precision
from models.struct_layout import MotionLatents, load_motion, save_motion
from tasks import feature_models
from tasks.errors import ClipRejected
from tasks.feature_models import FeatureModels
from tasks.prefetch import prefetched
from tasks.step_store import fingerprint, save_npy
from tasks.steps.crop import CROP_VIDEO, CropStep, crop_frames

__all__ = ["MotionLatents", "extract_motion", "extract_motion_from_video", "save_motion", "load_motion",
           "prepare_frames", "pick_device"]


def pick_device(device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def prepare_frames(frames_uint8: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, 3] RGB -> float [N, 3, 256, 256] in [0, 1], resized as LivePortrait does (cv2 bilinear)."""
    if frames_uint8.ndim != 4 or frames_uint8.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3] RGB, got {frames_uint8.shape}")
    if frames_uint8.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames_uint8.dtype}")
    if frames_uint8.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
        frames_uint8 = np.stack([cv2.resize(f, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_LINEAR)
                                 for f in frames_uint8])
    x = torch.from_numpy(np.ascontiguousarray(frames_uint8)).permute(0, 3, 1, 2).float() / 255.0
    return x.clamp_(0.0, 1.0)


def _pinned(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Page-locked on the CPU when bound for CUDA, so the copy overlaps the previous batch's compute."""
    return x.pin_memory() if device.type == "cuda" else x


def _batches(frames: np.ndarray | Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Re-chunk an array or an iterator of [n, H, W, 3] chunks into batches of at most batch_size frames."""
    if isinstance(frames, np.ndarray):
        frames = [frames]
    pending: list[np.ndarray] = []
    count = 0
    for chunk in frames:
        if chunk.ndim == 3:
            chunk = chunk[None]
        pending.append(chunk)
        count += len(chunk)
        while count >= batch_size:
            joined = np.concatenate(pending) if len(pending) > 1 else pending[0]
            yield joined[:batch_size]
            rest = joined[batch_size:]
            pending, count = ([rest] if len(rest) else []), len(rest)
    if count:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


@torch.inference_mode()
def extract_motion(
    frames: np.ndarray | Iterable[np.ndarray],
    extractor: MotionExtractor,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    bf16: bool = True,
) -> MotionLatents:
    """Run the motion extractor over uint8 RGB frames [T, H, W, 3] (or an iterator of such chunks).

    Batches are decoded and resized on a CPU thread while the device runs the previous one (tasks/prefetch.py);
    on CUDA the extractor runs under bf16 autocast (models/precision.py) unless `bf16=False`. Memory stays
    bounded by a few batches of frames; outputs are float32 numpy, one row per frame.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = pick_device(device)
    extractor = extractor.to(dev).eval()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("kp", "exp", "pitch", "yaw", "roll", "scale", "t")}
    batches = prefetched(_pinned(prepare_frames(batch), dev) for batch in _batches(frames, batch_size))
    with contextlib.closing(batches):
        for x in batches:
            with extractor_autocast(dev, bf16):
                out = extractor(x.to(dev, non_blocking=True))
            for k in parts:
                parts[k].append(out[k].float().cpu().numpy())
    if not parts["kp"]:
        raise ValueError("no frames given to extract_motion")
    arrays = {k: np.concatenate(v).astype(np.float32) for k, v in parts.items()}
    meta = {"untrained_dryrun": bool(getattr(extractor, "untrained_dryrun", False)),
            "precision": extractor_precision(dev, bf16), "input_size": INPUT_SIZE, "dims": list(extractor.cfg.dims),
            "depths": list(extractor.cfg.depths)}
    return MotionLatents(**arrays, meta=meta)


def extract_motion_from_video(
    crop_mp4: str | Path,
    extractor: MotionExtractor,
    out_path: str | Path | None = None,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    bf16: bool = True,
) -> MotionLatents:
    """Decode the crop by streaming (bounded memory), extract motion, optionally save float16 .npz."""
    from tasks.media import iter_frames

    motion = extract_motion(iter_frames(crop_mp4, chunk=batch_size), extractor, batch_size, device, bf16)
    if out_path is not None:
        save_motion(out_path, motion)
    return motion


MOTION_FILE = "motion.npz"
STRUCT_FILE = "struct.npy"


@dataclass
class MotionStep:
    """Step 3: LivePortrait motion latents per frame, plus the flat struct vectors training reads."""

    models: FeatureModels
    batch_size: int = 64
    weights: ClassVar[str] = "liveportrait_root"  # the ModelWeights field naming the model it loads
    name: ClassVar[str] = "motion"
    version: ClassVar[str] = "1"
    requires: ClassVar[tuple[str, ...]] = (CropStep.name,)

    def fingerprint(self) -> str:
        return fingerprint(self.models.liveportrait_root, self.models.dryrun, *feature_models.precision_tag(self.models))

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        from models.struct_layout import to_struct

        crop = inputs[CropStep.name]
        motion = extract_motion_from_video(crop / CROP_VIDEO, feature_models.motion_extractor(self.models),
                                           out_dir / MOTION_FILE, batch_size=self.batch_size,
                                           device=feature_models._device(self.models), bf16=self.models.bf16)
        if motion.num_frames != crop_frames(crop):
            raise ClipRejected("corrupt", f"motion has {motion.num_frames} rows for {crop_frames(crop)} frames")
        save_npy(out_dir / STRUCT_FILE, to_struct(motion))
        return {"frames": motion.num_frames, "untrained_dryrun": motion.meta.get("untrained_dryrun", False)}
