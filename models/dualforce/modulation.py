"""Per-frame timestep embedding and the dual AdaLN (timestep + audio) modulation, computed in float32.

Modulation is computed per latent frame ([B, L, k, D]) and broadcast over that frame's tokens, since hidden states
are kept as [B, L, N, D]. The timestep branch is Wan-style (shared projection + learned per-block table); the audio
branch is a shared projection. Both start at zero (AdaLN-Zero, as DiT found best): shift, scale and gate are 0 at
init, so every block starts as the identity and only learns to move the residual stream.

Numerics (Wan 2.1): the sinusoidal embedding, the modulation MLPs, the shift/scale/gate values and the residual
adds run in float32 whatever the weights' dtype (bf16 under DeepSpeed) or autocast says; a bf16 gate of ~1e-3
rounds a residual update away, and the timestep embedding's high frequencies need fp32 to stay distinct.
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t [...] (timestep in [0, 1000]) -> [..., dim] float32 (cos | sin halves, Wan order)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def fp32_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear layer evaluated in float32 (weights upcast, autocast off): for the modulation path only."""
    autocast_off = torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda") else nullcontext()
    with autocast_off:
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), layer.weight.float(), bias)


class TimestepEmbedding(nn.Module):
    """sigma [B, L] -> frame embedding e [B, L, D] and block modulation base [B, L, n_mod, D], both float32."""

    def __init__(self, freq_dim: int, dim: int, n_mod: int = 6):
        super().__init__()
        self.freq_dim = freq_dim
        self.n_mod = n_mod
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(dim, n_mod * dim))
        nn.init.zeros_(self.proj[1].weight)  # AdaLN-Zero
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = sinusoidal_embedding(sigma * 1000.0, self.freq_dim)
        e = fp32_linear(self.mlp[2], F.silu(fp32_linear(self.mlp[0], emb)))  # [B, L, D]
        return e, fp32_linear(self.proj[1], F.silu(e)).unflatten(-1, (self.n_mod, -1))


class AudioModulation(nn.Module):
    """Per-frame audio vector [B, L, A] -> modulation offsets [B, L, n_mod, D] (float32); zero-initialised."""

    def __init__(self, audio_dim: int, dim: int, n_mod: int = 6):
        super().__init__()
        self.n_mod = n_mod
        self.proj = nn.Sequential(nn.SiLU(), nn.Linear(audio_dim, n_mod * dim))
        nn.init.zeros_(self.proj[1].weight)
        nn.init.zeros_(self.proj[1].bias)

    def forward(self, audio_vec: torch.Tensor) -> torch.Tensor:
        return fp32_linear(self.proj[1], F.silu(audio_vec.float())).unflatten(-1, (self.n_mod, -1))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, N, D]; shift/scale [B, L, D] broadcast over the N tokens of each frame (float32)."""
    return x.float() * (1 + scale.float().unsqueeze(2)) + shift.float().unsqueeze(2)


def norm_fp32(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm of the float32 residual stream, its affine weights (bf16 under DeepSpeed) upcast."""
    weight = None if norm.weight is None else norm.weight.float()
    bias = None if norm.bias is None else norm.bias.float()
    return F.layer_norm(x.float(), norm.normalized_shape, weight, bias, norm.eps)


def to_weight_dtype(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """Activations leaving the fp32 modulation path for a matmul in the layer's own dtype (bf16 weights)."""
    return x.to(layer.weight.dtype)
