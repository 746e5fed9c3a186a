"""LivePortrait's crop convention, as geometry over 68-point landmarks, plus temporal smoothing.

Facts from LivePortrait's crop code (CropConfig and parse_rect_from_landmark): the two anchor points are the
eye centre (mean of the eye-corner midpoints) and the lip centre (mean of the mouth corners); the box is the
landmarks' extent in the frame rotated so eye->lip points down, made square, scaled by `scale`, moved by
vx/vy_ratio times its size along the rotated axes, and mapped to dsize with a similarity transform (rotation
optional). Defaults: dsize 512, scale 2.3, vx 0, vy -0.125, rotation on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

# iBUG 68-point indices: eye corners and mouth corners.
_LEFT_EYE = (36, 39)
_RIGHT_EYE = (42, 45)
_MOUTH = (48, 54)
_EYE_CORNERS = np.array(_LEFT_EYE + _RIGHT_EYE)
_MOUTH_CORNERS = np.array(_MOUTH)


@dataclass(frozen=True)
class CropParams:
    dsize: int = 512
    scale: float = 2.3
    vx_ratio: float = 0.0
    vy_ratio: float = -0.125
    rotate: bool = True


def anchor_points(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eye centre and lip centre of [68, 2] landmarks."""
    eyes = pts[_EYE_CORNERS].mean(0)  # the mean of the two eye-corner midpoints
    lip = pts[_MOUTH_CORNERS].mean(0)
    return eyes, lip


def rect_from_landmarks(pts: np.ndarray, p: CropParams) -> np.ndarray:
    """[cx, cy, size, angle_rad] of the crop square for one frame's landmarks (source pixels)."""
    pts = pts.astype(np.float64)
    eyes, lip = anchor_points(pts)
    uy = lip - eyes
    norm = float(np.hypot(uy[0], uy[1]))
    uy = np.array([0.0, 1.0]) if norm <= 1e-3 else uy / norm
    ux = np.array([uy[1], -uy[0]])
    angle = math.acos(min(1.0, max(-1.0, float(ux[0]))))
    if ux[1] < 0:
        angle = -angle
    rot = np.stack([ux, uy])
    center0 = pts.mean(0)
    rpts = (pts - center0) @ rot.T
    lt, rb = rpts.min(0), rpts.max(0)
    center1 = (lt + rb) / 2
    size = float((rb - lt).max()) * p.scale
    center = center0 + ux * center1[0] + uy * center1[1]
    center = center + ux * (p.vx_ratio * size) + uy * (p.vy_ratio * size)
    return np.array([center[0], center[1], size, angle if p.rotate else 0.0])


def smooth_rects(rects: np.ndarray, sigma_frames: float) -> np.ndarray:
    """Zero-phase Gaussian smoothing of [T, 4] rects (the crop is offline, so looking ahead is allowed).

    Angles are unwrapped first so a wrap at ±pi does not smear. sigma 0 returns the input. The whole-sequence
    form of StreamingRectSmoother, which the crop uses frame by frame.
    """
    if sigma_frames <= 0 or len(rects) < 2:
        return rects.copy()
    stream = StreamingRectSmoother(sigma_frames)
    for rect in rects:
        stream.push(rect)
    return np.stack([stream.smoothed(i, len(rects)) for i in range(len(rects))])


class StreamingRectSmoother:
    """Gaussian smoothing of crop rects one frame at a time, for a crop that warps frames while later ones are
    still tracked.

    The same Gaussian as scipy's gaussian_filter1d (radius = int(4 sigma + 0.5), edges repeat the end
    value; the tests check equality with it), so frame i needs the raw rects up to i + radius, or the
    sequence's end. Rects arrive in order;
    frames before the first face (None) take the first face's rect, as the offline path fills them.
    """

    def __init__(self, sigma_frames: float):
        self.radius = int(4.0 * sigma_frames + 0.5) if sigma_frames > 0 else 0
        x = np.arange(-self.radius, self.radius + 1, dtype=np.float64)
        w = np.exp(-0.5 * (x / sigma_frames) ** 2) if sigma_frames > 0 else np.ones(1)
        self.weights = w / w.sum()
        self.raw: list[Optional[np.ndarray]] = []  # angle unwrapped against the previous rect
        self.first: Optional[np.ndarray] = None
        self._last: Optional[np.ndarray] = None

    def push(self, rect: Optional[np.ndarray]) -> None:
        if rect is not None:
            rect = np.asarray(rect, np.float64).copy()
            if self._last is not None:
                rect[3] += 2 * np.pi * np.round((self._last[3] - rect[3]) / (2 * np.pi))
            self._last = rect
            if self.first is None:
                self.first = rect
        self.raw.append(rect)

    def ready(self, i: int, end: Optional[int] = None) -> bool:
        """Whether frame i can be smoothed now (`end`: the sequence length, once known)."""
        need = i + self.radius if end is None else min(i + self.radius, end - 1)
        return self.first is not None and len(self.raw) > need

    def smoothed(self, i: int, end: Optional[int] = None) -> np.ndarray:
        """[cx, cy, size, angle] of frame i; `end` clips the look-ahead (edges repeat the last frame)."""
        if not self.ready(i, end):
            raise ValueError(f"frame {i} needs rects up to {i + self.radius} (have {len(self.raw)})")
        last = (end if end is not None else len(self.raw)) - 1
        idx = np.clip(np.arange(i - self.radius, i + self.radius + 1), 0, last)
        window = np.stack([self.raw[j] if self.raw[j] is not None else self.first for j in idx])
        return self.weights @ window


def crop_matrix(rect: np.ndarray, dsize: int) -> np.ndarray:
    """2x3 similarity mapping source pixels into the dsize x dsize crop (for cv2.warpAffine)."""
    cx, cy, size, angle = rect
    s = dsize / size
    c, si = np.cos(angle), np.sin(angle)
    t = dsize / 2
    return np.array(
        [
            [s * c, s * si, t - s * (c * cx + si * cy)],
            [-s * si, s * c, t - s * (-si * cx + c * cy)],
        ],
        np.float64,
    )


def transform_points(pts: np.ndarray, m: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]
