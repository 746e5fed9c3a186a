"""One DiT block, shared by the video and the struct stream (Wan layout, per-frame modulation).

x [B, L, N, D] -> self-attention (3D RoPE, block-causal over frames, KV cache) -> gated cross-attention to the
frame's own audio tokens (zero-initialised gate) -> FFN. Shift/scale/gate come per frame from the dual AdaLN.
A block built with audio_token_dim=None has no audio path at all (the video-only pretraining model): its
parameters are exactly the ones the full model's block shares with it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import Attention, KVCache, Rope
from .modulation import modulate


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, audio_token_dim: Optional[int], qk_norm: bool = True,
                 eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = Attention(dim, heads, qk_norm=qk_norm, eps=eps)
        self.has_audio = audio_token_dim is not None
        if self.has_audio:
            self.norm_audio = nn.LayerNorm(dim, eps=eps)
            self.audio_attn = Attention(dim, heads, kv_dim=audio_token_dim, qk_norm=qk_norm, eps=eps)
            self.audio_gate = nn.Parameter(torch.zeros(dim))  # zero-init gated residual: audio path is a no-op at init
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(6, dim) / dim**0.5)  # per-block table added to the frame mods

    def forward(
        self,
        x: torch.Tensor,  # [B, L, N, D]
        mods: torch.Tensor,  # [B, L, 6, D] timestep + audio modulation per frame
        audio_tokens: Optional[torch.Tensor],  # [B, L, Na, Da]; None for a block without an audio path
        rope: Rope,
        mask: Optional[torch.Tensor],
        cache: Optional[KVCache] = None,
        cache_name: str = "",
    ) -> torch.Tensor:
        B, L, N, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (mods + self.modulation).unbind(2)  # each [B, L, D]
        h = modulate(self.norm1(x), shift1, scale1).flatten(1, 2)
        h = self.self_attn(h, q_rope=rope, k_rope=rope, mask=mask, cache=cache, cache_name=cache_name)
        x = x + gate1.unsqueeze(2) * h.view(B, L, N, D)
        if self.has_audio:  # each frame's tokens attend to that frame's own audio tokens only
            q = self.norm_audio(x).flatten(0, 1)  # [B*L, N, D]
            a = self.audio_attn(q, context=audio_tokens.flatten(0, 1)).view(B, L, N, D)
            x = x + self.audio_gate * a
        h = self.ffn(modulate(self.norm2(x), shift2, scale2))
        return x + gate2.unsqueeze(2) * h
