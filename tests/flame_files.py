"""Test helper: FLAME tracker files fitted to a real clip's motion (its crop's 68-point landmark track).

No FLAME tracker runs here (DECA / EMOCA / SMIRK need weights we do not have), so the files the FLAME struct source
reads are fitted, not random: the head pose is the landmark PnP rotation (the pose check's own independent estimate),
the jaw opens with the inner-lip gap, the expression coefficients are the clip's own principal components of its
pose-normalised landmarks, translation follows the face centre and size, and shape is the clip's mean face proportions.
Written in the tracker convention (OpenGL camera frame), as a real tracker's file would be.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tasks.steps.pose_check import _GL_TO_CV, pnp_head_matrices


def fitted_flame_params(landmarks: np.ndarray, n_exp: int = 10) -> dict[str, np.ndarray]:
    """landmarks [T, 68, 2] crop pixels -> FLAME-style arrays (global_pose, jaw_pose, expression, translation, shape)."""
    lm = np.asarray(landmarks, np.float64)
    T = len(lm)
    M = pnp_head_matrices(lm)  # OpenCV frame, NaN where PnP failed
    global_pose = np.full((T, 3), np.nan)
    for i, m in enumerate(M):
        if np.isfinite(m).all():
            global_pose[i] = cv2.Rodrigues(_GL_TO_CV @ m @ _GL_TO_CV)[0].ravel()  # the tracker's OpenGL frame
    eye_span = np.linalg.norm(lm[:, 45] - lm[:, 36], axis=-1)  # outer eye corners
    face_height = np.linalg.norm(lm[:, 8] - lm[:, 27], axis=-1)  # chin to nose bridge
    lip_gap = np.linalg.norm(lm[:, 66] - lm[:, 62], axis=-1)  # inner lips
    jaw = np.zeros((T, 3))
    jaw[:, 0] = np.arctan2(lip_gap, face_height)  # opening about the jaw's x axis
    centre = lm.mean(axis=1)
    normalised = (lm - centre[:, None]) / eye_span[:, None, None]
    flat = normalised.reshape(T, -1)
    mean = flat.mean(axis=0)
    _, _, vt = np.linalg.svd(flat - mean, full_matrices=False)
    coeffs = (flat - mean) @ vt[:n_exp].T
    expression = coeffs / (coeffs.std(axis=0) + 1e-8)
    translation = np.stack([(centre[:, 0] - 256) / 512, -(centre[:, 1] - 256) / 512, 90.0 / eye_span], axis=-1)
    shape = mean[: 2 * 10]  # the clip's mean face proportions (identity: one per clip)
    return {"global_pose": global_pose, "jaw_pose": jaw, "expression": expression, "translation": translation,
            "shape": shape, "frame": np.array("opengl")}


def write_flame_files(crop_root: Path, clip_ids: list[str], out_dir: Path) -> dict[str, Path]:
    """<out_dir>/<clip_id>.npz for each clip whose crop (crop_root/<clip_id>/landmarks.npy) exists."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for clip_id in clip_ids:
        landmarks = np.load(Path(crop_root) / clip_id / "landmarks.npy")
        path = out_dir / f"{clip_id}.npz"
        np.savez(path, **fitted_flame_params(landmarks))
        files[clip_id] = path
    return files
