"""Causal frame-by-frame (or chunk-by-chunk) sampler with a KV cache of context, guidance and given frames.

The reference is written into each cache once (`DualForce.cache_reference`). Given context frames (a user's frames,
the end of a previous window) go in next, clean, marked as given. Then for each chunk of latent frames [a, b):
start video from pure noise (sigma 1) and struct from sigma_s0 = 0.7 around a prior (the previous chunk's last
struct group, the last given group, `reference_struct`, or zeros) -- the struct stream never saw sigma > 0.7 in
training. Denoise with K Euler steps of the flow (x += (sigma_next - sigma) * v) on the shifted grid; the struct
grid is the video grid scaled by sigma_s0. Frame 0's struct pad rows stay tied to its real row at every step
(frames.tie_pad_rows). Then one extra pass over the finished chunk writes its keys/values into the cache at the
context-noise level: x_ctx = (1 - c) x + c eps at sigma c (Diffusion Forcing's stabilisation; SkyReels-V2's
addnoise_condition=20, i.e. c = 0.02, is the default). The noise touches the cache only; the chunk is yielded clean.

Classifier-free guidance: for audio and for the reference, a scale s != 1 adds a null branch (zero audio features,
or a zero reference latent: the nulls condition dropout trained) with a KV cache of its own, and
v = v_full + sum_i (s_i - 1) (v_full - v_null_i). A scale of 1 runs no branch at all, so guidance 1 is exactly no
guidance; each guided condition costs one more model pass per step.

A bounded cache (`cache_window=W`, `sink_frames=S`; kv_cache.py) keeps the reference, the first S frames and the
last W frames: memory stays flat over a stream of any length, and with W >= the stream's frames it is the unbounded
cache exactly. A query then spans S + W + chunk_frames latent frames (plus the reference), which must fit the
window the model was trained on (`check_cache_fits`).

`use_cache=False` recomputes the reference, the whole context (as the cache would hold it) and the current chunk at
every step instead: the reference the cached path is checked against.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .diffusion_forcing import shift_sigma
from .frames import num_latent_frames, tie_pad_rows, video_frames_of
from .kv_cache import KVCache


@dataclass
class SamplerConfig:
    steps: int = 20
    shift: float = 3.0
    struct_sigma_start: float = 0.7
    chunk_frames: int = 1
    use_cache: bool = True
    context_noise: float = 0.02  # sigma of the context written into the cache (0: clean context)
    audio_guidance: float = 1.0  # CFG scale on audio (1: no guidance, no extra pass)
    reference_guidance: float = 1.0  # CFG scale on the reference (1: no guidance, no extra pass)
    cache_window: Optional[int] = None  # latent frames the cache keeps besides the sinks (None: all of them)
    sink_frames: int = 1  # first latent frames a bounded cache keeps for good (the reference always stays)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.chunk_frames < 1:
            raise ValueError(f"steps and chunk_frames must be >= 1, got {self.steps}, {self.chunk_frames}")
        if not 0.0 < self.struct_sigma_start <= 1.0:
            raise ValueError(f"struct_sigma_start must be in (0, 1], got {self.struct_sigma_start}")
        if not 0.0 <= self.context_noise < 1.0:
            raise ValueError(f"context_noise must be in [0, 1), got {self.context_noise}")
        if self.cache_window is not None and (self.cache_window < 1 or not self.use_cache):
            raise ValueError(f"cache_window needs use_cache and must be >= 1, got {self.cache_window}")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")

    @property
    def attention_span(self) -> Optional[int]:
        """Latent frames a query sees besides the reference with a bounded cache (None: unbounded)."""
        return None if self.cache_window is None else self.sink_frames + self.cache_window + self.chunk_frames


def check_cache_fits(cfg: SamplerConfig, trained_latent_frames: int) -> None:
    """A bounded cache must not show a query frame distances training never did (RoPE extrapolation)."""
    span = cfg.attention_span
    if span is not None and span > trained_latent_frames:
        raise ValueError(
            f"sink_frames {cfg.sink_frames} + cache_window {cfg.cache_window} + chunk_frames {cfg.chunk_frames} = "
            f"{span} latent frames, more than the {trained_latent_frames} the model was trained on: lower the window"
        )


def default_cache_window(trained_latent_frames: int, sink_frames: int = 1, chunk_frames: int = 1) -> int:
    """The widest window whose span fits the trained one (at least 1 frame)."""
    return max(1, trained_latent_frames - sink_frames - chunk_frames)


@dataclass
class GeneratedChunk:
    frame_start: int  # first latent frame of the chunk
    video_latents: torch.Tensor  # [B, 16, n, h, w]
    struct: torch.Tensor  # [B, n, G, S] grouped
    struct_rows: torch.Tensor  # [B, rows, S]: one row per video frame of the chunk
    cache_bytes: int = 0  # keys/values held by the caches of every branch once the chunk is written

    @property
    def video_frames(self) -> range:
        stop = self.frame_start + self.video_latents.shape[2]
        return range(video_frames_of(self.frame_start).start, video_frames_of(stop - 1).stop)


def sigma_grid(steps: int, shift: float) -> torch.Tensor:
    """[steps + 1] from 1 down to 0 on the shifted grid."""
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1), shift)


class _Branch:
    """One conditioning of the model (full, or with a null condition), with its KV cache, or the context history
    it recomputes every pass when sampling without a cache."""

    def __init__(self, model, reference: torch.Tensor, windows: torch.Tensor, guidance: float, cfg: SamplerConfig):
        self.model, self.reference, self.windows, self.guidance = model, reference, windows, guidance
        self.cache = (KVCache(cfg.cache_window, cfg.sink_frames, model.config.rope_theta) if cfg.use_cache
                      else None)
        if self.cache is not None:
            model.cache_reference(reference, self.cache)

    def predict(self, history: "_History", x_v, sig_v, x_s, sig_s, a: int, b: int):
        if self.cache is not None:
            return self.model(x_v, sig_v, x_s, sig_s, None, self.windows[:, a:b], frame_offset=a, cache=self.cache)
        if not history.video:
            return self.model(x_v, sig_v, x_s, sig_s, self.reference, self.windows[:, :b])
        v_all, s_all = self.model(
            torch.cat(history.video + [x_v], 2), torch.cat(history.sigma + [sig_v], 1),
            torch.cat(history.struct + [x_s], 1), torch.cat(history.sigma + [sig_s], 1),
            self.reference, self.windows[:, :b], given=torch.cat(history.given + [torch.zeros_like(sig_v, dtype=torch.bool)], 1),
        )
        return v_all[:, :, a:], s_all[:, a:]

    def write(self, x_v, sigma, x_s, given, a: int, b: int) -> None:
        if self.cache is not None:
            self.model(x_v, sigma, x_s, sigma, None, self.windows[:, a:b], frame_offset=a, cache=self.cache,
                       update_cache=True, given=given)


@dataclass
class _History:
    """The context as the model sees it (given frames clean, generated ones at the context-noise level): kept only
    when sampling without a cache, which recomputes it every pass (a cached stream would grow without bound)."""

    enabled: bool
    video: list
    struct: list
    sigma: list
    given: list

    def add(self, x_v, x_s, sigma, given) -> None:
        if not self.enabled:
            return
        self.video.append(x_v)
        self.struct.append(x_s)
        self.sigma.append(sigma)
        self.given.append(given)


@torch.no_grad()
def stream(
    model,
    reference_latent: torch.Tensor,  # [B, 16, 1, h, w]
    audio_features: torch.Tensor,  # [B, T, A], T = 4(L-1)+1: the context frames' audio, then the frames to make
    cfg: SamplerConfig = SamplerConfig(),
    generator: Optional[torch.Generator] = None,
    reference_struct: Optional[torch.Tensor] = None,  # [B, S]: struct prior for the first frame
    # given latent frames 0..k-1, encoded as a clip of their own (latent frame 0 holds one video frame, so its struct
    # group's pad rows are tied to its last row, as in training)
    context_video: Optional[torch.Tensor] = None,  # [B, 16, k, h, w]
    context_struct: Optional[torch.Tensor] = None,  # [B, k, G, S]: their struct groups
    context_given: bool = True,  # False: write them as generated context is (context noise, not marked given)
) -> Iterator[GeneratedChunk]:
    """Yield chunks of clean latent frames (and their struct rows) as they finish, from frame k on."""
    c = model.config
    B, C, _, h, w = reference_latent.shape
    L = num_latent_frames(audio_features.shape[1])
    G, S = c.frames_per_latent, c.struct_dim
    device, dtype = reference_latent.device, torch.float32
    k0 = _check_context(context_video, context_struct, (B, C, h, w), (G, S), L)
    # all noise up front so cached and uncached sampling see the same draws
    noise_video = torch.randn((B, C, L, h, w), generator=generator, device=device, dtype=dtype)
    noise_struct = tie_pad_rows(torch.randn((B, L, G, S), generator=generator, device=device, dtype=dtype))
    ctx_noise_video = torch.randn((B, C, L, h, w), generator=generator, device=device, dtype=dtype)
    ctx_noise_struct = tie_pad_rows(torch.randn((B, L, G, S), generator=generator, device=device, dtype=dtype))
    windows = model.audio_windows(audio_features.to(dtype))  # [B, L, W, A]
    reference = reference_latent.to(dtype)
    branches = [_Branch(model, reference, windows, 1.0, cfg)]
    if cfg.audio_guidance != 1.0:
        branches.append(_Branch(model, reference, torch.zeros_like(windows), cfg.audio_guidance, cfg))
    if cfg.reference_guidance != 1.0:
        branches.append(_Branch(model, torch.zeros_like(reference), windows, cfg.reference_guidance, cfg))
    history = _History(not cfg.use_cache, [], [], [], [])
    prior = (torch.zeros(B, 1, G, S, device=device) if reference_struct is None
             else reference_struct[:, None, None].expand(B, 1, G, S).float())
    grid = sigma_grid(cfg.steps, cfg.shift).tolist()
    s0, cn = cfg.struct_sigma_start, cfg.context_noise
    if k0:
        ctx_v, ctx_s = context_video.to(dtype), tie_pad_rows(context_struct.to(dtype))
        given = torch.full((B, k0), context_given, dtype=torch.bool, device=device)
        level = torch.full((B, k0), 0.0 if context_given else cn, device=device)
        if not context_given:  # as if the sampler had made them (training/conditioning_use.rollout_drift's teacher forcing)
            ctx_v = (1 - cn) * ctx_v + cn * ctx_noise_video[:, :, :k0]
            ctx_s = tie_pad_rows((1 - cn) * ctx_s + cn * ctx_noise_struct[:, :k0])
        for br in branches:
            br.write(ctx_v, level, ctx_s, given, 0, k0)
        history.add(ctx_v, ctx_s, level, given)
        prior = context_struct[:, -1:, -1:].to(dtype).expand(B, 1, G, S)

    def guided(x_v, sig_v, x_s, sig_s, a, b):
        n = b - a
        sv, ss = torch.full((B, n), sig_v, device=device), torch.full((B, n), sig_s, device=device)
        v_full, s_full = branches[0].predict(history, x_v, sv, x_s, ss, a, b)
        v_v, v_s = v_full.float(), s_full.float()
        for br in branches[1:]:
            v_null, s_null = br.predict(history, x_v, sv, x_s, ss, a, b)
            v_v = v_v + (br.guidance - 1.0) * (v_full.float() - v_null.float())
            v_s = v_s + (br.guidance - 1.0) * (s_full.float() - s_null.float())
        return v_v, v_s

    for a in range(k0, L, cfg.chunk_frames):
        b = min(a + cfg.chunk_frames, L)
        x_v = noise_video[:, :, a:b].clone()
        x_s = tie_pad_rows(s0 * noise_struct[:, a:b] + (1 - s0) * prior.expand(B, b - a, G, S), a)
        for k in range(cfg.steps):
            v_v, v_s = guided(x_v, grid[k], x_s, s0 * grid[k], a, b)
            x_v = x_v + (grid[k + 1] - grid[k]) * v_v
            x_s = tie_pad_rows(x_s + s0 * (grid[k + 1] - grid[k]) * v_s, a)
        # the context the next chunks see: at the context-noise level, in the caches (or the recomputed history)
        ctx_v = (1 - cn) * x_v + cn * ctx_noise_video[:, :, a:b]
        ctx_s = tie_pad_rows((1 - cn) * x_s + cn * ctx_noise_struct[:, a:b], a)
        level = torch.full((B, b - a), cn, device=device)
        not_given = torch.zeros(B, b - a, dtype=torch.bool, device=device)
        for br in branches:
            br.write(ctx_v, level, ctx_s, not_given, a, b)
        history.add(ctx_v, ctx_s, level, not_given)
        prior = x_s[:, -1:]
        rows = x_s.flatten(1, 2)[:, G - 1 :] if a == 0 else x_s.flatten(1, 2)
        yield GeneratedChunk(a, x_v, x_s, rows, sum(br.cache.nbytes for br in branches if br.cache is not None))


def _check_context(context_video, context_struct, video_shape, struct_shape, L: int) -> int:
    """The number of given context frames (0 without context); shapes checked against the reference and config."""
    if context_video is None and context_struct is None:
        return 0
    if context_video is None or context_struct is None:
        raise ValueError("context_video and context_struct go together")
    B, C, h, w = video_shape
    k = context_video.shape[2]
    if tuple(context_video.shape) != (B, C, k, h, w) or tuple(context_struct.shape) != (B, k, *struct_shape):
        raise ValueError(f"context must be video [B, {C}, k, {h}, {w}] and struct [B, k, {struct_shape[0]}, "
                         f"{struct_shape[1]}], got {tuple(context_video.shape)} and {tuple(context_struct.shape)}")
    if not 1 <= k < L:
        raise ValueError(f"{k} context frames leave nothing to generate in {L} latent frames")
    return k


def generate(model, reference_latent, audio_features, cfg: SamplerConfig = SamplerConfig(), generator=None,
             reference_struct=None, context_video=None, context_struct=None, context_given=True):
    """The generated frames (after any given context): (video latents [B, 16, L-k, h, w], struct rows [B, rows, S])."""
    chunks = list(stream(model, reference_latent, audio_features, cfg, generator, reference_struct,
                         context_video, context_struct, context_given))
    return torch.cat([ch.video_latents for ch in chunks], dim=2), torch.cat([ch.struct_rows for ch in chunks], dim=1)
