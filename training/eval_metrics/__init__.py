"""Evaluation metrics for generated talking-head clips (identity, landmark distances, pose / expression error,
lip sync, FID, FVD, long-sequence consistency), as plain functions; `evaluate_set` runs them all.

One module per job: results (the MetricResult type), frechet (the distance FID and FVD share), faces (dlib
observations shared by identity and landmarks), identity, landmarks, motion_error, mfcc + lipsync, fid, fvd,
consistency, and suite (which weights exist -> which metrics run).
"""
from training.eval_metrics.consistency import long_sequence_consistency
from training.eval_metrics.results import MetricResult
from training.eval_metrics.suite import (
    CLIP_METRICS,
    ClipEvaluation,
    EvalClip,
    EvalModels,
    EvalWeights,
    FeatureInputs,
    evaluate_clip,
    evaluate_set,
    summarize,
)

__all__ = ["CLIP_METRICS", "ClipEvaluation", "EvalClip", "EvalModels", "EvalWeights", "FeatureInputs", "MetricResult",
           "evaluate_clip", "evaluate_set", "long_sequence_consistency", "summarize"]
