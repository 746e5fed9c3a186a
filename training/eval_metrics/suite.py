"""Running every metric: load what weights exist, evaluate clips one by one, then the set-level FID / FVD.

A network whose weights were not given, or whose file is not there, is left out and its metrics come back
"skipped" with the reason; a file that is there but does not fit its architecture raises WeightsError (a wrong
file is a mistake to fix, not a metric to drop).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from models.fid_inception import INPUT_SIZE as FID_INPUT_SIZE
from models.fid_inception import FIDInceptionV3, load_fid_inception
from models.i3d import CLIP_FRAMES, InceptionI3d, load_i3d
from models.i3d import INPUT_SIZE as I3D_INPUT_SIZE
from models.motion_extractor import MotionExtractor, load_motion_extractor
from models.struct_layout import MOTION_FIELDS, MotionLatents
from models.syncnet import SyncNet, load_syncnet
from models.weights import MOTION_EXTRACTOR_RELPATH
from tasks.face_landmarks import MissingLandmarkModel
from training.eval_metrics.faces import FaceObservation, observe_faces
from training.eval_metrics.fid import fid_from_features, inception_features
from training.eval_metrics.fvd import fvd_from_features, i3d_features
from training.eval_metrics.identity import identity_similarity
from training.eval_metrics.landmarks import landmark_distances
from training.eval_metrics.latent import LatentPair, latent_rows
from training.eval_metrics.lipsync import lip_sync
from training.eval_metrics.motion_error import motion_errors
from training.eval_metrics.results import MetricResult, stopwatch

# the `evaluate` flag that gives each network's weights, named in a skipped metric's reason
WEIGHT_FLAGS = {"motion_extractor": "--liveportrait-root", "syncnet": "--syncnet", "i3d": "--i3d",
                "inception": "--fid-inception"}


@dataclass(frozen=True)
class EvalWeights:
    """Where each network's weights are (None: not given). Identity and landmarks need none: dlib's models ship
    in the face-recognition-models package."""

    liveportrait: Optional[Path] = None  # LivePortrait root (holding pretrained_weights/...) or motion_extractor.pth
    syncnet: Optional[Path] = None  # syncnet_python's syncnet_v2.model, or a safetensors copy
    i3d: Optional[Path] = None  # pytorch-i3d's rgb_imagenet.pt (Kinetics-400), or a safetensors copy
    fid_inception: Optional[Path] = None  # pytorch-fid's pt_inception-2015-12-05-6726825d.pth, or a safetensors copy


@dataclass
class EvalModels:
    motion_extractor: Optional[MotionExtractor] = None
    syncnet: Optional[SyncNet] = None
    i3d: Optional[InceptionI3d] = None
    inception: Optional[FIDInceptionV3] = None
    absent: dict[str, str] = field(default_factory=dict)  # network -> why it is not loaded

    @classmethod
    def load(cls, weights: EvalWeights, device: str = "cpu") -> "EvalModels":
        models = cls()

        def motion_file(p: Path) -> Path:
            return p if p.suffix == ".pth" else p / MOTION_EXTRACTOR_RELPATH

        for attr, path, file_of, loader in (
            ("motion_extractor", weights.liveportrait, motion_file, load_motion_extractor),
            ("syncnet", weights.syncnet, Path, load_syncnet),
            ("i3d", weights.i3d, Path, load_i3d),
            ("inception", weights.fid_inception, Path, load_fid_inception),
        ):
            if path is None:
                models.absent[attr] = f"weights not given (pass {WEIGHT_FLAGS[attr]})"
            elif not file_of(Path(path)).is_file():
                models.absent[attr] = f"weights not found: {file_of(Path(path))}"
            else:
                setattr(models, attr, loader(Path(path)).to(device).eval())
        return models

    def reason(self, attr: str) -> str:
        return f"{attr}: {self.absent.get(attr, 'not loaded')}"


@dataclass
class EvalClip:
    """One generated clip and what it is measured against (uint8 RGB, 25 fps; audio 16 kHz mono float32)."""

    name: str
    generated: np.ndarray  # [T, H, W, 3]
    reference: np.ndarray  # [H, W, 3] the identity image the clip was generated from
    gt: Optional[np.ndarray] = None  # [T', H, W, 3]; metrics against GT use the first min(T, T') frames
    audio: Optional[np.ndarray] = None  # [samples] the driving audio, 640 samples per frame
    gt_motion: Optional[MotionLatents] = None  # the GT's motion when already extracted (shards keep it): halves the cost
    latents: Optional[LatentPair] = None  # the clip in the model's latent / struct space beside the window's truth

    @cached_property
    def paired(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(generated, gt) cut to a common length, or None without GT."""
        if self.gt is None:
            return None
        if self.gt.shape[1:] != self.generated.shape[1:]:
            raise ValueError(f"{self.name}: generated frames {self.generated.shape[1:]} and GT {self.gt.shape[1:]} differ")
        n = min(len(self.generated), len(self.gt))
        return self.generated[:n], self.gt[:n]

    @cached_property
    def generated_faces(self) -> list[Optional[FaceObservation]]:
        return observe_faces(self.generated)

    @cached_property
    def gt_faces(self) -> list[Optional[FaceObservation]]:
        return observe_faces(self.paired[1])


