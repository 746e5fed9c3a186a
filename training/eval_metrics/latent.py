"""Metrics in the model's own latent / struct space: they need no metric weights and no face in the decoded frames,
so they measure an untrained dry-run model as well as a real one (where pixel metrics can only say "skipped").

- latent MSE: the generated clip's VAE latents against the ground-truth window's, per second of video;
- struct pose / mouth error: the struct stream's generated rows against the shard's motion rows (LivePortrait's
  pitch/yaw/roll and lip-keypoint expression, or FLAME's global pose and expression + jaw), on kept frames;
- latent identity drift: over a long generation, the distance of each second's latents to the reference latent;
  its rise from the first to the last second is the drift (identity the video forgets).
Generation is free to differ from one ground truth (speech does not fix a head's motion): these rows compare models
and steps, they do not grade one sample. Units: latents' and struct rows' own (unit-variance shards).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from models.dualforce.aux_losses import mouth_columns, pose_columns
from training.eval_metrics.results import MetricResult, stopwatch

FPS = 25
FRAMES_PER_LATENT = 4
LATENT_METRICS = ("latent_mse", "struct_pose_error", "struct_mouth_error")
PER_SECOND = (*LATENT_METRICS, "latent_identity_drift")  # their series are per second of video, not per frame


@dataclass
class LatentPair:
    """A generated clip in the model's own spaces beside the shard window's ground truth."""

    generated_latents: np.ndarray  # [16, L, h, w]
    truth_latents: np.ndarray  # [16, L', h, w]
    generated_struct: np.ndarray  # [T, S] one row per video frame
    truth_struct: np.ndarray  # [T', S]
    keep: np.ndarray  # [T'] bool: truth rows that are real (not a lost face)


def latent_rows(pair: Optional[LatentPair]) -> list[MetricResult]:
    """latent_mse, struct_pose_error, struct_mouth_error of one clip (skipped without ground-truth latents)."""
    if pair is None:
        return [MetricResult.skipped(n, "the sample has no ground-truth latents") for n in LATENT_METRICS]
    if pair.generated_latents.shape[2:] != pair.truth_latents.shape[2:]:
        raise ValueError(f"generated latents {pair.generated_latents.shape} and the truth's "
                         f"{pair.truth_latents.shape} differ in size")
    return [latent_mse(pair.generated_latents, pair.truth_latents),
            *struct_errors(pair.generated_struct, pair.truth_struct, pair.keep)]


def latent_seconds(latent_frames: int) -> np.ndarray:
    """The second of video each latent frame ends in (frame 0 alone, then groups of 4 video frames)."""
    return (FRAMES_PER_LATENT * np.arange(latent_frames)) // FPS


def _per_second(values: np.ndarray, seconds: np.ndarray) -> list[float]:
    return [float(values[seconds == s].mean()) for s in np.unique(seconds)]


def latent_mse(generated: np.ndarray, truth: np.ndarray) -> MetricResult:
    """generated / truth latents [16, L, h, w] of one clip -> mean MSE, series per second."""
    with stopwatch() as watch:
        n = min(generated.shape[1], truth.shape[1])
        per_frame = ((generated[:, :n] - truth[:, :n]) ** 2).mean(axis=(0, 2, 3))  # [L]
        series = _per_second(per_frame, latent_seconds(n))
    return MetricResult("latent_mse", float(per_frame.mean()), series=series, seconds=watch.seconds,
                        details={"latent_frames": float(n)})


def struct_errors(generated_rows: np.ndarray, truth_rows: np.ndarray, keep: np.ndarray) -> list[MetricResult]:
    """generated / truth struct rows [T, S] (one per video frame), keep [T] bool -> pose and mouth MSE, per second."""
    with stopwatch() as watch:
        n = min(len(generated_rows), len(truth_rows), len(keep))
        kept = np.asarray(keep[:n], bool)
        seconds = np.arange(n) // FPS
        out = []
        for name, cols in (("struct_pose_error", pose_columns(truth_rows.shape[1])),
                           ("struct_mouth_error", mouth_columns(truth_rows.shape[1]))):
            err = ((generated_rows[:n, cols] - truth_rows[:n, cols]) ** 2).mean(axis=1)  # [T]
            if not kept.any():
                out.append(MetricResult.skipped(name, "no kept frame in the window"))
                continue
            series = [float(err[kept & (seconds == s)].mean()) if (kept & (seconds == s)).any() else float("nan")
                      for s in np.unique(seconds)]
            out.append(MetricResult(name, float(err[kept].mean()), series=series,
                                    details={"frames": float(kept.sum())}))
    for r in out:
        r.seconds = watch.seconds / len(out)
    return out


def distance_to_reference(latents: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """latents [16, n, h, w], reference latent [16, 1, h, w] -> [n] per-frame MSE to the reference (a long generation
    adds its chunks' distances as they come, holding no latents)."""
    return ((latents - reference) ** 2).mean(axis=(0, 2, 3))


def latent_identity_drift(per_frame_distance: np.ndarray) -> MetricResult:
    """Per latent frame of a long generation, its distance to the reference latent -> per second, the mean distance;
    value: last second's minus the first's (> 0: the video drifts away from the identity it was given)."""
    with stopwatch() as watch:
        series = _per_second(np.asarray(per_frame_distance, np.float64), latent_seconds(len(per_frame_distance)))
    return MetricResult("latent_identity_drift", series[-1] - series[0], series=series, seconds=watch.seconds,
                        details={"first_second": series[0], "last_second": series[-1]})
