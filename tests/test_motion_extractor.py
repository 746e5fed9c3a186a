"""Motion extractor: architecture/key names of the released file, strict loading and its errors, extraction."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.dryrun_models import DRYRUN_MOTION_CFG, write_dryrun_motion_extractor
from models.motion_extractor import (
    MOTION_EXTRACTOR_RELPATH,
    MotionExtractor,
    MotionExtractorConfig,
    bins_to_degrees,
    drive_keypoints,
    load_motion_extractor,
    rotation_matrix,
)
from models.struct_layout import load_motion, rotation_from_angles, save_motion
from models.weights import WeightsError
from tasks.media import read_frames
from tasks.steps.motion import extract_motion

torch.set_num_threads(2)


def test_real_config_has_official_keys_and_size():
    model = MotionExtractor(MotionExtractorConfig())
    sd = model.state_dict()
    assert len(sd) == 212
    assert all(k.startswith("detector.") for k in sd)
    for key, shape in {
        "detector.downsample_layers.0.0.weight": (96, 3, 4, 4),
        "detector.downsample_layers.3.1.weight": (768, 384, 2, 2),
        "detector.stages.2.8.grn.gamma": (1, 1, 1, 1536),
        "detector.stages.3.2.dwconv.weight": (768, 1, 7, 7),
        "detector.fc_kp.weight": (63, 768),
        "detector.fc_exp.weight": (63, 768),
        "detector.fc_pitch.weight": (66, 768),
        "detector.fc_t.weight": (3, 768),
        "detector.fc_scale.weight": (1, 768),
        "detector.norm.weight": (768,),
    }.items():
        assert tuple(sd[key].shape) == shape, key
    n_params = sum(p.numel() for p in model.parameters())
    assert 28.0e6 < n_params < 28.2e6


def _save_official_style(tmp_path, model):
    path = tmp_path / MOTION_EXTRACTOR_RELPATH
    path.parent.mkdir(parents=True)
    torch.save(model.state_dict(), path)
    return path


def test_strict_load_of_official_layout_round_trips(tmp_path):
    torch.manual_seed(1)
    src = MotionExtractor(MotionExtractorConfig())
    _save_official_style(tmp_path, src)
    loaded = load_motion_extractor(tmp_path)
    assert not loaded.untrained_dryrun
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k


def test_missing_file_names_expected_path(tmp_path):
    with pytest.raises(WeightsError) as err:
        load_motion_extractor(tmp_path)
    assert str(tmp_path / MOTION_EXTRACTOR_RELPATH) in str(err.value)


def test_renamed_key_and_wrong_shape_are_listed(tmp_path):
    cfg = MotionExtractorConfig(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64))
    sd = MotionExtractor(cfg).state_dict()
    sd["detector.fc_kp.weightX"] = sd.pop("detector.fc_kp.weight")
    sd["detector.fc_t.weight"] = torch.zeros(4, 64)
    path = _save_official_style(tmp_path, type("M", (), {"state_dict": lambda self: sd})())
    with pytest.raises(WeightsError) as err:
        load_motion_extractor(path, cfg)
    msg = str(err.value)
    assert "missing keys (1): detector.fc_kp.weight" in msg
    assert "unexpected keys (1): detector.fc_kp.weightX" in msg
    assert "detector.fc_t.weight: file (4, 64) vs model (3, 64)" in msg


def test_bins_to_degrees_matches_formula():
    logits = torch.full((2, 66), -1e4)
    logits[0, 0] = 0.0  # all mass on bin 0 -> -97.5
    logits[1, 65] = 0.0  # bin 65 -> 97.5
    assert torch.allclose(bins_to_degrees(logits), torch.tensor([-97.5, 97.5]))
    assert torch.allclose(bins_to_degrees(torch.zeros(1, 66)), torch.tensor([0.0]))  # uniform -> 32.5*3-97.5


def test_rotation_convention_matches_numpy_and_keypoint_transform():
    p, y, r = torch.tensor([10.0, -20.0]), torch.tensor([30.0, 5.0]), torch.tensor([-15.0, 40.0])
    R = rotation_matrix(p, y, r)
    assert np.allclose(R.numpy(), rotation_from_angles(p.numpy(), y.numpy(), r.numpy()), atol=1e-6)
    # pure yaw: R = Ry(yaw)^T; row vector x @ R == (Ry x^T)^T
    Ry = rotation_matrix(torch.zeros(1), torch.tensor([90.0]), torch.zeros(1))[0]
    assert torch.allclose(torch.tensor([[1.0, 0.0, 0.0]]) @ Ry, torch.tensor([[0.0, 0.0, -1.0]]), atol=1e-6)
    kp = torch.randn(2, 21, 3)
    exp = torch.randn(2, 21, 3) * 0.01
    scale = torch.tensor([[1.5], [0.5]])
    t = torch.tensor([[0.1, -0.2, 0.7], [0.0, 0.3, -1.0]])
    out = drive_keypoints(kp, R, exp, scale, t)
    want = scale[:, :, None] * (kp @ R + exp)
    want[..., :2] += t[:, None, :2]  # z translation is not applied (LivePortrait's transform_keypoint)
    assert torch.allclose(out, want)


@pytest.fixture(scope="module")
def clip_frames(samples_dir):
    frames = read_frames(samples_dir / "more" / "lp_d12.mp4")[:10]
    assert frames.shape == (10, 512, 512, 3)
    return frames


def test_extract_motion_on_real_frames_dryrun(tmp_path, clip_frames):
    write_dryrun_motion_extractor(tmp_path, seed=0)
    model = load_motion_extractor(tmp_path)
    assert model.untrained_dryrun and model.cfg == DRYRUN_MOTION_CFG
    m4 = extract_motion(clip_frames, model, batch_size=4, device="cpu")
    m3 = extract_motion(iter([clip_frames[:3], clip_frames[3:7], clip_frames[7:]]), model, batch_size=3)
    assert m4.kp.shape == (10, 21, 3) and m4.exp.shape == (10, 21, 3)
    assert m4.pitch.shape == (10,) and m4.scale.shape == (10, 1) and m4.t.shape == (10, 3)
    for a in (m4.pitch, m4.yaw, m4.roll):
        assert np.all((a >= -97.5) & (a <= 97.5))
    for name in ("kp", "exp", "pitch", "yaw", "roll", "scale", "t"):
        np.testing.assert_allclose(getattr(m4, name), getattr(m3, name), rtol=1e-4, atol=1e-4, err_msg=name)
    assert np.ptp(m4.kp[:, 0, 0]) > 0  # different frames give different outputs
    assert m4.meta["untrained_dryrun"] is True
    path = save_motion(tmp_path / "motion.npz", m4)
    back = load_motion(path)
    with np.load(path, allow_pickle=False) as z:
        assert z["exp"].dtype == np.float16
    np.testing.assert_allclose(back.yaw, m4.yaw, atol=0.05)
    assert back.meta["untrained_dryrun"] is True


def test_extract_motion_real_size_model_on_real_frames(clip_frames):
    torch.manual_seed(0)
    model = MotionExtractor(MotionExtractorConfig())
    m = extract_motion(clip_frames[:2], model, batch_size=2, device="cpu")
    m1 = extract_motion(clip_frames[1:2], model, batch_size=1, device="cpu")
    assert m.kp.shape == (2, 21, 3)
    assert np.all(np.abs(m.yaw) <= 97.5)
    np.testing.assert_allclose(m.exp[1:], m1.exp, rtol=1e-3, atol=1e-5)


def test_extract_motion_rejects_bad_frames():
    model = MotionExtractor(MotionExtractorConfig(depths=(1, 1, 1, 1), dims=(8, 16, 32, 64)))
    with pytest.raises(ValueError, match="uint8"):
        extract_motion(np.zeros((2, 64, 64, 3), np.float32), model)
    with pytest.raises(ValueError, match="no frames"):
        extract_motion(iter([]), model)