def _timed(results: list[MetricResult], watch) -> list[MetricResult]:
    """Charge the whole call, face detection included, to its results (detection is shared: identity pays for the
    generated frames' faces, the landmark distances for the GT's and reuse the generated ones)."""
    for r in results:
        r.seconds = watch.seconds
    return results


def _identity(clip: EvalClip, models: EvalModels) -> list[MetricResult]:
    with stopwatch() as watch:
        try:
            faces = clip.generated_faces
        except MissingLandmarkModel as exc:
            return [MetricResult.skipped("identity_similarity", str(exc))]
        return _timed([identity_similarity(clip.generated, clip.reference, faces)], watch)


def _landmarks(clip: EvalClip, models: EvalModels) -> list[MetricResult]:
    names = ("lmd_mouth", "lmd_face")
    if clip.paired is None:
        return [MetricResult.skipped(n, "no GT clip") for n in names]
    with stopwatch() as watch:
        try:
            gen_faces, gt_faces = clip.generated_faces[: len(clip.paired[0])], clip.gt_faces
        except MissingLandmarkModel as exc:
            return [MetricResult.skipped(n, str(exc)) for n in names]
        return _timed(landmark_distances(*clip.paired, gen_faces, gt_faces), watch)


def _motion(clip: EvalClip, models: EvalModels) -> list[MetricResult]:
    names = ("pose_error_deg", "expression_error")
    if clip.paired is None:
        return [MetricResult.skipped(n, "no GT clip") for n in names]
    if models.motion_extractor is None:
        return [MetricResult.skipped(n, models.reason("motion_extractor")) for n in names]
    gt_motion = clip.gt_motion
    if gt_motion is not None:
        n = len(clip.paired[0])
        gt_motion = MotionLatents(**{k: getattr(gt_motion, k)[:n] for k in MOTION_FIELDS}, meta=gt_motion.meta)
    return motion_errors(*clip.paired, models.motion_extractor, gt_motion)


def _lip_sync(clip: EvalClip, models: EvalModels) -> list[MetricResult]:
    if clip.audio is None:
        return [MetricResult.skipped(n, "no driving audio") for n in ("lse_d", "lse_c")]
    if models.syncnet is None:
        return [MetricResult.skipped(n, models.reason("syncnet")) for n in ("lse_d", "lse_c")]
    return lip_sync(clip.generated, clip.audio, models.syncnet)


def _latent(clip: EvalClip, models: EvalModels) -> list[MetricResult]:
    return latent_rows(clip.latents)


