"""Causal sampler: the KV-cached path equals full recomputation; streaming yields frames in order."""
from __future__ import annotations

import copy

import pytest
import torch

from models.dualforce import SamplerConfig, build_model, generate, stream
from models.dualforce.kv_cache import KVCache

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


@pytest.mark.parametrize("chunk,backend", [(1, "sdpa"), (2, "sdpa"), (2, "flex")])
def test_cached_equals_uncached(model, chunk, backend):
    ref, audio = _cond()
    outs = []
    model = copy.deepcopy(model).set_attention_backend(backend)
    for use_cache in (True, False):
        cfg = SamplerConfig(steps=4, chunk_frames=chunk, use_cache=use_cache)
        outs.append(generate(model, ref, audio, cfg, torch.Generator().manual_seed(11)))
    (v_c, s_c), (v_u, s_u) = outs
    assert v_c.shape == (B, 16, L, H, W) and s_c.shape == (B, T, 133)
    torch.testing.assert_close(v_c, v_u, rtol=1e-5, atol=2e-5)  # fp32, values up to ~10
    torch.testing.assert_close(s_c, s_u, rtol=1e-5, atol=2e-5)
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
        assert not cache.has_reference
        model(x, sig * 0, s, sig * 0, ref, win[:, :1], frame_offset=0, cache=cache, update_cache=True)
        assert cache.num_frames == 1 and cache.has_reference  # the write pass cached the reference with frame 0
        with pytest.raises(ValueError, match="cache holds 1 frames but frame_offset is 2"):
            model(x, sig, s, sig, None, win[:, 2:3], frame_offset=2, cache=cache)
        with pytest.raises(ValueError, match="already holds the reference"):
            model(x, sig, s, sig, ref, win[:, 1:2], frame_offset=1, cache=cache)
        with pytest.raises(ValueError, match="reference_latent is required"):
            model(x, sig, s, sig, None, win[:, :1])


class _Recorder(torch.nn.Module):
    """The real model, with every call's arguments recorded."""

    def __init__(self, model):
        super().__init__()
        self.inner, self.calls, self.config = model, [], model.config

    def audio_windows(self, a):
        return self.inner.audio_windows(a)

    def cache_reference(self, ref, cache):
        self.calls.append(("cache_reference", ref))
        return self.inner.cache_reference(ref, cache)

    def forward(self, *args, **kw):
        self.calls.append(("forward", args, kw))
        return self.inner(*args, **kw)


def test_struct_pad_rows_stay_tied_at_every_step(model):
    ref, audio = _cond(4)
    rec = _Recorder(model)
    chunks = list(stream(rec, ref, audio, SamplerConfig(steps=4), torch.Generator().manual_seed(2)))
    first = chunks[0].struct  # [B, 1, G, S]
    assert torch.equal(first[:, 0, :3], first[:, 0, 3:].expand(-1, 3, -1))
    frame0_inputs = [c[1][2] for c in rec.calls if c[0] == "forward" and c[2].get("frame_offset", 0) == 0]
    assert len(frame0_inputs) == 4 + 1  # every denoising step and the cache write
    for xs in frame0_inputs:
        assert torch.equal(xs[:, 0, :3], xs[:, 0, 3:].expand(-1, 3, -1))


def test_context_noise_reaches_the_cache_only(model):
    ref, audio = _cond(5)
    cn = 0.3
    rec = _Recorder(model)
    cfg = SamplerConfig(steps=3, context_noise=cn)
    chunks = list(stream(rec, ref, audio, cfg, torch.Generator().manual_seed(8)))
    g = torch.Generator().manual_seed(8)  # the sampler's draws, in its order
    torch.randn((B, 16, L, H, W), generator=g), torch.randn((B, L, 4, 133), generator=g)
    ctx_noise = torch.randn((B, 16, L, H, W), generator=g)
    writes = [c for c in rec.calls if c[0] == "forward" and c[2].get("update_cache")]
    assert len(writes) == L
    for chunk, (_, args, kw) in zip(chunks, writes):
        a = chunk.frame_start
        expected = (1 - cn) * chunk.video_latents + cn * ctx_noise[:, :, a : a + 1]
        assert torch.equal(args[0], expected) and (args[1] == cn).all() and (args[3] == cn).all()
        assert not kw["given"].any()
    # the yielded frames are the clean ones: frame 0 comes before any context and equals a clean-context run
    clean = list(stream(model, ref, audio, SamplerConfig(steps=3, context_noise=0.0), torch.Generator().manual_seed(8)))
    assert torch.equal(chunks[0].video_latents, clean[0].video_latents)
    assert not torch.allclose(chunks[2].video_latents, clean[2].video_latents)  # later frames see the noised cache


