"""Step 4: cross-check LivePortrait's head pose against an independent per-frame estimate; keep mask + gate.

Independent pose, in order of preference:
 (a) FLAME parameters from a face tracker (DECA / EMOCA / SMIRK style), one npz per clip (`load_flame_npz`):
       global_pose  [T, 3] float  axis-angle (radians) of FLAME's root (head) rotation        (required)
       neck_pose    [T, 3] float  axis-angle of the neck joint; head = global @ neck         (optional)
       jaw_pose     [T, 3] float  axis-angle of the jaw (not used for head pose)             (optional)
       expression   [T, k] float  expression coefficients (not used for head pose)           (optional)
       frame        str           "opengl" (FLAME/DECA default: x right, y up, z to camera) or "opencv"
 (b) otherwise the 68 dlib landmarks and cv2.solvePnP against GENERIC_FACE_68 (below) with a pinhole camera
     whose focal length is the crop width and whose principal point is the crop centre.

Conventions. LivePortrait's keypoints live in grid_sample coordinates (x right, y down); we take z into the
image, which makes its frame the OpenCV camera frame. Its angles parametrise the rotation applied to
column vectors, M = Rz(roll) Ry(yaw) Rx(pitch) (= R^T of models/struct_layout.py). Both independent sources
are turned into such an M in the OpenCV frame and decomposed the same way. Sign conventions of LivePortrait's
z axis could not be checked against video here (the sample motion templates have no source video): if a
real-data run shows anti-correlated pitch or yaw, set `PoseCheckConfig.axis_signs`.

Comparison. Per frame, the geodesic angle between LivePortrait's and the independent rotation. With
`center=True` (default) the clip's mean offset rotation is removed first: a generic face shape, a guessed
focal length and tracker biases give per-clip constant offsets that say nothing about frame-level agreement.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import cv2
import numpy as np

from datasets_manifest.schema import ClipRow
from models.struct_layout import MotionLatents, angles_from_rotation, rotation_from_angles
from tasks.errors import ClipRejected
from tasks.gate_verdict import GateVerdict
from tasks.step_store import fingerprint, save_npy
from tasks.steps.crop import CROP_LANDMARKS, CropStep
from tasks.steps.motion import MOTION_FILE, MotionStep

# Generic 68-point 3D face (iBUG 300-W order), millimetres, OpenCV model frame (x right, y down, z away from
# the camera, so features nearer the camera have negative z); origin between the outer eye corners.
# Derivation (our own, approximate): x, y are dlib's 68 landmarks on a near-frontal frame of LivePortrait's
# driving video d12.mp4 (MIT), mirrored and averaged left/right to be exactly symmetric, scaled so the outer
# eye corners (36, 45) are 90 mm apart (a typical adult biocular width). z are hand-assigned depths from rough
# adult facial anthropometry (nose tip ~38 mm, lips ~20-24 mm, chin ~15 mm in front of the outer eye corners;
# face contour receding to ~55 mm behind them at ear level). It is not a fitted morphable-model mean; PnP
# against it gives head pose to a few degrees, and `center=True` removes its constant bias.
_XY = [
    (-73.5, -2.8), (-72.4, 17.6), (-69.3, 37.6), (-64.3, 56.6), (-56.6, 74.5), (-45.4, 91.4), (-32.0, 106.2),
    (-17.6, 117.8), (0.0, 121.6), (17.6, 117.8), (32.0, 106.2), (45.4, 91.4), (56.6, 74.5), (64.3, 56.6),
    (69.3, 37.6), (72.4, 17.6), (73.5, -2.8),  # 0-16 contour
    (-60.5, -13.7), (-51.3, -22.5), (-38.3, -24.3), (-25.0, -21.8), (-13.4, -16.9),  # 17-21 right brow
    (13.4, -16.9), (25.0, -21.8), (38.3, -24.3), (51.3, -22.5), (60.5, -13.7),  # 22-26 left brow
    (0.0, 0.0), (0.0, 13.4), (0.0, 26.7), (0.0, 40.8),  # 27-30 nose bridge
    (-16.9, 47.8), (-8.4, 50.3), (0.0, 52.7), (8.4, 50.3), (16.9, 47.8),  # 31-35 nostrils
    (-45.0, 0.0), (-36.9, -3.9), (-27.1, -3.9), (-17.9, 2.8), (-27.4, 3.5), (-37.3, 2.8),  # 36-41 right eye
    (17.9, 2.8), (27.1, -3.9), (36.9, -3.9), (45.0, 0.0), (37.3, 2.8), (27.4, 3.5),  # 42-47 left eye
    (-32.7, 66.8), (-21.1, 64.0), (-8.8, 62.9), (0.0, 64.7), (8.8, 62.9), (21.1, 64.0), (32.7, 66.8),  # 48-54
    (21.8, 83.0), (9.5, 90.4), (0.0, 91.4), (-9.5, 90.4), (-21.8, 83.0),  # 55-59 lower outer lip
    (-28.5, 67.9), (-8.8, 66.4), (0.0, 68.2), (8.8, 66.4), (28.5, 67.9),  # 60-64 upper inner lip
    (8.8, 80.9), (0.0, 82.3), (-8.8, 80.9),  # 65-67 lower inner lip
]
_FORWARD_MM = [  # distance in front of the outer-eye-corner plane
    -55, -45, -35, -25, -15, -5, 5, 12, 15, 12, 5, -5, -15, -25, -35, -45, -55,
    -2, 6, 11, 14, 15, 15, 14, 11, 6, -2,
    12, 18, 26, 38,
    18, 22, 24, 22, 18,
    0, 6, 6, 4, 5, 5, 4, 6, 6, 0, 5, 5,
    8, 18, 22, 24, 22, 18, 8,
    17, 20, 21, 20, 17,
    9, 19, 20, 19, 9,
    18, 19, 18,
]
GENERIC_FACE_68 = np.array([(x, y, -f) for (x, y), f in zip(_XY, _FORWARD_MM)], np.float64)  # [68, 3]
INNER_POINTS = np.arange(17, 68)  # brows, nose, eyes, mouth: anatomical points (the contour slides with pose)

# OpenGL-style frame (y up, z to the camera) <-> OpenCV frame (y down, z away): conjugate by diag(1, -1, -1).
_GL_TO_CV = np.diag([1.0, -1.0, -1.0])


@dataclass(frozen=True)
class PoseCheckConfig:
    threshold_deg: float = 10.0  # frames whose rotation differs by more are dropped
    min_keep_ratio: float = 0.5  # a clip keeping fewer frames than this is rejected (pose_disagreement)
    center: bool = True  # remove the clip's mean offset rotation before comparing
    use_contour: bool = False  # include jaw contour points 0-16 in PnP
    focal_scale: float = 1.0  # focal length = focal_scale * crop width (pixels)
    axis_signs: tuple[float, float, float] = (1.0, 1.0, 1.0)  # applied to the independent pitch, yaw, roll


@dataclass
class PoseCheckResult:
    source: str  # "flame" | "landmarks_pnp"
    diff_deg: np.ndarray  # [T] geodesic angle (deg) after centring; NaN where no independent pose
    axis_diff_deg: np.ndarray  # [T, 3] pitch/yaw/roll differences (deg) after centring
    independent_deg: np.ndarray  # [T, 3] independent pitch/yaw/roll in LivePortrait's convention
    keep: np.ndarray  # [T] bool
    offset_deg: float  # angle of the removed mean offset rotation (0 when center=False)
    meta: dict = field(default_factory=dict)
    # [T, 3] the independent pitch/yaw/roll after removing the mean offset: what LivePortrait's angles are compared
    # with, and the head-pose alignment loss's target (shard member head_pose.npy); NaN where no independent pose
    aligned_deg: Optional[np.ndarray] = None

    @property
    def total(self) -> int:
        return int(self.keep.size)

    @property
    def dropped(self) -> int:
        return int(self.total - self.keep.sum())

    @property
    def drop_ratio(self) -> float:
        return self.dropped / self.total if self.total else 1.0


def matrices_from_angles(pitch, yaw, roll) -> np.ndarray:
    """Degrees -> M = Rz(roll) Ry(yaw) Rx(pitch) [T, 3, 3] (column-vector form of LivePortrait's rotation)."""
    return np.transpose(rotation_from_angles(pitch, yaw, roll), (0, 2, 1))


def angles_from_matrices(M: np.ndarray) -> np.ndarray:
    """M [T, 3, 3] (column-vector form) -> [T, 3] pitch, yaw, roll degrees."""
    p, y, r = angles_from_rotation(np.transpose(M, (0, 2, 1)))
    return np.stack([p, y, r], -1)


def _axis_angle_to_matrix(aa: np.ndarray) -> np.ndarray:
    return np.stack([cv2.Rodrigues(np.asarray(v, np.float64).reshape(3, 1))[0] for v in aa])


def flame_head_matrices(global_pose: np.ndarray, neck_pose: Optional[np.ndarray] = None,
                        frame: str = "opengl") -> np.ndarray:
    """FLAME axis-angle head pose [T, 3] (+ neck) -> M [T, 3, 3] in the OpenCV camera frame."""
    g = np.asarray(global_pose, np.float64)
    if g.ndim != 2 or g.shape[1] != 3:
        raise ValueError(f"global_pose must be [T, 3] axis-angle, got {g.shape}")
    M = _axis_angle_to_matrix(g)
    if neck_pose is not None:
        n = np.asarray(neck_pose, np.float64)
        if n.shape != g.shape:
            raise ValueError(f"neck_pose shape {n.shape} differs from global_pose {g.shape}")
        M = M @ _axis_angle_to_matrix(n)
    if frame == "opengl":
        M = _GL_TO_CV @ M @ _GL_TO_CV
    elif frame != "opencv":
        raise ValueError(f"frame must be 'opengl' or 'opencv', got {frame!r}")
    return M


def load_flame_npz(path: str | Path) -> dict:
    """Read a per-clip FLAME npz (format in the module docstring) without pickle."""
    with np.load(path, allow_pickle=False) as z:
        if "global_pose" not in z.files:
            raise ValueError(f"{path}: FLAME npz needs 'global_pose' [T, 3], has {sorted(z.files)}")
        out = {k: z[k] for k in z.files}
    out["frame"] = str(out.get("frame", "opengl"))
    return out


def camera_matrix(width: int, height: int, focal_scale: float = 1.0) -> np.ndarray:
    f = focal_scale * width
    return np.array([[f, 0, width / 2.0], [0, f, height / 2.0], [0, 0, 1]], np.float64)


def pnp_head_matrices(landmarks: np.ndarray, image_size: tuple[int, int] = (512, 512),
                      cfg: PoseCheckConfig = PoseCheckConfig()) -> np.ndarray:
    """dlib 68 landmarks [T, 68, 2] (pixels) -> M [T, 3, 3] (NaN for frames with missing landmarks or PnP failure)."""
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be [T, 68, 2], got {lm.shape}")
    idx = np.arange(68) if cfg.use_contour else INNER_POINTS
    K = camera_matrix(image_size[0], image_size[1], cfg.focal_scale)
    obj = GENERIC_FACE_68[idx]
    out = np.full((len(lm), 3, 3), np.nan)
    for i, pts in enumerate(lm):
        img = pts[idx]
        if not np.isfinite(img).all():
            continue
        ok, rvec, tvec = cv2.solvePnP(obj, img, K, None, flags=cv2.SOLVEPNP_EPNP)
        if not ok:
            continue
        rvec, tvec = cv2.solvePnPRefineLM(obj, img, K, None, rvec, tvec)
        if tvec[2, 0] <= 0:  # face behind the camera: a degenerate solution
            continue
        out[i] = cv2.Rodrigues(rvec)[0]
    return out


def _geodesic_deg(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """Angle of A B^T per frame, degrees."""
    tr = np.einsum("tij,tij->t", A, B)  # trace(A B^T)
    return np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


def _mean_rotation(Ms: np.ndarray) -> np.ndarray:
    U, _, Vt = np.linalg.svd(Ms.mean(0))
    R = U @ Vt
    if np.linalg.det(R) < 0:
        U[:, -1] *= -1
        R = U @ Vt
    return R


def compare_pose(motion: MotionLatents, independent_M: np.ndarray, source: str,
                 cfg: PoseCheckConfig = PoseCheckConfig()) -> PoseCheckResult:
    """Per-frame agreement between LivePortrait's pose and an independent rotation M [T, 3, 3]."""
    T = motion.num_frames
    if len(independent_M) != T:
        raise ValueError(f"independent pose has {len(independent_M)} frames, motion has {T}")
    lp_M = matrices_from_angles(motion.pitch, motion.yaw, motion.roll)
    ind = np.full((T, 3), np.nan)
    valid = np.isfinite(independent_M).all(axis=(1, 2))
    if valid.any():
        ang = angles_from_matrices(independent_M[valid]) * np.asarray(cfg.axis_signs)
        ind[valid] = ang
    ind_M = np.full((T, 3, 3), np.nan)
    if valid.any():
        ind_M[valid] = matrices_from_angles(ind[valid, 0], ind[valid, 1], ind[valid, 2])
    offset = np.eye(3)
    if cfg.center and valid.any():
        offset = _mean_rotation(lp_M[valid] @ np.transpose(ind_M[valid], (0, 2, 1)))  # lp ~ offset @ ind
    diff = np.full(T, np.nan)
    axis = np.full((T, 3), np.nan)
    aligned_deg = np.full((T, 3), np.nan)
    if valid.any():
        aligned = offset @ ind_M[valid]
        diff[valid] = _geodesic_deg(lp_M[valid], aligned)
        aligned_deg[valid] = angles_from_matrices(aligned)
        axis[valid] = np.stack([motion.pitch, motion.yaw, motion.roll], -1)[valid] - aligned_deg[valid]
    keep = valid & (diff <= cfg.threshold_deg)
    offset_deg = float(_geodesic_deg(offset[None], np.eye(3)[None])[0])
    meta = {"threshold_deg": cfg.threshold_deg, "center": cfg.center, "frames_without_pose": int((~valid).sum())}
    return PoseCheckResult(source, diff, axis, ind, keep, offset_deg, meta, aligned_deg)


def check_clip_pose(
    motion: MotionLatents,
    landmarks: Optional[np.ndarray] = None,
    flame: Optional[dict] = None,
    image_size: tuple[int, int] = (512, 512),
    cfg: PoseCheckConfig = PoseCheckConfig(),
) -> PoseCheckResult:
    """FLAME when given, else landmarks + PnP; raises ValueError when neither is given."""
    if flame is not None:
        M = flame_head_matrices(flame["global_pose"], flame.get("neck_pose"), flame.get("frame", "opengl"))
        return compare_pose(motion, M, "flame", cfg)
    if landmarks is None:
        raise ValueError("pose check needs FLAME parameters or 68-point landmarks")
    return compare_pose(motion, pnp_head_matrices(landmarks, image_size, cfg), "landmarks_pnp", cfg)


def reject_if_disagreeing(result: PoseCheckResult, cfg: PoseCheckConfig = PoseCheckConfig()) -> np.ndarray:
    """The keep mask, or ClipRejected('pose_disagreement') when the clip keeps too few frames."""
    keep_ratio = 1.0 - result.drop_ratio
    if keep_ratio < cfg.min_keep_ratio:
        raise ClipRejected("pose_disagreement",
                           f"{result.dropped}/{result.total} frames differ by > {cfg.threshold_deg} deg "
                           f"({result.source}); keep ratio {keep_ratio:.2f} < {cfg.min_keep_ratio}")
    return result.keep


def latent_quality_gate(per_clip_drop: dict[str, tuple[int, int]], max_drop_ratio: float = 0.5) -> GateVerdict:
    """Dataset-level gate: no-go when more than max_drop_ratio of all frames were dropped by the pose check."""
    rows = []
    dropped = total = 0
    for clip_id, (d, t) in sorted(per_clip_drop.items()):
        if t < 0 or d < 0 or d > t:
            raise ValueError(f"clip {clip_id!r}: dropped={d}, total={t} is not a valid count")
        rows.append({"clip_id": clip_id, "dropped": int(d), "total": int(t), "drop_ratio": d / t if t else 0.0})
        dropped += d
        total += t
    if total == 0:
        return GateVerdict("3d_latent_quality", False, "no frames were checked", {"max_drop_ratio": max_drop_ratio},
                           "run the FLAME cross-check first", rows)
    ratio = dropped / total
    go = ratio <= max_drop_ratio
    summary = (f"{dropped}/{total} frames ({ratio:.1%}) dropped by the pose cross-check over {len(rows)} clips; "
               f"limit {max_drop_ratio:.0%}: {'GO' if go else 'NO-GO'}")
    return GateVerdict("3d_latent_quality", go, summary,
                       {"dropped_frames": dropped, "total_frames": total, "drop_ratio": ratio,
                        "max_drop_ratio": max_drop_ratio, "clips": len(rows)},
                       "" if go else "use the FLAME-only representation: re-run with --flame-dir holding a FLAME tracker's file "
                       "per clip (<clip_id>.npz); the struct step then switches to them", rows)


HEAD_POSE_FILE = "head_pose_deg.npy"  # [T, 3] the pose check's aligned independent pitch/yaw/roll (deg), NaN: none
KEEP_MASK_FILE = "keep_mask.npy"


@dataclass
class PoseCheckStep:
    """Step 4: an independent head pose (FLAME when supplied, else landmarks + PnP) against LivePortrait's."""

    config: PoseCheckConfig = field(default_factory=PoseCheckConfig)
    flame_dir: Optional[str] = None  # <flame_dir>/<clip_id>.npz per clip (load_flame_npz documents it)
    name: ClassVar[str] = "pose_check"
    version: ClassVar[str] = "2"  # 2: writes the aligned independent pose (head_pose_deg.npy) for the alignment loss
    requires: ClassVar[tuple[str, ...]] = (CropStep.name, MotionStep.name)

    def fingerprint(self) -> str:
        return fingerprint(self.config, self.flame_dir)

    def run(self, row: ClipRow, inputs: dict[str, Path], out_dir: Path) -> dict:
        import json

        from models.struct_layout import load_motion

        motion = load_motion(inputs[MotionStep.name] / MOTION_FILE)
        flame_file = Path(self.flame_dir) / f"{row.clip_id}.npz" if self.flame_dir else None
        flame = load_flame_npz(flame_file) if flame_file and flame_file.is_file() else None
        landmarks = np.load(inputs[CropStep.name] / CROP_LANDMARKS, allow_pickle=False)
        result = check_clip_pose(motion, landmarks=landmarks, flame=flame, cfg=self.config)
        counts = {"dropped": result.dropped, "total": result.total, "drop_ratio": round(result.drop_ratio, 4),
                  "source": result.source, "offset_deg": round(float(result.offset_deg), 3)}
        if 1.0 - result.drop_ratio < self.config.min_keep_ratio:
            raise ClipRejected("pose_disagreement",
                               f"{result.dropped}/{result.total} frames differ by > {self.config.threshold_deg} deg "
                               f"({result.source})", info=counts)
        save_npy(out_dir / KEEP_MASK_FILE, result.keep.astype(bool))
        save_npy(out_dir / "pose_diff_deg.npy", result.diff_deg.astype(np.float32))
        save_npy(out_dir / HEAD_POSE_FILE, result.aligned_deg.astype(np.float32))
        (out_dir / "pose.json").write_text(json.dumps(counts, sort_keys=True))
        return counts