# The per-clip metrics, in report order; each returns its MetricResults (ok or skipped).
CLIP_METRICS: dict[str, Callable[[EvalClip, EvalModels], list[MetricResult]]] = {
    "identity": _identity,
    "landmarks": _landmarks,
    "motion": _motion,
    "lip_sync": _lip_sync,
    "latent": _latent,
}


@dataclass
class ClipEvaluation:
    name: str
    results: list[MetricResult]
    inception_features: Optional[tuple[np.ndarray, np.ndarray]] = None  # (generated [T, 2048], GT [T, 2048])
    i3d_features: Optional[tuple[np.ndarray, np.ndarray]] = None  # (generated [W, 400], GT [W, 400])


@dataclass(frozen=True)
class FeatureInputs:
    """Input sizes of the FID / FVD networks: the standard ones, unless a quick test shrinks them."""

    inception_size: int = FID_INPUT_SIZE
    i3d_size: int = I3D_INPUT_SIZE
    i3d_window: int = CLIP_FRAMES


def evaluate_clip(clip: EvalClip, models: EvalModels, inputs: FeatureInputs = FeatureInputs()) -> ClipEvaluation:
    """Every per-clip metric, plus this clip's FID / FVD features for the set-level distances."""
    results = [r for metric in CLIP_METRICS.values() for r in metric(clip, models)]
    evaluation = ClipEvaluation(clip.name, results)
    if clip.paired is not None and models.inception is not None:
        evaluation.inception_features = tuple(
            inception_features(models.inception, f, input_size=inputs.inception_size) for f in clip.paired)
    if clip.paired is not None and models.i3d is not None:
        evaluation.i3d_features = tuple(
            i3d_features(models.i3d, f, window=inputs.i3d_window, size=inputs.i3d_size) for f in clip.paired)
    return evaluation


def _pooled(features: Sequence[Optional[tuple[np.ndarray, np.ndarray]]]) -> tuple[np.ndarray, np.ndarray]:
    """(generated, GT) features of every clip that has them, stacked."""
    have = [f for f in features if f is not None]
    return np.concatenate([f[0] for f in have]), np.concatenate([f[1] for f in have])


def summarize(evaluations: Sequence[ClipEvaluation], models: EvalModels) -> list[MetricResult]:
    """Set-level results: each per-clip metric's mean over the clips where it is ok, then FID and FVD."""
    summary = []
    names = list(dict.fromkeys(r.name for e in evaluations for r in e.results))
    for name in names:
        runs = [r for e in evaluations for r in e.results if r.name == name]
        ok = [r for r in runs if r.ok]
        if not ok:
            summary.append(MetricResult.skipped(name, runs[0].reason))
            continue
        summary.append(MetricResult(name, float(np.mean([r.value for r in ok])), reason=ok[0].reason,
                                    seconds=sum(r.seconds for r in runs),
                                    details={"clips": float(len(ok)), "clips_skipped": float(len(runs) - len(ok))}))
    for name, attr, distance, features in (
        ("fid", "inception", fid_from_features, [e.inception_features for e in evaluations]),
        ("fvd", "i3d", fvd_from_features, [e.i3d_features for e in evaluations]),
    ):
        if getattr(models, attr) is None:
            summary.append(MetricResult.skipped(name, models.reason(attr)))
        elif all(f is None for f in features):
            summary.append(MetricResult.skipped(name, "no clip has a GT clip to compare with"))
        else:
            summary.append(distance(*_pooled(features)))
    return summary


def evaluate_set(clips: Sequence[EvalClip], models: EvalModels, inputs: FeatureInputs = FeatureInputs()
                 ) -> tuple[list[ClipEvaluation], list[MetricResult]]:
    """(per-clip evaluations, set summary with FID / FVD) for a test split."""
    evaluations = [evaluate_clip(c, models, inputs) for c in clips]
    return evaluations, summarize(evaluations, models)
