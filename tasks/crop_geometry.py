"""LivePortrait's crop convention, as geometry over 68-point landmarks, plus temporal smoothing.

Facts from LivePortrait's crop code (CropConfig and parse_rect_from_landmark): the two anchor points are the
eye centre (mean of the eye-corner midpoints) and the lip centre (mean of the mouth corners); the box is the
landmarks' extent in the frame rotated so eye->lip points down, made square, scaled by `scale`, moved by
vx/vy_ratio times its size along the rotated axes, and mapped to dsize with a similarity transform (rotation
optional). Defaults: dsize 512, scale 2.3, vx 0, vy -0.125, rotation on.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d

# iBUG 68-point indices: eye corners and mouth corners.
_LEFT_EYE = (36, 39)
_RIGHT_EYE = (42, 45)
_MOUTH = (48, 54)


@dataclass(frozen=True)
class CropParams:
    dsize: int = 512
    scale: float = 2.3
    vx_ratio: float = 0.0
    vy_ratio: float = -0.125
    rotate: bool = True


def anchor_points(pts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eye centre and lip centre of [68, 2] landmarks."""
    eyes = (pts[list(_LEFT_EYE)].mean(0) + pts[list(_RIGHT_EYE)].mean(0)) / 2
    lip = pts[list(_MOUTH)].mean(0)
    return eyes, lip


def rect_from_landmarks(pts: np.ndarray, p: CropParams) -> np.ndarray:
    """[cx, cy, size, angle_rad] of the crop square for one frame's landmarks (source pixels)."""
    pts = pts.astype(np.float64)
    eyes, lip = anchor_points(pts)
    uy = lip - eyes
    norm = np.linalg.norm(uy)
    uy = np.array([0.0, 1.0]) if norm <= 1e-3 else uy / norm
    ux = np.array([uy[1], -uy[0]])
    angle = np.arccos(np.clip(ux[0], -1.0, 1.0))
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

    Angles are unwrapped first so a wrap at ±pi does not smear. sigma 0 returns the input.
    """
    if sigma_frames <= 0 or len(rects) < 2:
        return rects.copy()
    out = rects.copy()
    out[:, 3] = np.unwrap(rects[:, 3])
    out = gaussian_filter1d(out, sigma=sigma_frames, axis=0, mode="nearest")
    return out


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
