"""The bounded streaming cache: the unbounded cache while nothing is evicted, flat memory over a long stream, the
reference and first frames kept as sinks with their RoPE shifted next to the window."""
from __future__ import annotations

import pytest
import torch

from models.dualforce import SamplerConfig, build_model, generate, stream
from models.dualforce.kv_cache import KVCache
from models.dualforce.masking import REFERENCE_FRAME
from models.dualforce.rope import apply_rope, rope_angles
from models.dualforce.sampler import check_cache_fits, default_cache_window

torch.set_num_threads(1)
H = W = 4


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = build_model("tiny", bridge_strategy="full").eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # active audio and bridge paths: every cached layer matters
        for p in m.zero_init_parameters().values():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return m


def _cond(latent_frames: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 16, 1, H, W, generator=g), torch.randn(1, 4 * (latent_frames - 1) + 1, 32, generator=g)


def _generate(model, ref, audio, **cfg):
    return generate(model, ref, audio, SamplerConfig(steps=2, **cfg), torch.Generator().manual_seed(5))


def test_window_covering_the_stream_is_the_unbounded_cache_exactly(model):
    ref, audio = _cond(6)
    unbounded = _generate(model, ref, audio)
    bounded = _generate(model, ref, audio, cache_window=6, sink_frames=1)
    assert torch.equal(bounded[0], unbounded[0]) and torch.equal(bounded[1], unbounded[1])


@pytest.mark.parametrize("window,sinks", [(2, 1), (3, 0)])
def test_bounded_equals_unbounded_until_the_first_eviction_then_departs(model, window, sinks):
    ref, audio = _cond(9, seed=1)
    v_full, _ = _generate(model, ref, audio)
    v_bound, _ = _generate(model, ref, audio, cache_window=window, sink_frames=sinks)
    last_exact = sinks + window  # frame t sees an evicted cache once t - window > sinks
    assert torch.equal(v_bound[:, :, : last_exact + 1], v_full[:, :, : last_exact + 1])
    assert not torch.allclose(v_bound[:, :, last_exact + 1], v_full[:, :, last_exact + 1])


def test_cache_memory_is_flat_over_ten_training_windows(model):
    trained, window, sinks = 6, 3, 1  # a 21-frame training window is 6 latent frames
    length = 10 * trained
    ref, audio = _cond(length, seed=2)
    cfg = SamplerConfig(steps=1, cache_window=window, sink_frames=sinks)
    check_cache_fits(cfg, trained)
    sizes = [ch.cache_bytes for ch in stream(model, ref, audio, cfg, torch.Generator().manual_seed(0))]
    assert len(sizes) == length
    full = sizes[window + sinks - 1]  # reference + sinks + window frames
    assert sizes[: window + sinks] == sorted(sizes[: window + sinks]) and sizes[0] < full
    assert set(sizes[window + sinks - 1:]) == {full}
    unbounded = [ch.cache_bytes for ch in stream(model, ref, audio, SamplerConfig(steps=1),
                                                 torch.Generator().manual_seed(0))]
    assert unbounded[-1] > 10 * full  # what the bound saves: the unbounded cache grows with every frame


def test_reference_and_first_frames_stay_as_sinks(model):
    cache = KVCache(window=3, sink_frames=1, rope_theta=model.config.rope_theta)
    ref, audio = _cond(12, seed=3)
    windows = model.audio_windows(audio)
    zero = torch.zeros(1, 1)
    with torch.no_grad():
        model.cache_reference(ref, cache)
        for f in range(12):
            model(torch.randn(1, 16, 1, H, W), zero, torch.randn(1, 1, 4, 133), zero, None, windows[:, f:f + 1],
                  frame_offset=f, cache=cache, update_cache=True)
    assert cache.num_frames == 12 and cache.has_reference
    assert cache.held_frames("video") == [REFERENCE_FRAME, 0, 9, 10, 11]
    assert cache.held_frames("struct") == cache.held_frames("bridge_video") == [0, 9, 10, 11]
    assert cache.evicted_frames == 8


def test_sink_keys_are_read_at_positions_next_to_the_window():
    """RoPE is relative: the sinks' keys must read as if rotated at frames just before the window."""
    d, theta = 24, 10000.0
    cache = KVCache(window=2, sink_frames=1, rope_theta=theta)
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(1, 2, 7, d, generator=g)  # one token per frame: the reference (-1), then frames 0..5
    frames = torch.arange(-1, 6)
    positions = torch.stack([frames, frames * 0 + 1, frames * 0 + 2], -1)  # (t, row 1, col 2)
    rotated = apply_rope(raw, rope_angles(positions, d, theta))
    for i, f in enumerate(frames.tolist()):
        cache.recording = True
        cache.key_frames("video", torch.tensor([f]))
        cache.extend("video:0", rotated[:, :, i:i + 1], rotated[:, :, i:i + 1])
        cache.commit()
    assert cache.held_frames() == [-1, 0, 4, 5] and cache.evicted_frames == 3
    keys, values = cache.extend("video:0", rotated[:, :, :0], rotated[:, :, :0])
    moved = positions[:2].clone()
    moved[:, 0] += 3  # the reference and frame 0 now sit at frames 2 and 3, right before frames 4 and 5
    torch.testing.assert_close(keys[:, :, :2], apply_rope(raw[:, :, :2], rope_angles(moved, d, theta)),
                               rtol=0, atol=1e-5)
    assert torch.equal(keys[:, :, 2:], rotated[:, :, 5:])  # the window's keys are untouched
    assert torch.equal(values, torch.cat([rotated[:, :, :2], rotated[:, :, 5:]], 2))  # values carry no position


def test_window_must_fit_the_trained_span():
    check_cache_fits(SamplerConfig(cache_window=4, sink_frames=1), trained_latent_frames=6)
    with pytest.raises(ValueError, match="more than the 6 the model was trained on"):
        check_cache_fits(SamplerConfig(cache_window=5, sink_frames=1), trained_latent_frames=6)
    assert default_cache_window(6) == 4 and default_cache_window(2, sink_frames=1, chunk_frames=1) == 1
    with pytest.raises(ValueError, match="cache_window needs use_cache"):
        SamplerConfig(cache_window=3, use_cache=False)
    with pytest.raises(ValueError, match="'<stream>:<layer>'"):
        KVCache().extend("video3", torch.zeros(1, 1, 1, 6), torch.zeros(1, 1, 1, 6))


def test_bf16_weights_on_the_flex_path_stream_like_fp32(model):
    """What a GPU runs (bf16 weights, FlexAttention, a bounded cache, chunks of 2 so masks are in play), on the CPU:
    the same frames as fp32 to bf16's precision, not a dtype error or a drift."""
    import copy

    fast = copy.deepcopy(model).to(torch.bfloat16).set_attention_backend("flex")
    ref, audio = _cond(8, seed=4)
    cfg = dict(chunk_frames=2, cache_window=2, sink_frames=1)
    v32, s32 = _generate(model, ref, audio, **cfg)
    v16, s16 = _generate(fast, ref, audio, **cfg)
    assert v16.dtype == torch.float32 and torch.isfinite(v16).all()
    assert float((v16 - v32).norm() / v32.norm()) < 0.05
    assert float((s16 - s32).norm() / s32.norm()) < 0.05
    other = _generate(model, *_cond(8, seed=5), **cfg)[0]
    assert float((other - v32).norm() / v32.norm()) > 0.3  # a different face and speech: far apart
