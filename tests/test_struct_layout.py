"""Struct layout: exact round trip, slice contents, and LivePortrait's rotation convention on real motion."""
from __future__ import annotations

import numpy as np
import pytest

from models.struct_layout import (
    EXP,
    KP,
    POSE,
    POSE_SCALE,
    SCALE,
    TRANS,
    MotionLatents,
    angles_from_rotation,
    from_struct,
    rotation_from_angles,
    to_struct,
)
from tasks.contract import STRUCT_DIM


def _real_motion(path) -> tuple[MotionLatents, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        R, exp, t, scale = z["R"], z["exp"], z["t"], z["scale"]
    pitch, yaw, roll = angles_from_rotation(R)
    T = len(R)
    rng = np.random.default_rng(T)  # the templates carry no canonical kp: use stand-in values
    kp = rng.normal(0, 0.3, (T, 21, 3)).astype(np.float32)
    m = MotionLatents(kp=kp, exp=exp, pitch=pitch.astype(np.float32), yaw=yaw.astype(np.float32),
                      roll=roll.astype(np.float32), scale=scale, t=t)
    return m, R


def _motion_files(samples_dir):
    files = sorted((samples_dir / "motion").glob("*.npz"))
    assert len(files) == 12
    return files


def test_layout_fills_struct_dim():
    assert STRUCT_DIM == 133
    spans = sorted([EXP, POSE, SCALE, TRANS, KP], key=lambda s: s.start)
    assert spans[0].start == 0 and spans[-1].stop == STRUCT_DIM
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))


def test_round_trip_on_real_motion(samples_dir):
    total = 0
    for path in _motion_files(samples_dir):
        m, R = _real_motion(path)
        vec = to_struct(m)
        assert vec.shape == (m.num_frames, STRUCT_DIM) and vec.dtype == np.float32
        np.testing.assert_array_equal(vec[:, EXP], m.exp.reshape(-1, 63))
        np.testing.assert_array_equal(vec[:, SCALE], m.scale)
        np.testing.assert_array_equal(vec[:, TRANS], m.t)
        np.testing.assert_array_equal(vec[:, POSE][:, 1], m.yaw * np.float32(POSE_SCALE))
        back = from_struct(vec)
        for name in ("kp", "exp", "pitch", "yaw", "roll", "scale", "t"):
            np.testing.assert_array_equal(getattr(back, name), np.asarray(getattr(m, name), np.float32), err_msg=name)
        np.testing.assert_array_equal(to_struct(back), vec)
        # rotation recovered from the stored angles equals the template's R (float32 storage)
        np.testing.assert_allclose(back.rotation(), R, atol=2e-5)
        assert np.all(np.abs(vec[:, POSE]) < 1.0)  # |angle| < 128 degrees
        total += m.num_frames
    assert total == 1151


def test_real_rotations_are_in_liveportrait_convention(samples_dir):
    """The templates' R are orthonormal and exactly of the form (Rz Ry Rx)^T (angles -> R -> angles)."""
    yaws = []
    for path in _motion_files(samples_dir):
        with np.load(path, allow_pickle=False) as z:
            R = z["R"].astype(np.float64)
        np.testing.assert_allclose(R @ np.transpose(R, (0, 2, 1)), np.broadcast_to(np.eye(3), R.shape), atol=1e-5)
        p, y, r = angles_from_rotation(R)
        np.testing.assert_allclose(rotation_from_angles(p, y, r), R, atol=1e-5)
        yaws.append(y)
    yaws = np.concatenate(yaws)
    assert np.abs(yaws).max() < 60 and np.abs(yaws).max() > 5  # real head turns, far from gimbal lock


@pytest.mark.parametrize("angles", [(10.0, -35.0, 20.0), (-60.0, 80.0, -45.0), (0.0, 0.0, 90.0)])
def test_angles_inverse_on_known_values(angles):
    R = rotation_from_angles(*[np.array([a]) for a in angles])
    got = np.array([a[0] for a in angles_from_rotation(R)])
    np.testing.assert_allclose(got, angles, atol=1e-9)


def test_from_struct_rejects_wrong_width():
    with pytest.raises(ValueError, match="133"):
        from_struct(np.zeros((4, 132), np.float32))
    with pytest.raises(ValueError, match="MotionLatents.exp"):
        MotionLatents(kp=np.zeros((2, 21, 3)), exp=np.zeros((2, 20, 3)), pitch=np.zeros(2), yaw=np.zeros(2),
                      roll=np.zeros(2), scale=np.zeros((2, 1)), t=np.zeros((2, 3)))
