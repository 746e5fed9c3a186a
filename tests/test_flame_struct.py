"""The FLAME struct layout: values land in their slices, in the project's camera frame, invalid frames masked."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from models.flame_layout import FlameLayout, flame_struct
from tasks.steps.pose_check import flame_head_matrices


def _params(T: int = 6, E: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"expression": rng.normal(size=(T, E)), "jaw_pose": rng.normal(0, 0.1, (T, 3)),
            "neck_pose": rng.normal(0, 0.1, (T, 3)), "global_pose": rng.normal(0, 0.3, (T, 3)),
            "translation": rng.normal(0, 0.05, (T, 3)), "shape": rng.normal(size=(T, 4))}


def test_each_parameter_lands_in_its_slice_and_camera_quantities_in_the_opencv_frame():
    p = _params()
    got = flame_struct(p, frame="opengl")
    L = got.layout
    assert L == FlameLayout(5) and L.dim == 17 and got.struct.shape == (6, 17) and got.struct.dtype == np.float32
    np.testing.assert_allclose(got.struct[:, L.expression], p["expression"], rtol=1e-6)
    np.testing.assert_allclose(got.struct[:, L.block("jaw_pose")], p["jaw_pose"], rtol=1e-6)  # model frame, as given
    np.testing.assert_allclose(got.struct[:, L.block("neck_pose")], p["neck_pose"], rtol=1e-6)
    np.testing.assert_allclose(got.struct[:, L.block("translation")], p["translation"] * [1, -1, -1], rtol=1e-6)
    # the global pose block is the same head rotation the pose check derives from the file (OpenCV frame)
    want = flame_head_matrices(p["global_pose"], frame="opengl")
    got_M = np.stack([cv2.Rodrigues(v.astype(np.float64).reshape(3, 1))[0] for v in got.struct[:, L.block("global_pose")]])
    np.testing.assert_allclose(got_M, want, atol=1e-6)
    np.testing.assert_allclose(got.shape, p["shape"].mean(axis=0), rtol=1e-6)  # identity: once per clip
    assert got.valid.all()
    same = flame_struct(p, frame="opencv")
    np.testing.assert_allclose(same.struct[:, L.block("global_pose")], p["global_pose"], rtol=1e-6)


def test_invalid_frames_are_zeroed_and_masked_and_expression_counts_are_fixed():
    p = _params(E=7)
    p["expression"][2, 1] = np.nan
    p["global_pose"][4] = np.inf
    got = flame_struct(p, n_exp=4)
    assert got.layout.n_exp == 4 and got.struct.shape == (6, 16)
    assert got.valid.tolist() == [True, True, False, True, False, True]
    assert not got.struct[[2, 4]].any()
    np.testing.assert_allclose(got.struct[0, :4], p["expression"][0, :4], rtol=1e-6)  # cut to 4
    padded = flame_struct(_params(E=3), n_exp=6)
    assert not padded.struct[:, 3:6].any()  # padded with zeros
    head_only = flame_struct({"global_pose": p["global_pose"][:2]})
    assert head_only.layout.n_exp == 0 and not head_only.struct[:, head_only.layout.block("jaw_pose")].any()


def test_malformed_tracker_files_are_refused():
    with pytest.raises(ValueError, match="need 'global_pose'"):
        flame_struct({"expression": np.zeros((3, 2))})
    with pytest.raises(ValueError, match="jaw_pose must be"):
        flame_struct({"global_pose": np.zeros((3, 3)), "jaw_pose": np.zeros((2, 3))})
    with pytest.raises(ValueError, match="frame must be"):
        flame_struct({"global_pose": np.zeros((3, 3))}, frame="dx")
