"""FID: Fréchet distance between Inception-v3 pool features of generated and GT frames (a set metric: the
Gaussians need many frames, so the suite pools every clip's frames before measuring)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from models.fid_inception import INPUT_SIZE, FIDInceptionV3
from training.eval_metrics.frechet import frechet_metric
from training.eval_metrics.results import MetricResult


@torch.inference_mode()
def inception_features(model: FIDInceptionV3, frames: np.ndarray, batch_size: int = 16,
                       input_size: int = INPUT_SIZE) -> np.ndarray:
    """uint8 RGB frames [T, H, W, 3] -> [T, 2048] float64 (pytorch-fid's preprocessing inside the model)."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(frames), batch_size):
        batch = torch.tensor(frames[start: start + batch_size], device=device)  # a copy: decoded frames are read-only
        images = batch.permute(0, 3, 1, 2).float() / 255.0  # [B, 3, H, W] in [0, 1]
        out.append(model.pool_features(images, input_size).double().cpu().numpy())
    return np.concatenate(out)


def fid_from_features(gen_features: Optional[np.ndarray], gt_features: Optional[np.ndarray]) -> MetricResult:
    """FID of two feature sets [N, 2048] (None: the Inception weights were not given)."""
    return frechet_metric("fid", gen_features, gt_features, "frames",
                          "no FID Inception weights given "
                          "(pass --fid-inception: pytorch-fid's pt_inception-2015-12-05-6726825d.pth)")