@pytest.mark.parametrize("cfg", [
    SamplerConfig(steps=3, context_noise=0.1, audio_guidance=2.0, reference_guidance=1.5),
    SamplerConfig(steps=2, context_noise=0.05, audio_guidance=3.0, chunk_frames=2),
])
def test_cached_equals_uncached_with_context_noise_guidance_and_given_frames(model, cfg):
    ref, audio = _cond(6)
    g = torch.Generator().manual_seed(9)
    context_video, context_struct = torch.randn(B, 16, 1, H, W, generator=g), torch.randn(B, 1, 4, 133, generator=g)
    outs = []
    for use_cache in (True, False):
        run_cfg = SamplerConfig(**{**cfg.__dict__, "use_cache": use_cache})
        outs.append(generate(model, ref, audio, run_cfg, torch.Generator().manual_seed(3),
                             context_video=context_video, context_struct=context_struct))
    (v_c, s_c), (v_u, s_u) = outs
    assert v_c.shape == (B, 16, L - 1, H, W) and s_c.shape == (B, T - 1, 133)
    # guidance of 3 multiplies the branches' fp32 differences (values ~10 here): agreement to 5e-5
    torch.testing.assert_close(v_c, v_u, rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(s_c, s_u, rtol=1e-5, atol=5e-5)


def test_given_context_frames_are_marked_given_and_generation_continues_after_them(model):
    ref, audio = _cond(7)
    g = torch.Generator().manual_seed(10)
    context_video, context_struct = torch.randn(B, 16, 2, H, W, generator=g), torch.randn(B, 2, 4, 133, generator=g)
    rec = _Recorder(model)
    chunks = list(stream(rec, ref, audio, SamplerConfig(steps=2), torch.Generator().manual_seed(1),
                         context_video=context_video, context_struct=context_struct))
    assert [c.frame_start for c in chunks] == [2, 3]
    kinds = [c[0] for c in rec.calls]
    assert kinds[0] == "cache_reference"
    _, args, kw = rec.calls[1]  # the given frames, written first: clean and marked given
    assert kw["update_cache"] and kw["given"].all() and torch.equal(args[0], context_video) and (args[1] == 0).all()
    assert all(not c[2].get("given", torch.zeros(1, dtype=torch.bool)).any() for c in rec.calls[2:] if c[0] == "forward")
    # not given: written as generated context is, at the context-noise level
    rec.calls.clear()
    list(stream(rec, ref, audio, SamplerConfig(steps=2, context_noise=0.1), torch.Generator().manual_seed(1),
                context_video=context_video, context_struct=context_struct, context_given=False))
    _, args, kw = rec.calls[1]
    assert not kw["given"].any() and (args[1] == 0.1).all()
    assert 0 < (args[0] - context_video).abs().max() and torch.allclose(args[0], 0.9 * context_video, atol=0.5)
    # the given frames matter: other context, other continuation
    other = list(stream(model, ref, audio, SamplerConfig(steps=2), torch.Generator().manual_seed(1),
                        context_video=context_video + 1.0, context_struct=context_struct))
    assert not torch.allclose(other[0].video_latents, chunks[0].video_latents)


def test_guidance_scale_one_is_no_guidance_and_other_scales_combine_the_branches(model):
    ref, audio = _cond(8)
    rec = _Recorder(model)
    base = generate(model, ref, audio, SamplerConfig(steps=2), torch.Generator().manual_seed(4))
    ones = generate(rec, ref, audio, SamplerConfig(steps=2, audio_guidance=1.0, reference_guidance=1.0),
                    torch.Generator().manual_seed(4))
    assert torch.equal(base[0], ones[0]) and torch.equal(base[1], ones[1])
    assert sum(c[0] == "cache_reference" for c in rec.calls) == 1  # one branch: no null passes at scale 1
    # one Euler step on the first frame, by hand: v = v_full + (s_a - 1)(v_full - v_no_audio) + (s_r - 1)(v_full - v_no_ref)
    s_a, s_r = 2.5, 1.5
    cfg = SamplerConfig(steps=1, audio_guidance=s_a, reference_guidance=s_r, context_noise=0.0)
    chunk = next(stream(model, ref, audio, cfg, torch.Generator().manual_seed(4)))
    g = torch.Generator().manual_seed(4)
    nv, ns = torch.randn((B, 16, L, H, W), generator=g), torch.randn((B, L, 4, 133), generator=g)
    from models.dualforce.frames import tie_pad_rows
    xv, xs = nv[:, :, :1], tie_pad_rows(0.7 * tie_pad_rows(ns)[:, :1])
    win = model.audio_windows(audio)[:, :1]
    one, sv = torch.ones(B, 1), torch.full((B, 1), 0.7)
    with torch.no_grad():
        full = model(xv, one, xs, sv, ref, win)
        no_audio = model(xv, one, xs, sv, ref, torch.zeros_like(win))
        no_ref = model(xv, one, xs, sv, torch.zeros_like(ref), win)
    v = full[0] + (s_a - 1) * (full[0] - no_audio[0]) + (s_r - 1) * (full[0] - no_ref[0])
    # float32 on latents of |5|: the sampler sums the branches in another order (1.5e-5 measured); a wrong
    # combination is off by the branches' difference (> 1e-3, next line)
    torch.testing.assert_close(chunk.video_latents, xv - v, rtol=1e-5, atol=1e-5)
    assert (chunk.video_latents - (xv - full[0])).abs().max() > 1e-3  # guidance did change the result
