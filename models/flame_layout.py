"""Per-frame FLAME parameters as one flat struct vector: the 3D-latent gate's fallback representation.

When LivePortrait's motion disagrees with an independent head pose on too many frames (the 3D-latent quality gate,
tasks/steps/pose_check.py), the struct stream can learn FLAME parameters from a face tracker instead (DECA / EMOCA /
SMIRK style output, one npz per clip; the format is tasks/steps/pose_check.py's, plus optional `translation` [T, 3] and
`shape` [S] or [T, S]). Layout of `struct[t]` (float32), for E expression coefficients (the tracker's count):

    slice            n   what                                         units
    [0:E]            E   expression coefficients                      as the tracker fits them (~N(0, 1))
    [E:E+3]          3   jaw pose, axis-angle                         radians, FLAME's model frame (a local joint)
    [E+3:E+6]        3   neck pose, axis-angle                        radians, model frame (zeros when absent)
    [E+6:E+9]        3   global (head) pose, axis-angle               radians, OpenCV camera frame
    [E+9:E+12]       3   translation                                  the tracker's units, OpenCV frame (zeros if absent)

The identity (FLAME shape) is constant over a clip: it is not repeated per frame but kept once per clip
(`FlameStruct.shape`, into the sample's meta.json). The camera-frame quantities (global pose, translation) are taken
to the OpenCV frame (x right, y down, z away from the camera) like every other pose in this project: an
OpenGL-frame rotation R becomes D R D with D = diag(1, -1, -1), a proper rotation, so its axis-angle v becomes D v,
and a translation t becomes D t. Jaw and neck are rotations of joints relative to their parent in FLAME's own
model frame, the same for every tracker: they are kept as given.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

POSE_BLOCKS = ("jaw_pose", "neck_pose", "global_pose", "translation")  # 3 values each, in this order
_GL_TO_CV = np.array([1.0, -1.0, -1.0])


@dataclass(frozen=True)
class FlameLayout:
    n_exp: int

    @property
    def dim(self) -> int:
        return self.n_exp + 3 * len(POSE_BLOCKS)

    @property
    def expression(self) -> slice:
        return slice(0, self.n_exp)

    def block(self, name: str) -> slice:
        start = self.n_exp + 3 * POSE_BLOCKS.index(name)
        return slice(start, start + 3)


@dataclass
class FlameStruct:
    struct: np.ndarray  # [T, layout.dim] float32 (rows of invalid frames are zeros)
    valid: np.ndarray  # [T] bool: every parameter of the frame is finite
    shape: Optional[np.ndarray]  # [S] float32 identity, once per clip
    layout: FlameLayout


def flame_struct(params: Mapping[str, np.ndarray], frame: str = "opengl", n_exp: Optional[int] = None) -> FlameStruct:
    """A tracker's per-clip FLAME arrays -> struct rows (layout above). `n_exp` pads or cuts the expression
    coefficients to a fixed count, so clips from trackers fitting different counts share one width."""
    if "global_pose" not in params:
        raise ValueError(f"FLAME parameters need 'global_pose' [T, 3]; have {sorted(params)}")
    global_pose = np.asarray(params["global_pose"], np.float64)
    if global_pose.ndim != 2 or global_pose.shape[1] != 3:
        raise ValueError(f"global_pose must be [T, 3] axis-angle, got {global_pose.shape}")
    T = len(global_pose)
    expression = np.asarray(params.get("expression", np.zeros((T, 0))), np.float64)
    if expression.ndim != 2 or len(expression) != T:
        raise ValueError(f"expression must be [T={T}, E], got {expression.shape}")
    layout = FlameLayout(expression.shape[1] if n_exp is None else n_exp)
    out = np.zeros((T, layout.dim), np.float64)
    k = min(layout.n_exp, expression.shape[1])
    out[:, :k] = expression[:, :k]
    if frame not in ("opengl", "opencv"):
        raise ValueError(f"frame must be 'opengl' or 'opencv', got {frame!r}")
    flip = _GL_TO_CV if frame == "opengl" else np.ones(3)
    for name in POSE_BLOCKS:
        if name not in params:
            continue  # neck pose and translation are optional; jaw too (a head-only tracker)
        values = np.asarray(params[name], np.float64)
        if values.shape != (T, 3):
            raise ValueError(f"{name} must be [T={T}, 3], got {values.shape}")
        camera_frame = name in ("global_pose", "translation")
        out[:, layout.block(name)] = values * (flip if camera_frame else 1.0)
    valid = np.isfinite(out).all(axis=1)
    out[~valid] = 0.0
    shape = params.get("shape")
    if shape is not None:
        shape = np.asarray(shape, np.float64)
        shape = np.nanmean(shape, axis=0) if shape.ndim == 2 else shape.reshape(-1)
        shape = shape.astype(np.float32)
    return FlameStruct(out.astype(np.float32), valid, shape, layout)
