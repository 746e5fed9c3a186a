"""The extractors on a GPU: bf16 autocast stays close to float32, batching changes nothing, real clips in, real
architectures (the motion extractor at LivePortrait's size, HuBERT and the Wan VAE as the dry run writes them).
Run by scripts/device_check.sh where CUDA is present."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.dryrun_models import write_dryrun_hubert, write_dryrun_wan_vae
from models.hubert_features import HubertLayers, load_hubert
from models.motion_extractor import MotionExtractor, MotionExtractorConfig
from models.wan_vae import load_wan_vae
from tasks.media import read_audio, read_frames
from tasks.steps.motion import extract_motion
from tasks.steps.vae_latents import VaeLatentConfig, encode_clip

pytestmark = pytest.mark.gpu


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_motion_extractor_bf16_close_to_fp32(samples_dir):
    frames = read_frames(samples_dir / "more" / "lp_d12.mp4")[:32]
    torch.manual_seed(0)
    model = MotionExtractor(MotionExtractorConfig())
    fp32 = extract_motion(frames, model, batch_size=16, device="cuda", bf16=False)
    bf16 = extract_motion(frames, model, batch_size=16, device="cuda")
    assert bf16.meta["precision"] == "bf16-autocast" and fp32.meta["precision"] == "fp32"
    for name in ("kp", "exp", "t"):
        assert _relative(getattr(bf16, name), getattr(fp32, name)) < 0.05, name
    assert np.abs(bf16.yaw - fp32.yaw).max() < 2.0  # degrees


def test_hubert_bf16_close_to_fp32(samples_dir, tmp_path):
    model = load_hubert(write_dryrun_hubert(tmp_path / "hubert"), device="cuda")
    audio = read_audio(samples_dir / "sun.mp4")[:48000].astype(np.float32)
    layers = HubertLayers((-1,))
    fp32 = model.hidden_states(audio, layers, torch.device("cuda"), bf16=False)
    bf16 = model.hidden_states(audio, layers, torch.device("cuda"))
    assert _relative(bf16, fp32) < 0.05


def test_vae_batched_windows_on_gpu_equal_one_at_a_time(samples_dir, tmp_path):
    wan = load_wan_vae(write_dryrun_wan_vae(tmp_path / "vae"), device="cuda")
    frames = read_frames(samples_dir / "more" / "lp_d12.mp4")[:40]
    one = encode_clip(frames, wan, VaeLatentConfig(window_frames=9, batch_windows=1))
    four = encode_clip(frames, wan, VaeLatentConfig(window_frames=9, batch_windows=4))
    assert one.window_starts.tolist() == four.window_starts.tolist() == [0, 9, 18, 27]
    np.testing.assert_allclose(four.latents.astype(np.float32), one.latents.astype(np.float32), atol=2e-3, rtol=2e-3)
