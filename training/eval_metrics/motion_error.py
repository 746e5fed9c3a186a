"""Head-pose and expression error against ground truth, read by LivePortrait's motion extractor (step 3's)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from models.motion_extractor import MotionExtractor
from models.struct_layout import MotionLatents
from tasks.steps.motion import extract_motion
from training.eval_metrics.results import MetricResult, stopwatch

DRYRUN_CAVEAT = "untrained dry-run motion extractor: the numbers test plumbing only"
NO_EXTRACTOR = "no LivePortrait motion extractor weights given (pass --liveportrait-root)"


def pose_angles(motion: MotionLatents) -> np.ndarray:
    """[T, 3] pitch, yaw, roll in degrees."""
    return np.stack([motion.pitch, motion.yaw, motion.roll], -1).astype(np.float64)


def motion_errors(gen_frames: np.ndarray, gt_frames: np.ndarray, extractor: Optional[MotionExtractor],
                  gt_motion: Optional[MotionLatents] = None) -> list[MetricResult]:
    """[pose_error_deg, expression_error]: mean |angle difference| over pitch/yaw/roll and frames (degrees), and
    mean L1 between the expression deltas exp [T, 21, 3]. `gt_motion`: the GT's motion when already extracted
    (the dataset's shards keep it); it must have been made by the same extractor weights."""
    names = ("pose_error_deg", "expression_error")
    if extractor is None:
        return [MetricResult.skipped(n, NO_EXTRACTOR) for n in names]
    if len(gen_frames) != len(gt_frames if gt_motion is None else gt_motion.pitch):
        raise ValueError("generated and GT clips differ in length")
    with stopwatch() as watch:
        device = next(extractor.parameters()).device  # where the caller put it (extract_motion would pick a GPU)
        gen = extract_motion(gen_frames, extractor, device=device)
        gt = extract_motion(gt_frames, extractor, device=device) if gt_motion is None else gt_motion
    caveat = DRYRUN_CAVEAT if extractor.untrained_dryrun else ""
    pose_abs = np.abs(pose_angles(gen) - pose_angles(gt))  # [T, 3]
    exp_abs = np.abs(gen.exp.astype(np.float64) - gt.exp).reshape(len(pose_abs), -1)  # [T, 63]
    per_axis = pose_abs.mean(0)
    return [
        MetricResult(names[0], float(pose_abs.mean()), reason=caveat, series=pose_abs.mean(1).tolist(),
                     seconds=watch.seconds, details=dict(zip(("pitch", "yaw", "roll"), map(float, per_axis)))),
        MetricResult(names[1], float(exp_abs.mean()), reason=caveat, series=exp_abs.mean(1).tolist(),
                     seconds=watch.seconds),
    ]
