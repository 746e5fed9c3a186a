"""Causal frame-by-frame (or chunk-by-chunk) sampler with a KV cache of clean context.

For each chunk of latent frames [a, b): start video from pure noise (sigma 1) and struct from sigma_s0 = 0.7 around
a prior (the previous chunk's last clean struct group, or `reference_struct`, or zeros) -- the struct stream never
saw sigma > 0.7 in training. Denoise with K Euler steps of the flow (x += (sigma_next - sigma) * v) on the shifted
grid; the struct grid is the video grid scaled by sigma_s0. Then one extra pass at sigma = 0 over the clean chunk
writes its keys/values into the cache, so the cache only ever holds clean frames. `use_cache=False` recomputes the
whole clean prefix plus the current chunk at every step instead (the reference the cached path is checked against).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from .attention import KVCache
from .diffusion_forcing import shift_sigma
from .frames import num_latent_frames, video_frames_of


@dataclass
class SamplerConfig:
    steps: int = 20
    shift: float = 3.0
    struct_sigma_start: float = 0.7
    chunk_frames: int = 1
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.steps < 1 or self.chunk_frames < 1:
            raise ValueError(f"steps and chunk_frames must be >= 1, got {self.steps}, {self.chunk_frames}")
        if not 0.0 < self.struct_sigma_start <= 1.0:
            raise ValueError(f"struct_sigma_start must be in (0, 1], got {self.struct_sigma_start}")


@dataclass
class GeneratedChunk:
    frame_start: int  # first latent frame of the chunk
    video_latents: torch.Tensor  # [B, 16, n, h, w]
    struct: torch.Tensor  # [B, n, G, S] grouped
    struct_rows: torch.Tensor  # [B, rows, S]: one row per video frame of the chunk

    @property
    def video_frames(self) -> range:
        stop = self.frame_start + self.video_latents.shape[2]
        return range(video_frames_of(self.frame_start).start, video_frames_of(stop - 1).stop)


def sigma_grid(steps: int, shift: float) -> torch.Tensor:
    """[steps + 1] from 1 down to 0 on the shifted grid."""
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1), shift)


@torch.no_grad()
def stream(
    model,
    reference_latent: torch.Tensor,  # [B, 16, 1, h, w]
    audio_features: torch.Tensor,  # [B, T, A], T = 4(L-1)+1
    cfg: SamplerConfig = SamplerConfig(),
    generator: Optional[torch.Generator] = None,
    reference_struct: Optional[torch.Tensor] = None,  # [B, S]: struct prior for the first frame
) -> Iterator[GeneratedChunk]:
    """Yield chunks of clean latent frames (and their struct rows) as they finish."""
    c = model.config
    B, C, _, h, w = reference_latent.shape
    L = num_latent_frames(audio_features.shape[1])
    G, S = c.frames_per_latent, c.struct_dim
    device, dtype = reference_latent.device, torch.float32
    # all noise up front so cached and uncached sampling see the same draws
    noise_video = torch.randn((B, C, L, h, w), generator=generator, device=device, dtype=dtype)
    noise_struct = torch.randn((B, L, G, S), generator=generator, device=device, dtype=dtype)
    windows = model.audio_windows(audio_features.to(dtype))  # [B, L, W, A]
    grid = sigma_grid(cfg.steps, cfg.shift).tolist()
    s0 = cfg.struct_sigma_start
    prior = torch.zeros(B, 1, G, S, device=device) if reference_struct is None else reference_struct[:, None, None].expand(B, 1, G, S).float()
    cache = KVCache() if cfg.use_cache else None
    clean_video: list[torch.Tensor] = []
    clean_struct: list[torch.Tensor] = []

    def predict(x_v, sig_v, x_s, sig_s, a, b):
        n = b - a
        sv = torch.full((B, n), sig_v, device=device)
        ss = torch.full((B, n), sig_s, device=device)
        if cache is not None:
            return model(x_v, sv, x_s, ss, reference_latent, windows[:, a:b], frame_offset=a, cache=cache)
        if a == 0:
            return model(x_v, sv, x_s, ss, reference_latent, windows[:, :b])
        # full recomputation: clean prefix (sigma 0) + current chunk, keep the chunk's outputs
        v_all, s_all = model(
            torch.cat(clean_video + [x_v], dim=2), torch.cat([torch.zeros(B, a, device=device), sv], dim=1),
            torch.cat(clean_struct + [x_s], dim=1), torch.cat([torch.zeros(B, a, device=device), ss], dim=1),
            reference_latent, windows[:, :b],
        )
        return v_all[:, :, a:], s_all[:, a:]

    for a in range(0, L, cfg.chunk_frames):
        b = min(a + cfg.chunk_frames, L)
        x_v = noise_video[:, :, a:b].clone()
        x_s = s0 * noise_struct[:, a:b] + (1 - s0) * prior.expand(B, b - a, G, S)
        for k in range(cfg.steps):
            v_v, v_s = predict(x_v, grid[k], x_s, s0 * grid[k], a, b)
            x_v = x_v + (grid[k + 1] - grid[k]) * v_v.float()
            x_s = x_s + s0 * (grid[k + 1] - grid[k]) * v_s.float()
        if cache is not None:  # write the clean chunk's keys/values
            n = b - a
            zeros = torch.zeros(B, n, device=device)
            model(x_v, zeros, x_s, zeros, reference_latent, windows[:, a:b], frame_offset=a, cache=cache, update_cache=True)
        clean_video.append(x_v)
        clean_struct.append(x_s)
        prior = x_s[:, -1:]
        rows = x_s.flatten(1, 2)[:, G - 1 :] if a == 0 else x_s.flatten(1, 2)
        yield GeneratedChunk(a, x_v, x_s, rows)


def generate(model, reference_latent, audio_features, cfg: SamplerConfig = SamplerConfig(), generator=None, reference_struct=None):
    """Whole clip: (video latents [B, 16, L, h, w], struct rows [B, T, S])."""
    chunks = list(stream(model, reference_latent, audio_features, cfg, generator, reference_struct))
    return torch.cat([ch.video_latents for ch in chunks], dim=2), torch.cat([ch.struct_rows for ch in chunks], dim=1)
