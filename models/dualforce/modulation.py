"""Per-frame timestep embedding and the dual AdaLN (timestep + audio) modulation.

Modulation is computed per latent frame ([B, L, k, D]) and broadcast over that frame's tokens, since hidden states
are kept as [B, L, N, D]. The timestep branch is Wan-style (shared projection + learned per-block table); the audio
branch is a shared projection initialised to zero ("AdaLN-Zero"), so at init audio leaves the modulation unchanged.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t [...] (timestep in [0, 1000]) -> [..., dim] float32 (cos | sin halves, Wan order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """sigma [B, L] -> frame embedding e [B, L, D] and block modulation base [B, L, n_mod, D]."""

    def __init__(self, freq_dim: int, dim: int, n_mod: int = 6):
        super().__init__()
        self.freq_dim = freq_dim
        self.n_mod = n_mod
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mod * dim))

    def forward(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = sinusoidal_embedding(sigma * 1000.0, self.freq_dim).to(self.mlp[0].weight.dtype)
        e = self.mlp(emb)  # [B, L, D]
        return e, self.proj(e).unflatten(-1, (self.n_mod, -1))


class AudioModulation(nn.Module):
    """Per-frame audio vector [B, L, A] -> modulation offsets [B, L, n_mod, D]; zero-initialised."""

    def __init__(self, audio_dim: int, dim: int, n_mod: int = 6):
        super().__init__()
        self.n_mod = n_mod
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(audio_dim, n_mod * dim))
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, audio_vec: torch.Tensor) -> torch.Tensor:
        return self.proj(audio_vec).unflatten(-1, (self.n_mod, -1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, N, D]; shift/scale [B, L, D] broadcast over the N tokens of each frame."""
    return x * (1 + scale.unsqueeze(2)) + shift.unsqueeze(2)
