"""The Fréchet distance between two Gaussians fitted to feature sets: FID and FVD differ only in the features."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import scipy.linalg

from training.eval_metrics.results import MetricResult, stopwatch


@dataclass(frozen=True)
class GaussianStats:
    """Mean and covariance of a feature set, the covariance kept as a factor F with cov = F F^T.

    F is the centred features / sqrt(N - 1) when N <= D (as for one clip's frames: 2048-d Inception features of
    25 frames), else the eigen factor of the covariance; either way it is exact.
    """

    mean: np.ndarray  # [D]
    factor: np.ndarray  # [D, K]
    count: int

    @classmethod
    def of(cls, features: np.ndarray) -> "GaussianStats":
        """features [N, D], N >= 2 (float64 throughout: 2048-d covariances lose digits in float32)."""
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or len(f) < 2:
            raise ValueError(f"need [N >= 2, D] features for a covariance, got {f.shape}")
        n, d = f.shape
        mean = f.mean(0)
        centred = (f - mean).T / np.sqrt(n - 1)  # [D, N]
        if n <= d:
            return cls(mean, centred, n)
        w, v = scipy.linalg.eigh(centred @ centred.T)
        return cls(mean, v * np.sqrt(np.clip(w, 0.0, None)), n)

    @property
    def cov(self) -> np.ndarray:
        return self.factor @ self.factor.T


def frechet_distance(a: GaussianStats, b: GaussianStats) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a) + Tr(S_b) - 2 Tr((S_a S_b)^(1/2)), the FID / FVD formula.

    Tr((S_a S_b)^(1/2)) is the sum of the singular values of F_a^T F_b (the nonzero eigenvalues of S_a S_b are
    those of (F_a^T F_b)(F_a^T F_b)^T). pytorch-fid takes scipy.linalg.sqrtm of the D x D product instead: the
    same number (tests/test_eval_metrics.py compares them), but sqrtm took ~40 s per 2048-d call on our 2-core
    CPU (scipy 1.17) and needs an eps hack for the singular covariances of small sets; this takes well under 1 s.
    """
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"feature sizes differ: {a.mean.shape} vs {b.mean.shape}")
    diff = a.mean - b.mean
    cross = np.linalg.svd(a.factor.T @ b.factor, compute_uv=False).sum()
    return float(diff @ diff + np.sum(a.factor ** 2) + np.sum(b.factor ** 2) - 2.0 * cross)


def frechet_metric(name: str, gen_features: Optional[np.ndarray], gt_features: Optional[np.ndarray], unit: str,
                   skip_reason: str) -> MetricResult:
    """FID / FVD as a MetricResult: skipped with `skip_reason` when a side has no features (no weights), or when a
    side has fewer than 2 `unit`s (frames, windows) to fit a covariance to."""
    if gen_features is None or gt_features is None:
        return MetricResult.skipped(name, skip_reason)
    if min(len(gen_features), len(gt_features)) < 2:
        return MetricResult.skipped(name, f"need 2+ {unit} per side, got {len(gen_features)} and {len(gt_features)}")
    with stopwatch() as watch:
        value = frechet_distance(GaussianStats.of(gen_features), GaussianStats.of(gt_features))
    return MetricResult(name, value, seconds=watch.seconds,
                        details={f"generated_{unit}": float(len(gen_features)), f"gt_{unit}": float(len(gt_features))})
