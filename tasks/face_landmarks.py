"""Face detection + 68-point landmarks that work offline.

Default: dlib's HOG frontal-face detector and its 68-point shape predictor (iBUG 300-W layout). The predictor
file ships inside the `face-recognition-models` wheel, so nothing is downloaded at run time. 68 points are one
of the layouts LivePortrait's crop code accepts. `face-alignment` (FAN) is used instead when asked for and its
weights are already in the user's torch hub cache.
"""
from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class MissingLandmarkModel(RuntimeError):
    """The landmark model's files are not on this machine; the message says where they are expected."""


@dataclass(frozen=True)
class FaceBox:
    x0: float
    y0: float
    x1: float
    y1: float
    score: float = 1.0

    @property
    def size(self) -> float:
        return float(np.sqrt(max(self.x1 - self.x0, 0) * max(self.y1 - self.y0, 0)))

    @property
    def center(self) -> np.ndarray:
        return np.array([(self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2], np.float64)

    def scaled(self, s: float) -> "FaceBox":
        return FaceBox(self.x0 * s, self.y0 * s, self.x1 * s, self.y1 * s, self.score)


class FaceLandmarker(Protocol):
    name: str

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """All faces in a uint8 image (gray [H, W] or RGB [H, W, 3]), largest first."""

    def landmarks(self, image: np.ndarray, box: FaceBox) -> np.ndarray:
        """[68, 2] float32 landmarks of the face in `box` (image pixels; gray or RGB)."""


def face_recognition_models_dir() -> Path:
    """The `models/` folder of the face-recognition-models package (dlib's predictors and face-recognition ResNet).

    Importing the package needs pkg_resources (gone in setuptools >= 81): locate its files instead."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise MissingLandmarkModel("package face-recognition-models is not installed (it ships dlib's 68-point model)")
    return Path(list(spec.submodule_search_locations)[0]) / "models"


class DlibLandmarker:
    name = "dlib-hog+shape_predictor_68"

    def __init__(self, predictor_path: str | Path | None = None, upsample: int = 0):
        import dlib

        default = face_recognition_models_dir() / "shape_predictor_68_face_landmarks.dat"
        path = Path(predictor_path) if predictor_path else default
        if not path.exists():
            raise MissingLandmarkModel(f"dlib 68-point shape predictor not found at {path}")
        self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(str(path))
        self._dlib = dlib
        self.upsample = upsample

    # dlib's HOG and shape predictor work on intensity: a gray image skips their RGB->gray conversion.
    def detect(self, image: np.ndarray) -> list[FaceBox]:
        rects, scores, _ = self._detector.run(np.ascontiguousarray(image), self.upsample, 0.0)
        boxes = [FaceBox(r.left(), r.top(), r.right(), r.bottom(), float(s)) for r, s in zip(rects, scores)]
        return sorted(boxes, key=lambda b: b.size, reverse=True)

    def shape(self, image: np.ndarray, box: FaceBox):
        """dlib's own `full_object_detection` of the face in `box`: what its face-recognition network aligns with."""
        rect = self._dlib.rectangle(int(round(box.x0)), int(round(box.y0)), int(round(box.x1)), int(round(box.y1)))
        return self._predictor(np.ascontiguousarray(image), rect)

    def landmarks(self, image: np.ndarray, box: FaceBox) -> np.ndarray:
        return np.array([[p.x, p.y] for p in self.shape(image, box).parts()], np.float32)


class FanLandmarker:
    """face-alignment's FAN (the design card's choice) when its weights are already cached locally."""

    name = "face-alignment-fan-2d"

    def __init__(self, device: str = "cpu"):
        try:
            import face_alignment  # type: ignore
        except ImportError as exc:
            raise MissingLandmarkModel("face-alignment is not installed (pip install face-alignment)") from exc
        import torch

        hub = Path(torch.hub.get_dir()) / "checkpoints"
        if not any(hub.glob("2DFAN4*")) or not any(hub.glob("s3fd*")):
            raise MissingLandmarkModel(
                f"face-alignment weights (2DFAN4-*.zip, s3fd-*.pth) not found in {hub}; this machine cannot download them"
            )
        self._fa = face_alignment.FaceAlignment(face_alignment.LandmarksType.TWO_D, device=device, face_detector="sfd")

    @staticmethod
    def _rgb(image: np.ndarray) -> np.ndarray:
        return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        dets = self._fa.face_detector.detect_from_image(self._rgb(image)[..., ::-1].copy()) or []
        boxes = [FaceBox(float(d[0]), float(d[1]), float(d[2]), float(d[3]), float(d[4])) for d in dets if d[4] > 0.5]
        return sorted(boxes, key=lambda b: b.size, reverse=True)

    def landmarks(self, image: np.ndarray, box: FaceBox) -> np.ndarray:
        out = self._fa.get_landmarks_from_image(self._rgb(image), detected_faces=[(box.x0, box.y0, box.x1, box.y1, box.score)])
        if not out:
            raise RuntimeError("face-alignment returned no landmarks")
        return np.asarray(out[0], np.float32)[:, :2]


_per_thread = threading.local()


def get_landmarker(name: str = "dlib") -> FaceLandmarker:
    """One instance per thread: dlib's detector and predictor are not safe to share between threads,
    and loading the predictor costs ~1 s, so each worker thread keeps its own."""
    cache = _per_thread.__dict__.setdefault("landmarkers", {})
    if name not in cache:
        if name == "dlib":
            cache[name] = DlibLandmarker()
        elif name == "fan":
            cache[name] = FanLandmarker()
        else:
            raise ValueError(f"unknown landmarker {name!r} (choose 'dlib' or 'fan')")
    return cache[name]
