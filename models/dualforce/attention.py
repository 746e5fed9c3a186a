"""Multi-head attention with frame-causal masks and a KV cache of clean context frames.

Every token carries the index of the latent frame it belongs to. A query of frame t may attend a key of frame s iff
s <= t (`frame_causal_mask`); with all keys visible the mask is dropped so SDPA can pick the flash kernel. The
reference's tokens carry frame REFERENCE_FRAME = -1: visible to every frame, seeing only themselves.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]
REFERENCE_FRAME = -1


def frame_causal_mask(q_frames: torch.Tensor, k_frames: torch.Tensor, device=None) -> Optional[torch.Tensor]:
    """[Nq], [Nk] CPU frame indices -> bool mask [Nq, Nk] on `device` (True = may attend), or None if all visible."""
    mask = k_frames[None, :] <= q_frames[:, None]
    return None if bool(mask.all()) else mask.to(device)


class KVCache:
    """Keys/values of the clean (fully denoised) context, per attention layer, plus frame ids per token stream.

    A forward pass with `recording` on stages the keys/values it computes; `commit()` appends them. Denoising passes
    do not record, so the cache only ever holds clean frames.
    """

    def __init__(self) -> None:
        self._kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._frames: dict[str, torch.Tensor] = {}
        self._staged_kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._staged_frames: dict[str, torch.Tensor] = {}
        self.recording = False

    @property
    def num_frames(self) -> int:
        """Latent frames held (the reference, at frame -1, is not one of them)."""
        frames = self._frames.get("video")
        return 0 if frames is None else int(frames.max()) + 1

    @property
    def has_reference(self) -> bool:
        frames = self._frames.get("video")
        return frames is not None and bool((frames == REFERENCE_FRAME).any())

    def key_frames(self, stream: str, current: torch.Tensor) -> torch.Tensor:
        """Frame ids of the keys a layer over `stream` sees: cached tokens then the current ones."""
        if self.recording:
            self._staged_frames[stream] = current
        cached = self._frames.get(stream)
        return current if cached is None else torch.cat([cached, current])

    def extend(self, name: str, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B, H, N, d] of the current tokens -> cached + current along N."""
        if self.recording:
            self._staged_kv[name] = (k, v)
        cached = self._kv.get(name)
        if cached is None:
            return k, v
        return torch.cat([cached[0], k], dim=2), torch.cat([cached[1], v], dim=2)

    def commit(self) -> None:
        for name, (k, v) in self._staged_kv.items():
            old = self._kv.get(name)
            self._kv[name] = (k, v) if old is None else (torch.cat([old[0], k], 2), torch.cat([old[1], v], 2))
        for stream, frames in self._staged_frames.items():
            old = self._frames.get(stream)
            self._frames[stream] = frames if old is None else torch.cat([old, frames])
        self._staged_kv.clear()
        self._staged_frames.clear()
        self.recording = False

    def discard(self) -> None:
        self._staged_kv.clear()
        self._staged_frames.clear()
        self.recording = False


class Attention(nn.Module):
    """q from `dim`-wide queries, k/v from `kv_dim`-wide context; RMS-normed q/k (Wan), optional RoPE and cache."""

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        kv_dim = kv_dim or dim
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(kv_dim, dim)
        self.v = nn.Linear(kv_dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # [B, N, D] -> [B, H, N, d]

    def forward(
        self,
        x: torch.Tensor,  # [B, Nq, dim]
        context: Optional[torch.Tensor] = None,  # [B, Nk, kv_dim]; None = self-attention
        q_rope: Optional[Rope] = None,
        k_rope: Optional[Rope] = None,
        mask: Optional[torch.Tensor] = None,  # [Nq, Nk_total] bool
        cache: Optional[KVCache] = None,
        cache_name: str = "",
    ) -> torch.Tensor:
        context = x if context is None else context
        q = self._heads(self.norm_q(self.q(x)))
        k = self._heads(self.norm_k(self.k(context)))
        v = self._heads(self.v(context))
        if q_rope is not None:
            q = apply_rope(q, q_rope)
        if k_rope is not None:
            k = apply_rope(k, k_rope)
        if cache is not None:
            k, v = cache.extend(cache_name, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(out.transpose(1, 2).flatten(2))
