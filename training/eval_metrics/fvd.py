"""FVD (Unterthiner et al. 2018): Fréchet distance between I3D (Kinetics-400) logits of generated and GT video
windows. As the reference: 16-frame windows, bilinear resize to 224x224, RGB scaled to [-1, 1]; a set metric
(one feature per window), so the suite pools the windows of every clip before measuring."""
from __future__ import annotations

from typing import Optional

import cv2
import numpy as np
import torch

from models.i3d import CLIP_FRAMES, INPUT_SIZE, InceptionI3d
from training.eval_metrics.frechet import frechet_metric
from training.eval_metrics.results import MetricResult


def window_starts(num_frames: int, window: int = CLIP_FRAMES, stride: Optional[int] = None) -> range:
    """Starts of non-overlapping (or `stride`-spaced) windows of `window` frames; a shorter tail is dropped."""
    return range(0, num_frames - window + 1, stride or window)


@torch.inference_mode()
def i3d_features(model: InceptionI3d, frames: np.ndarray, window: int = CLIP_FRAMES, size: int = INPUT_SIZE,
                 stride: Optional[int] = None, batch_size: int = 4) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3] -> [windows, num_classes] float64 logits (0 rows when T < window)."""
    starts = window_starts(len(frames), window, stride)
    if not len(starts):
        return np.zeros((0, model.cfg.num_classes))
    device = next(model.parameters()).device
    resized = np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_LINEAR) for f in frames[: starts[-1] + window]])
    video = torch.from_numpy(resized).permute(3, 0, 1, 2)  # [3, T, size, size] uint8
    out = []
    for b in range(0, len(starts), batch_size):
        clips = torch.stack([video[:, s: s + window] for s in starts[b: b + batch_size]])  # [B, 3, window, size, size]
        out.append(model.logits_features(clips.to(device).float() / 127.5 - 1.0).double().cpu().numpy())
    return np.concatenate(out)


def fvd_from_features(gen_features: Optional[np.ndarray], gt_features: Optional[np.ndarray]) -> MetricResult:
    """FVD of two window-feature sets [N, 400] (None: the I3D weights were not given)."""
    return frechet_metric("fvd", gen_features, gt_features, "windows",
                          "no I3D weights given (pass --i3d: pytorch-i3d's rgb_imagenet.pt, Kinetics-400)")
