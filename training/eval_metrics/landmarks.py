"""Landmark distances against ground truth: LMD (mouth, points 48-67) and face LMD (all 68 points).

dlib's 68 landmarks of each generated frame and its GT frame, mean Euclidean distance per point, in pixels of
a 512x512 crop (coordinates rescaled from the frame size, so numbers compare across resolutions), mean over the
frames where both have a face.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from tasks.face_landmarks import MissingLandmarkModel
from training.eval_metrics.faces import FaceObservation, observe_faces
from training.eval_metrics.results import MetricResult, stopwatch

CROP_SIZE = 512  # the reporting scale: the dataset's LivePortrait crops are 512x512
MOUTH = slice(48, 68)
ALL_POINTS = slice(0, 68)


def per_frame_distance(gen: Sequence[Optional[FaceObservation]], gt: Sequence[Optional[FaceObservation]],
                       points: slice, frame_hw: tuple[int, int]) -> np.ndarray:
    """[T] mean point distance (512-crop pixels) per frame; NaN where either frame has no face."""
    scale = np.array([CROP_SIZE / frame_hw[1], CROP_SIZE / frame_hw[0]], np.float64)  # x, y
    out = np.full(len(gen), np.nan)
    for i, (a, b) in enumerate(zip(gen, gt)):
        if a is not None and b is not None:
            delta = (a.landmarks[points].astype(np.float64) - b.landmarks[points]) * scale
            out[i] = np.linalg.norm(delta, axis=1).mean()
    return out


def landmark_distances(gen_frames: np.ndarray, gt_frames: np.ndarray,
                       gen_faces: Optional[Sequence[Optional[FaceObservation]]] = None,
                       gt_faces: Optional[Sequence[Optional[FaceObservation]]] = None) -> list[MetricResult]:
    """[lmd_mouth, lmd_face] for same-length, same-size clips; observations are reused when given."""
    if gen_frames.shape != gt_frames.shape:
        raise ValueError(f"generated {gen_frames.shape} and GT {gt_frames.shape} frames differ in shape")
    names = ("lmd_mouth", "lmd_face")
    with stopwatch() as watch:
        try:
            gen_faces = observe_faces(gen_frames) if gen_faces is None else gen_faces
            gt_faces = observe_faces(gt_frames) if gt_faces is None else gt_faces
        except MissingLandmarkModel as exc:
            return [MetricResult.skipped(n, str(exc), watch.seconds) for n in names]
        series = [per_frame_distance(gen_faces, gt_faces, pts, gen_frames.shape[1:3]) for pts in (MOUTH, ALL_POINTS)]
    results = []
    for name, dist in zip(names, series):
        found = ~np.isnan(dist)
        if not found.any():
            results.append(MetricResult.skipped(name, "no frame has a face in both the generated and the GT clip",
                                                watch.seconds))
            continue
        results.append(MetricResult(name, float(dist[found].mean()), series=dist.tolist(), seconds=watch.seconds,
                                    details={"frames": float(len(dist)), "frames_compared": float(found.sum())}))
    return results
