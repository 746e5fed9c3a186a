"""Multi-head attention with frame-causal masks (SDPA or FlexAttention) and a KV cache of clean context frames.

Every token carries the index of the latent frame it belongs to; masking.py turns query and key frame ids into the
mask each path needs. The reference's tokens carry frame REFERENCE_FRAME = -1: visible to every frame, seeing only
themselves.

Two attention paths, one result: "sdpa" (the reference: a dense boolean mask) and "flex" (FlexAttention with a
BlockMask: the tiles above the frame diagonal are skipped, not computed and masked). Unmasked attention (all keys
visible, the audio cross-attention) always goes to SDPA, which may then pick the flash kernel. FlexAttention is
compiled on accelerators (its eager form materialises the whole score matrix) and has no backward on CPU (torch
2.13: "FlexAttention does not support backward on CPU"): there the flex path applies the BlockMask's own mask_mod,
evaluated elementwise, through SDPA.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import flex_attention

from .kv_cache import KVCache
from .masking import FrameMask, record_attention
from .rope import apply_rope

Rope = tuple[torch.Tensor, torch.Tensor]
ATTENTION_BACKENDS = ("sdpa", "flex")
_compiled_flex = None


def _flex_kernel(device: torch.device):
    """flex_attention, compiled once per process on accelerators (eager on CPU: forward only, for tests)."""
    global _compiled_flex
    if device.type == "cpu":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[FrameMask], backend: str) -> torch.Tensor:
    """q [B, H, Nq, d], k/v [B, H, Nk, d] -> [B, H, Nq, d] through the chosen path."""
    record_attention(q, k, mask)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())
    if q.device.type == "cpu" and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.elementwise_from_block_mask())
    with warnings.catch_warnings():  # the eager (CPU) form warns that it is unfused: known, it is the test path
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return _flex_kernel(q.device)(q, k, v, block_mask=mask.block_mask())


class Attention(nn.Module):
    """q from `dim`-wide queries, k/v from `kv_dim`-wide context; RMS-normed q/k (Wan), optional RoPE and cache."""

    def __init__(self, dim: int, heads: int, kv_dim: Optional[int] = None, qk_norm: bool = True, eps: float = 1e-6,
                 backend: str = "sdpa"):
        super().__init__()
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        kv_dim = kv_dim or dim
        self.heads = heads
        self.backend = backend
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
        mask: Optional[FrameMask] = None,  # [Nq, Nk_total] visibility; None = all visible
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
        out = attend(q, k, v, mask, self.backend)
        return self.o(out.transpose(1, 2).flatten(2))
