"""Pose cross-check: PnP and FLAME axis-angle recover known angles; comparison, keep mask, gate."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.struct_layout import MotionLatents
from tasks.errors import ClipRejected
from tasks.steps.pose_check import (
    _GL_TO_CV,
    GENERIC_FACE_68,
    PoseCheckConfig,
    angles_from_matrices,
    camera_matrix,
    check_clip_pose,
    flame_head_matrices,
    latent_quality_gate,
    load_flame_npz,
    matrices_from_angles,
    pnp_head_matrices,
    reject_if_disagreeing,
)

KNOWN = np.array([[0.0, 0.0, 0.0], [10.0, -25.0, 5.0], [-15.0, 30.0, -10.0], [20.0, 15.0, 12.0],
                  [-5.0, -40.0, 0.0], [8.0, 5.0, -20.0]])  # pitch, yaw, roll (deg)


def _motion(angles: np.ndarray) -> MotionLatents:
    T = len(angles)
    z = np.zeros((T, 21, 3), np.float32)
    return MotionLatents(kp=z, exp=z, pitch=angles[:, 0], yaw=angles[:, 1], roll=angles[:, 2],
                         scale=np.ones((T, 1)), t=np.zeros((T, 3)))


def _project(angles: np.ndarray, size: int = 512, distance_mm: float = 450.0) -> np.ndarray:
    """Generic face rotated by known LivePortrait-convention angles, pinhole camera -> [T, 68, 2] pixels."""
    K = camera_matrix(size, size)
    M = matrices_from_angles(angles[:, 0], angles[:, 1], angles[:, 2])
    out = []
    for m in M:
        cam = GENERIC_FACE_68 @ m.T + np.array([0.0, -20.0, distance_mm])
        uv = cam @ K.T
        out.append(uv[:, :2] / uv[:, 2:])
    return np.stack(out)


def test_generic_face_is_symmetric_and_sized():
    assert GENERIC_FACE_68.shape == (68, 3)
    assert GENERIC_FACE_68[45, 0] - GENERIC_FACE_68[36, 0] == pytest.approx(90.0)
    assert GENERIC_FACE_68[30, 2] == GENERIC_FACE_68[:, 2].min()  # nose tip nearest the camera


def test_pnp_recovers_known_angles():
    lm = _project(KNOWN)
    assert np.all((lm > 0) & (lm < 512))
    for use_contour in (False, True):
        M = pnp_head_matrices(lm, (512, 512), PoseCheckConfig(use_contour=use_contour))
        np.testing.assert_allclose(angles_from_matrices(M), KNOWN, atol=1.0)


def test_pnp_agrees_with_motion_and_keeps_all_frames():
    lm = _project(KNOWN)
    res = check_clip_pose(_motion(KNOWN), landmarks=lm, cfg=PoseCheckConfig(center=False))
    assert res.source == "landmarks_pnp" and res.keep.all() and res.dropped == 0
    assert np.nanmax(res.diff_deg) < 1.0
    np.testing.assert_allclose(res.independent_deg, KNOWN, atol=1.0)


def test_disagreeing_frames_are_dropped_and_missing_landmarks_handled():
    lm = _project(KNOWN)
    lm[2] = np.nan  # no face found in frame 2
    wrong = KNOWN.copy()
    wrong[4, 1] += 25.0  # LivePortrait says yaw -15 where the face is at -40
    res = check_clip_pose(_motion(wrong), landmarks=lm, cfg=PoseCheckConfig(center=False, threshold_deg=10))
    assert res.keep.tolist() == [True, True, False, True, False, True]
    assert np.isnan(res.diff_deg[2]) and res.diff_deg[4] == pytest.approx(25.0, abs=1.0)
    assert res.axis_diff_deg[4, 1] == pytest.approx(25.0, abs=1.0)
    assert res.drop_ratio == pytest.approx(2 / 6)
    assert reject_if_disagreeing(res, PoseCheckConfig(min_keep_ratio=0.5)) is res.keep
    with pytest.raises(ClipRejected) as err:
        reject_if_disagreeing(res, PoseCheckConfig(min_keep_ratio=0.8))
    assert err.value.reason == "pose_disagreement"


def test_centering_removes_constant_offset():
    lm = _project(KNOWN)
    # a constant offset rotation (e.g. a per-subject 8-degree pitch bias) applied on top of every true pose
    M = matrices_from_angles(np.full(6, 8.0), np.zeros(6), np.zeros(6)) @ matrices_from_angles(*KNOWN.T)
    biased = angles_from_matrices(M)
    raw = check_clip_pose(_motion(biased), landmarks=lm, cfg=PoseCheckConfig(center=False))
    cen = check_clip_pose(_motion(biased), landmarks=lm, cfg=PoseCheckConfig(center=True))
    assert raw.diff_deg.min() > 5.0
    assert cen.keep.all() and np.nanmax(cen.diff_deg) < 1.0 and cen.offset_deg == pytest.approx(8.0, abs=1.0)


@pytest.mark.parametrize("frame", ["opengl", "opencv"])
def test_flame_axis_angle_path(tmp_path, frame):
    M_cv = matrices_from_angles(KNOWN[:, 0], KNOWN[:, 1], KNOWN[:, 2])
    M = M_cv if frame == "opencv" else _GL_TO_CV @ M_cv @ _GL_TO_CV
    aa = np.stack([cv2.Rodrigues(m)[0].ravel() for m in M])
    T = len(KNOWN)
    np.savez(tmp_path / "flame.npz", global_pose=aa, jaw_pose=np.zeros((T, 3)), expression=np.zeros((T, 50)),
             frame=np.array(frame))
    flame = load_flame_npz(tmp_path / "flame.npz")
    res = check_clip_pose(_motion(KNOWN), flame=flame, cfg=PoseCheckConfig(center=False))
    assert res.source == "flame"
    np.testing.assert_allclose(res.independent_deg, KNOWN, atol=1e-6)
    assert np.nanmax(res.diff_deg) < 1e-4 and res.keep.all()


def test_flame_neck_composes_with_global():
    g = np.array([[0.0, 0.3, 0.0]])
    n = np.array([[0.2, 0.0, 0.0]])
    M = flame_head_matrices(g, n, frame="opencv")
    want = cv2.Rodrigues(g[0])[0] @ cv2.Rodrigues(n[0])[0]
    np.testing.assert_allclose(M[0], want, atol=1e-12)
    with pytest.raises(ValueError, match="frame"):
        flame_head_matrices(g, frame="unity")
    with pytest.raises(ValueError, match="needs FLAME parameters or 68-point landmarks"):
        check_clip_pose(_motion(KNOWN))


def test_gate_go_and_no_go():
    go = latent_quality_gate({"a": (10, 100), "b": (40, 100)}, max_drop_ratio=0.5)
    assert go.go and go.gate == "3d_latent_quality" and go.numbers["drop_ratio"] == pytest.approx(0.25)
    assert [r["clip_id"] for r in go.rows] == ["a", "b"] and go.rows[1]["drop_ratio"] == pytest.approx(0.4)
    assert go.recommendation == ""
    no = latent_quality_gate({"a": (60, 100), "b": (50, 80)}, max_drop_ratio=0.5)
    assert not no.go and no.numbers["drop_ratio"] == pytest.approx(110 / 180)
    assert no.recommendation.startswith("use the FLAME-only representation: re-run with --flame-dir")
    assert no.state_name == "NO-GO: 3d_latent_quality"
    assert latent_quality_gate({"a": (50, 100)}).go  # exactly 50% is not "more than 50%"
    assert not latent_quality_gate({}).go
    with pytest.raises(ValueError, match="clip 'x'"):
        latent_quality_gate({"x": (5, 3)})
