"""Wan VAE: 4n+1 -> n+1 frame counts, streamed == diffusers encode, windows, reference latent, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.dryrun_models import write_dryrun_wan_vae
from models.wan_vae import CausalStreamEncoder, frames_to_input, load_wan_vae
from models.weights import WeightsError
from tasks.errors import ClipRejected
from tasks.media import read_frames
from tasks.steps.vae_latents import VaeLatentConfig, encode_clip, load_vae_latents, save_vae_latents

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    return load_wan_vae(write_dryrun_wan_vae(tmp_path_factory.mktemp("vae")))


@pytest.fixture(scope="module")
def frames(samples_dir):
    # 14 real frames, downscaled to 64x64 to keep the test fast (the VAE is fully convolutional)
    return read_frames(samples_dir / "more" / "lp_d12.mp4", scale_to=(64, 64))[:14]


def _diffusers_reference(wan, frames):
    with torch.inference_mode():
        mean = wan.vae.encode(frames_to_input(frames, wan.device, wan.dtype)).latent_dist.mean
    return wan.normalise(mean.float())[0].numpy()


def test_loader_flags_and_errors(wan, tmp_path):
    assert wan.untrained_dryrun and wan.z_dim == 16
    assert torch.equal(wan.latents_mean, torch.zeros(16)) and torch.equal(wan.latents_std, torch.ones(16))
    with pytest.raises(WeightsError, match="not found"):
        load_wan_vae(tmp_path / "absent")
    with pytest.raises(WeightsError, match="local_files_only"):
        load_wan_vae("nobody/no-such-wan", subfolder="vae")


@pytest.mark.parametrize("T", [1, 5, 9, 13])
def test_stream_equals_diffusers_encode(wan, frames, T):
    ref = _diffusers_reference(wan, frames[:T])
    assert ref.shape == (16, (T - 1) // 4 + 1, 8, 8)
    enc = CausalStreamEncoder(wan)
    parts = []
    for chunk in np.array_split(frames[:T], [1, 3, 7, 8]):  # uneven chunks, including empty ones
        if len(chunk):
            parts += enc.push(chunk)
    assert enc.close() == 0
    got = torch.cat(parts, dim=2)[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_windows_counts_and_causality(wan, frames):
    res = encode_clip(frames, wan, VaeLatentConfig(window_frames=5))
    assert res.latents.shape == (2, 16, 2, 8, 8) and res.latents.dtype == np.float16
    assert res.window_starts.tolist() == [0, 5] and res.dropped_tail_frames == 4 and res.num_frames == 14
    assert res.reference_latent.shape == (16, 1, 8, 8) and res.reference_latent.dtype == np.float16
    # causal VAE: a window's first latent is its first frame alone, so window 0's equals the reference (encoded
    # alone; window 0 in a batch of 2: the same to float rounding before the float16 store)
    np.testing.assert_allclose(res.latents[0, :, :1].astype(np.float32), res.reference_latent.astype(np.float32),
                               atol=1e-5, rtol=1e-3)
    np.testing.assert_allclose(res.latents[1].astype(np.float32), _diffusers_reference(wan, frames[5:10]),
                               atol=2e-3, rtol=2e-3)
    # chunked iterator input gives the same windows
    chunked = encode_clip(iter(np.array_split(frames, 5)), wan, VaeLatentConfig(window_frames=5))
    np.testing.assert_array_equal(chunked.latents, res.latents)
    overlap = encode_clip(frames, wan, VaeLatentConfig(window_frames=5, stride=4))
    assert overlap.window_starts.tolist() == [0, 4, 8]
    np.testing.assert_array_equal(overlap.latents[0], res.latents[0])
    # batches of 2 (a full one, then a partial one) against one window at a time: each window is its own frames
    for batch_windows in (1, 2):
        got = encode_clip(frames, wan, VaeLatentConfig(window_frames=5, stride=4, batch_windows=batch_windows))
        for k, start in enumerate([0, 4, 8]):
            np.testing.assert_allclose(got.latents[k].astype(np.float32),
                                       _diffusers_reference(wan, frames[start:start + 5]), atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(got.latents.astype(np.float32), overlap.latents.astype(np.float32),
                                   atol=1e-5, rtol=1e-3)
    assert res.meta["untrained_dryrun"] is True


def test_whole_clip_stream_trims_to_4n_plus_1(wan, frames, tmp_path):
    res = encode_clip(iter([frames[:6], frames[6:]]), wan, VaeLatentConfig(window_frames=None))
    assert res.window_frames == 13 and res.dropped_tail_frames == 1
    assert res.latents.shape == (1, 16, 4, 8, 8)
    np.testing.assert_allclose(res.latents[0].astype(np.float32), _diffusers_reference(wan, frames[:13]),
                               atol=2e-3, rtol=2e-3)
    back = load_vae_latents(save_vae_latents(tmp_path / "vae.npz", res))
    np.testing.assert_array_equal(back.latents, res.latents)
    assert back.meta["untrained_dryrun"] is True and back.window_frames == 13


def test_bad_config_and_short_clip(wan, frames):
    with pytest.raises(ValueError, match="4n\\+1"):
        VaeLatentConfig(window_frames=8)
    with pytest.raises(ClipRejected) as err:
        encode_clip(frames[:4], wan, VaeLatentConfig(window_frames=5))
    assert err.value.reason == "too_short"
    with pytest.raises(ValueError, match="uint8"):
        encode_clip(frames.astype(np.float32), wan, VaeLatentConfig(window_frames=5))


@pytest.mark.parametrize("chunks", [[1, 1, 1, 1], [2, 2]])
def test_stream_decode_equals_diffusers_decode(wan, frames, chunks):
    """Latents of real frames, pushed in uneven chunks, decode to diffusers' `decode` of the whole, frame by frame
    (1 video frame for latent frame 0, then 4 each); the latents' normalisation is undone first."""
    from dataclasses import replace

    from models.wan_vae import CausalStreamDecoder, output_to_frames

    skewed = replace(wan, latents_mean=torch.linspace(-0.5, 0.5, 16), latents_std=torch.linspace(0.5, 2.0, 16))
    enc = CausalStreamEncoder(skewed)
    latents = torch.cat(enc.push(frames[:13]), dim=2)  # [1, 16, 4, 8, 8]
    enc.close()
    with torch.inference_mode():
        whole = output_to_frames(wan.vae.decode(skewed.denormalise(latents)).sample)[0]  # [13, 64, 64, 3]
    dec = CausalStreamDecoder(skewed)
    got, start = [], 0
    for n in chunks:
        part = dec.push(latents[:, :, start:start + n])[0]
        assert len(part) == (4 * n - 3 if start == 0 else 4 * n)
        got.append(part)
        start += n
    dec.close()
    got = np.concatenate(got)
    assert got.shape == whole.shape == (13, 64, 64, 3)
    assert np.abs(got.astype(int) - whole.astype(int)).max() <= 1
    # the decode of a shifted latent sequence is another video: the comparison can fail
    with torch.inference_mode():
        other = output_to_frames(wan.vae.decode(skewed.denormalise(latents.flip(2))).sample)[0]
    assert np.abs(other.astype(int) - whole.astype(int)).max() > 1
