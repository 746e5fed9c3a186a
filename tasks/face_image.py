"""One face image -> the crop a training clip's frames have: the reference for generation.

A model trained on our shards saw references cut by the crop step, so a user's face photo must be cut the same
way: the crop step's landmarker (dlib 68 points on intensity, at most `detect_max_side` pixels), then the crop
step's box for those landmarks -- in the default static mode the box of a one-frame segment
(`crop_segments.plan_segments`: LivePortrait's driving-video convention, scale 2.2, vy -0.1, no rotation), in
follow mode the per-frame rotated box (`crop_geometry.rect_from_landmarks`, LivePortrait's source convention) --
warped to `dsize` with black outside the image, as the crop step pads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from tasks.crop_geometry import crop_matrix, rect_from_landmarks, transform_points
from tasks.crop_segments import plan_segments
from tasks.errors import ClipRejected
from tasks.face_landmarks import get_landmarker
from tasks.steps.crop import CropConfig


@dataclass
class FaceImageCrop:
    crop: np.ndarray  # uint8 [dsize, dsize, 3] RGB
    rect: np.ndarray  # [cx, cy, size, angle] in image pixels
    landmarks: np.ndarray  # [68, 2] in crop pixels
    faces: int  # faces found in the image (the largest is used)


def read_image(path: str | Path) -> np.ndarray:
    """uint8 RGB [H, W, 3] of an image file (anything OpenCV reads); a clear error for an unreadable one."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise ClipRejected("unreadable_image", f"{path}: not an image OpenCV can read")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def crop_face_image(image: np.ndarray, cfg: CropConfig = CropConfig()) -> FaceImageCrop:
    """The largest face of an RGB image, cropped as the crop step crops a clip (module docstring)."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 RGB [H, W, 3], got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    scale = min(1.0, cfg.detect_max_side / max(h, w))
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if scale < 1.0:
        gray = cv2.resize(gray, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
    landmarker = get_landmarker(cfg.landmarker)
    boxes = landmarker.detect(gray)
    if not boxes:
        raise ClipRejected("no_face", f"no face found in the {w}x{h} image")
    pts = landmarker.landmarks(gray, boxes[0]).astype(np.float64) / scale  # [68, 2] image pixels
    if cfg.mode == "static":
        rect = plan_segments(pts[None], np.zeros(1), cfg.segments)[0].rect()
    else:
        rect = rect_from_landmarks(pts, cfg.params)
    crop, m = warp_face(image, rect, cfg.params.dsize)
    return FaceImageCrop(crop, rect, transform_points(pts, m).astype(np.float32), len(boxes))


def warp_face(image: np.ndarray, rect: np.ndarray, dsize: int) -> tuple[np.ndarray, np.ndarray]:
    """The [dsize, dsize, 3] crop of `rect` ([cx, cy, size, angle]) and its 2x3 matrix; black outside the image."""
    m = crop_matrix(rect, dsize)
    crop = cv2.warpAffine(image, m, (dsize, dsize), flags=cv2.INTER_AREA if rect[2] > dsize else cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
    return crop, m
