"""Long-sequence consistency: does a long generated clip keep its identity and its head where it started?

Per-second series (bins of `bin_seconds`) of identity similarity to the reference and of head-pose drift, the
geodesic angle between each frame's head rotation and the first frame's (LivePortrait's motion extractor).
Frames may come as one array or as an iterator of [n, H, W, 3] chunks (a minute of 512x512 video is 1.2 GB), and
`sample_every` thins them (every frame costs ~0.1 s of dlib on CPU).
"""
from __future__ import annotations

from typing import Iterable, Optional

import numpy as np

from models.motion_extractor import MotionExtractor
from models.struct_layout import rotation_from_angles
from tasks.face_landmarks import MissingLandmarkModel
from tasks.steps.motion import extract_motion
from training.eval_metrics.faces import observe_faces
from training.eval_metrics.identity import cosine_similarity, face_descriptors, reference_descriptor
from training.eval_metrics.motion_error import DRYRUN_CAVEAT, NO_EXTRACTOR
from training.eval_metrics.results import MetricResult, stopwatch


def rotation_angle_deg(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[T] angle (degrees) of the rotation taking each b [T, 3, 3] to a [T, 3, 3]."""
    cos = (np.einsum("tij,tij->t", a, b) - 1.0) / 2.0  # trace(a b^T) = 1 + 2 cos(angle)
    return np.rad2deg(np.arccos(np.clip(cos, -1.0, 1.0)))


def bin_means(values: np.ndarray, frame_index: np.ndarray, frames_per_bin: float) -> list[float]:
    """Mean of the non-NaN values per bin of `frames_per_bin` frames (NaN for a bin with none)."""
    bins = (frame_index // frames_per_bin).astype(int)
    out = []
    for b in range(int(bins.max()) + 1 if len(bins) else 0):
        v = values[(bins == b) & ~np.isnan(values)]
        out.append(float(v.mean()) if len(v) else float("nan"))
    return out


def _series_result(name: str, series: list[float], seconds: float, worst, reason: str = "") -> MetricResult:
    """Value: the mean over the bins; details: the first, last and worst (`worst` of the bins: min or max) bins."""
    arr = np.array(series)
    valid = arr[~np.isnan(arr)]
    if not len(valid):
        return MetricResult.skipped(name, "no usable frame in the clip", seconds)
    return MetricResult(name, float(valid.mean()), reason=reason, series=series, seconds=seconds,
                        details={"first_bin": float(valid[0]), "last_bin": float(valid[-1]), "worst_bin": float(worst(valid)),
                                 "bins": float(len(series))})


def _reference(reference_rgb: np.ndarray) -> tuple[Optional[np.ndarray], str]:
    """The reference's face descriptor, or None with the reason identity cannot be measured."""
    try:
        ref = reference_descriptor(reference_rgb)
        return ref, "" if ref is not None else "no face found in the reference image"
    except MissingLandmarkModel as exc:
        return None, str(exc)


def unmeasurable_long_sequence(reference_rgb: np.ndarray, extractor: Optional[MotionExtractor]) -> list[MetricResult]:
    """Both long-sequence rows, skipped with their reasons, when neither can be measured (no face in the reference
    or no landmark model, and no motion extractor); [] when one can. The caller then need not decode a frame of
    the long generation (on the dry-run model that decode was most of evaluate's ~107 s for nothing)."""
    if extractor is not None:
        return []
    ref, identity_reason = _reference(reference_rgb)
    if ref is not None:
        return []
    return [MetricResult.skipped("identity_per_second", identity_reason),
            MetricResult.skipped("pose_drift_deg_per_second", NO_EXTRACTOR)]


def long_sequence_consistency(frames: np.ndarray | Iterable[np.ndarray], reference_rgb: np.ndarray,
                              extractor: Optional[MotionExtractor], fps: float = 25.0, bin_seconds: float = 1.0,
                              sample_every: int = 1) -> list[MetricResult]:
    """[identity_per_second, pose_drift_deg_per_second] of a long generated clip."""
    if sample_every < 1:
        raise ValueError(f"sample_every must be >= 1, got {sample_every}")
    chunks = [frames] if isinstance(frames, np.ndarray) else frames
    with stopwatch() as watch:
        ref, identity_reason = _reference(reference_rgb)
        index, sims, rotations = [], [], []
        seen = 0
        for chunk in chunks:
            start, seen = seen, seen + len(chunk)
            picked = np.arange(start, seen)
            picked = picked[picked % sample_every == 0]
            if not len(picked):
                continue
            sampled = chunk[picked - start]
            index.append(picked)
            if ref is not None:
                sims.append(cosine_similarity(face_descriptors(sampled, observe_faces(sampled)), ref))
            if extractor is not None:
                motion = extract_motion(sampled, extractor, device=next(extractor.parameters()).device)
                rotations.append(rotation_from_angles(motion.pitch, motion.yaw, motion.roll))
    if not index:
        raise ValueError("no frames given")
    frame_index = np.concatenate(index).astype(np.float64)
    per_bin = fps * bin_seconds
    results = []
    if ref is None:
        results.append(MetricResult.skipped("identity_per_second", identity_reason, watch.seconds))
    else:
        results.append(_series_result("identity_per_second", bin_means(np.concatenate(sims), frame_index, per_bin),
                                      watch.seconds, np.min))
    if extractor is None:
        results.append(MetricResult.skipped("pose_drift_deg_per_second", NO_EXTRACTOR))
    else:
        rot = np.concatenate(rotations)
        drift = rotation_angle_deg(rot, np.broadcast_to(rot[:1], rot.shape))
        results.append(_series_result("pose_drift_deg_per_second", bin_means(drift, frame_index, per_bin), watch.seconds,
                                      np.max, DRYRUN_CAVEAT if extractor.untrained_dryrun else ""))
    return results
