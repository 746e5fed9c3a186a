"""Identity similarity: cosine similarity of dlib's 128-d face descriptors (its face-recognition ResNet) between
each generated frame and the reference image. The network ships in the face-recognition-models package, so this
metric needs no user weights."""
from __future__ import annotations

import threading
from typing import Optional, Sequence

import numpy as np

from tasks.face_landmarks import MissingLandmarkModel, face_recognition_models_dir
from training.eval_metrics.faces import FaceObservation, observe_face, observe_faces
from training.eval_metrics.results import MetricResult, stopwatch

FACE_RECOGNITION_MODEL = "dlib_face_recognition_resnet_model_v1.dat"
DESCRIPTOR_DIM = 128

_per_thread = threading.local()


class FaceEncoder:
    """dlib's face-recognition ResNet; one per thread (dlib objects are not safe to share between threads)."""

    def __init__(self):
        import dlib

        path = face_recognition_models_dir() / FACE_RECOGNITION_MODEL
        if not path.is_file():
            raise MissingLandmarkModel(f"dlib face-recognition model not found at {path}")
        self._net = dlib.face_recognition_model_v1(str(path))

    def descriptor(self, image_rgb: np.ndarray, face: FaceObservation) -> np.ndarray:
        """[128] float64 descriptor of `face` in the uint8 RGB image it was observed in."""
        return np.array(self._net.compute_face_descriptor(np.ascontiguousarray(image_rgb), face.shape), np.float64)


def get_face_encoder() -> FaceEncoder:
    if not hasattr(_per_thread, "encoder"):
        _per_thread.encoder = FaceEncoder()
    return _per_thread.encoder


def face_descriptors(frames: np.ndarray, faces: Sequence[Optional[FaceObservation]]) -> np.ndarray:
    """[T, 128] descriptors, NaN rows where a frame has no face."""
    encoder = get_face_encoder()
    out = np.full((len(frames), DESCRIPTOR_DIM), np.nan)
    for i, (frame, face) in enumerate(zip(frames, faces)):
        if face is not None:
            out[i] = encoder.descriptor(frame, face)
    return out


def cosine_similarity(descriptors: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """[T] cosine similarity of each row of [T, D] to [D] (NaN rows stay NaN)."""
    return descriptors @ reference / (np.linalg.norm(descriptors, axis=1) * np.linalg.norm(reference))


def reference_descriptor(reference_rgb: np.ndarray) -> Optional[np.ndarray]:
    face = observe_face(reference_rgb)
    return None if face is None else get_face_encoder().descriptor(reference_rgb, face)


def identity_similarity(frames: np.ndarray, reference_rgb: np.ndarray,
                        faces: Optional[Sequence[Optional[FaceObservation]]] = None) -> MetricResult:
    """Mean cosine similarity to the reference over frames with a face (1.0 = the reference's own descriptor).

    `faces`: the clip's observations when the caller already has them (the suite shares them with the LMD).
    Frames without a face are left out of the mean (NaN in the series, counted in details).
    """
    name = "identity_similarity"
    with stopwatch() as watch:
        try:
            ref = reference_descriptor(reference_rgb)
        except MissingLandmarkModel as exc:
            return MetricResult.skipped(name, str(exc), watch.seconds)
        if ref is None:
            return MetricResult.skipped(name, "no face found in the reference image", watch.seconds)
        faces = observe_faces(frames) if faces is None else faces
        sims = cosine_similarity(face_descriptors(frames, faces), ref)
    found = ~np.isnan(sims)
    if not found.any():
        return MetricResult.skipped(name, f"no face found in any of the {len(frames)} frames", watch.seconds)
    return MetricResult(name, float(sims[found].mean()), series=sims.tolist(), seconds=watch.seconds,
                        details={"frames": float(len(frames)), "frames_without_face": float((~found).sum())})
