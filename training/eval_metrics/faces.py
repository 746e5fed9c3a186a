"""Per-frame face observations (dlib HOG box, 68 landmarks, dlib's raw shape), made once per clip and shared by
the identity and landmark metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import cv2
import numpy as np

from tasks.face_landmarks import DlibLandmarker, FaceBox, get_landmarker


@dataclass(frozen=True)
class FaceObservation:
    box: FaceBox  # the largest face
    landmarks: np.ndarray  # [68, 2] float32, image pixels (iBUG 300-W order)
    shape: Any  # dlib.full_object_detection of the same points: the alignment dlib's face recognition takes


def observe_face(image_rgb: np.ndarray) -> Optional[FaceObservation]:
    """The largest face of a uint8 RGB frame [H, W, 3], or None when dlib's HOG detector finds none."""
    landmarker: DlibLandmarker = get_landmarker("dlib")  # dlib's: its shapes are what its face recognition takes
    gray = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2GRAY)  # dlib works on intensity anyway
    boxes = landmarker.detect(gray)
    if not boxes:
        return None
    shape = landmarker.shape(gray, boxes[0])
    points = np.array([[p.x, p.y] for p in shape.parts()], np.float32)
    return FaceObservation(boxes[0], points, shape)


def observe_faces(frames: np.ndarray) -> list[Optional[FaceObservation]]:
    """One observation (or None) per frame of uint8 RGB frames [T, H, W, 3]."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 RGB [T, H, W, 3], got {frames.dtype} {frames.shape}")
    return [observe_face(f) for f in frames]
