"""Causal sampler: the KV-cached path equals full recomputation; streaming yields frames in order."""
from __future__ import annotations

import pytest
import torch

from models.dualforce import SamplerConfig, build_model, generate, stream
from models.dualforce.attention import KVCache

torch.set_num_threads(1)
B, L, H, W = 1, 4, 4, 4
T = 4 * (L - 1) + 1


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("tiny", bridge_strategy="full").eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # make the audio and bridge paths active so the cache covers them
        for p in m.zero_init_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return m


def _cond(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 16, 1, H, W, generator=g), torch.randn(B, T, 32, generator=g)


@pytest.mark.parametrize("chunk", [1, 2])
def test_cached_equals_uncached(model, chunk):
    ref, audio = _cond()
    outs = []
    for use_cache in (True, False):
        cfg = SamplerConfig(steps=4, chunk_frames=chunk, use_cache=use_cache)
        outs.append(generate(model, ref, audio, cfg, torch.Generator().manual_seed(11)))
    (v_c, s_c), (v_u, s_u) = outs
    assert v_c.shape == (B, 16, L, H, W) and s_c.shape == (B, T, 133)
    assert (v_c - v_u).abs().max() <= 1e-5
    assert (s_c - s_u).abs().max() <= 1e-5
    assert v_c.abs().max() > 0.1  # not a degenerate all-zero output


def test_stream_yields_frames_in_order_and_matches_generate(model):
    ref, audio = _cond(1)
    cfg = SamplerConfig(steps=3)
    chunks = list(stream(model, ref, audio, cfg, torch.Generator().manual_seed(5)))
    assert [c.frame_start for c in chunks] == list(range(L))
    assert [list(c.video_frames) for c in chunks[:2]] == [[0], [1, 2, 3, 4]]
    assert [c.struct_rows.shape[1] for c in chunks] == [1, 4, 4, 4]
    v, s = generate(model, ref, audio, cfg, torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat([c.video_latents for c in chunks], 2), v)
    assert torch.equal(torch.cat([c.struct_rows for c in chunks], 1), s)


def test_stream_is_causal_in_audio(model):
    """Frames already yielded do not depend on audio that comes later."""
    ref, audio = _cond(2)
    later = audio.clone()
    later[:, 5:] = torch.randn(B, T - 5, 32)  # video frames 5.. belong to latent frames >= 2
    a = generate(model, ref, audio, SamplerConfig(steps=3), torch.Generator().manual_seed(1))
    b = generate(model, ref, later, SamplerConfig(steps=3), torch.Generator().manual_seed(1))
    assert torch.equal(a[0][:, :, :2], b[0][:, :, :2]) and torch.equal(a[1][:, :5], b[1][:, :5])
    assert not torch.allclose(a[0][:, :, 2:], b[0][:, :, 2:])


def test_cache_holds_only_clean_frames(model):
    ref, audio = _cond()
    cache = KVCache()
    win = model.audio_windows(audio)
    x = torch.randn(B, 16, 1, H, W)
    s = torch.randn(B, 1, 4, 133)
    sig = torch.full((B, 1), 0.5)
    with torch.no_grad():
        model(x, sig, s, sig, ref, win[:, :1], frame_offset=0, cache=cache)  # a denoising pass
        assert cache.num_frames == 0
        model(x, sig * 0, s, sig * 0, ref, win[:, :1], frame_offset=0, cache=cache, update_cache=True)
        assert cache.num_frames == 1
        with pytest.raises(ValueError, match="cache holds 1 frames but frame_offset is 2"):
            model(x, sig, s, sig, ref, win[:, 2:3], frame_offset=2, cache=cache)
