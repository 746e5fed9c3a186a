"""Per-frame LivePortrait motion as one flat vector (tasks/contract.py STRUCT_DIM = 133), and back.

Layout of `struct[t]` (float32):

    slice      n   what                                   units
    [0:63]     63  exp: expression deformation, 21 x 3     LivePortrait's normalised keypoint space (row-major k, xyz)
    [63:66]     3  pitch, yaw, roll                        degrees / 128 (POSE_SCALE)
    [66:67]     1  scale                                   as predicted (~1.0-1.4 on real faces)
    [67:70]     3  t: translation x, y, z                  keypoint space (LivePortrait applies only x, y)
    [70:133]   63  kp: canonical keypoints, 21 x 3         keypoint space (row-major k, xyz)

Why angles as degrees/128: LivePortrait predicts each angle as an expectation over 3-degree bins, so the values
lie in [-97.5, 97.5] and never wrap; Euler angles are the model's own parameters (no lossy conversion), and
dividing by 128 (a power of two) brings them to ~[-0.76, 0.76], the same order as exp/kp/t, while the round
trip struct -> degrees is exact in float32. The struct stream's loader may still standardise per dimension.
The rotation convention is LivePortrait's: R = (Rz(roll) Ry(yaw) Rx(pitch))^T, driven kp = scale (kp R + exp) + t.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

NUM_KP = 21
STRUCT_DIM = 133  # the flat vector's width (tasks/contract.py checks shard members against it)
POSE_SCALE = 1.0 / 128.0

EXP = slice(0, 63)
POSE = slice(63, 66)  # pitch, yaw, roll
SCALE = slice(66, 67)
TRANS = slice(67, 70)
KP = slice(70, 133)
assert KP.stop == STRUCT_DIM, "layout must fill STRUCT_DIM"

MOTION_FIELDS = ("kp", "exp", "pitch", "yaw", "roll", "scale", "t")


@dataclass
class MotionLatents:
    """LivePortrait motion for T frames (float32 in memory, float16 on disk)."""

    kp: np.ndarray  # [T, 21, 3] canonical keypoints
    exp: np.ndarray  # [T, 21, 3]
    pitch: np.ndarray  # [T] degrees
    yaw: np.ndarray  # [T] degrees
    roll: np.ndarray  # [T] degrees
    scale: np.ndarray  # [T, 1]
    t: np.ndarray  # [T, 3]
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. {"untrained_dryrun": True, "weights": ...}

    def __post_init__(self):
        T = len(self.pitch)
        want = {"kp": (T, NUM_KP, 3), "exp": (T, NUM_KP, 3), "pitch": (T,), "yaw": (T,), "roll": (T,),
                "scale": (T, 1), "t": (T, 3)}
        for name, shape in want.items():
            arr = np.asarray(getattr(self, name))
            if arr.shape != shape:
                raise ValueError(f"MotionLatents.{name}: shape {arr.shape}, expected {shape}")

    @property
    def num_frames(self) -> int:
        return len(self.pitch)

    def rotation(self) -> np.ndarray:
        """[T, 3, 3] in LivePortrait's convention."""
        return rotation_from_angles(self.pitch, self.yaw, self.roll)


def to_struct(motion: MotionLatents) -> np.ndarray:
    """MotionLatents -> [T, 133] float32 (layout in the module docstring)."""
    T = motion.num_frames
    out = np.empty((T, STRUCT_DIM), np.float32)
    out[:, EXP] = np.asarray(motion.exp, np.float32).reshape(T, -1)
    out[:, POSE] = np.stack([motion.pitch, motion.yaw, motion.roll], -1).astype(np.float32) * np.float32(POSE_SCALE)
    out[:, SCALE] = np.asarray(motion.scale, np.float32)
    out[:, TRANS] = np.asarray(motion.t, np.float32)
    out[:, KP] = np.asarray(motion.kp, np.float32).reshape(T, -1)
    return out


def from_struct(vec: np.ndarray, meta: dict | None = None) -> MotionLatents:
    """[T, 133] -> MotionLatents; exact inverse of to_struct for float32 input."""
    vec = np.asarray(vec, np.float32)
    if vec.ndim != 2 or vec.shape[1] != STRUCT_DIM:
        raise ValueError(f"struct must be [T, {STRUCT_DIM}], got {vec.shape}")
    T = vec.shape[0]
    pose = vec[:, POSE] / np.float32(POSE_SCALE)
    return MotionLatents(
        kp=vec[:, KP].reshape(T, NUM_KP, 3).copy(),
        exp=vec[:, EXP].reshape(T, NUM_KP, 3).copy(),
        pitch=pose[:, 0].copy(),
        yaw=pose[:, 1].copy(),
        roll=pose[:, 2].copy(),
        scale=vec[:, SCALE].copy(),
        t=vec[:, TRANS].copy(),
        meta=dict(meta or {}),
    )


def rotation_from_angles(pitch, yaw, roll) -> np.ndarray:
    """Degrees [T] -> R [T, 3, 3] = (Rz(roll) Ry(yaw) Rx(pitch))^T (float64)."""
    x, y, z = (np.deg2rad(np.asarray(a, np.float64).reshape(-1)) for a in (pitch, yaw, roll))
    cx, sx, cy, sy, cz, sz = np.cos(x), np.sin(x), np.cos(y), np.sin(y), np.cos(z), np.sin(z)
    o, i = np.zeros_like(x), np.ones_like(x)
    rx = np.stack([i, o, o, o, cx, -sx, o, sx, cx], -1).reshape(-1, 3, 3)
    ry = np.stack([cy, o, sy, o, i, o, -sy, o, cy], -1).reshape(-1, 3, 3)
    rz = np.stack([cz, -sz, o, sz, cz, o, o, o, i], -1).reshape(-1, 3, 3)
    return np.transpose(rz @ ry @ rx, (0, 2, 1))


def angles_from_rotation(R: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of rotation_from_angles: R [T, 3, 3] -> (pitch, yaw, roll) degrees, yaw in [-90, 90].

    With M = R^T = Rz Ry Rx: M[2,0] = -sin(yaw), M[2,1:] = cos(yaw) (sin, cos)(pitch), M[:2,0] = cos(yaw) (cos, sin)(roll).
    """
    R = np.asarray(R, np.float64).reshape(-1, 3, 3)
    M = np.transpose(R, (0, 2, 1))
    yaw = np.arcsin(np.clip(-M[:, 2, 0], -1.0, 1.0))
    pitch = np.arctan2(M[:, 2, 1], M[:, 2, 2])
    roll = np.arctan2(M[:, 1, 0], M[:, 0, 0])
    return np.rad2deg(pitch), np.rad2deg(yaw), np.rad2deg(roll)


def save_motion(path: str | Path, motion: MotionLatents) -> Path:
    """Write float16 arrays to an .npz (no pickle; meta as a JSON string array), via temp file + rename."""
    import json
    import os

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.npz")
    arrays = {name: np.asarray(getattr(motion, name), np.float16) for name in MOTION_FIELDS}
    arrays["meta_json"] = np.array(json.dumps(motion.meta, sort_keys=True))
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
    return path


def load_motion(path: str | Path) -> MotionLatents:
    import json

    with np.load(path, allow_pickle=False) as z:
        missing = [n for n in MOTION_FIELDS if n not in z.files]
        if missing:
            raise ValueError(f"{path}: not a motion file, missing {missing}")
        fields = {n: z[n].astype(np.float32) for n in MOTION_FIELDS}
        meta = json.loads(str(z["meta_json"])) if "meta_json" in z.files else {}
    return MotionLatents(**fields, meta=meta)
