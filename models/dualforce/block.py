"""One DiT block, shared by the video and the struct stream (Wan layout, per-frame modulation).

x [B, L, N, D] -> self-attention (3D RoPE, block-causal over frames, KV cache) -> gated cross-attention to the
frame's own audio tokens (zero-initialised gate) -> FFN. Shift/scale/gate come per frame from the dual AdaLN.
The residual stream x, the modulation and the gated residual adds are float32; the attention and FFN matmuls run
in the weights' dtype (bf16 in training), see modulation.py. The per-block modulation table starts at zero
(AdaLN-Zero), so a fresh block is the identity.

A block built with audio_token_dim=None has no audio path at all (the video-only pretraining model): its
parameters are exactly the ones the full model's block shares with it. When the audio tokens cover fewer frames
than x (the video stream's leading reference frame has no audio), the audio path updates the last frames only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import Attention, Rope
from .kv_cache import KVCache
from .masking import FrameMask
from .modulation import modulate, norm_fp32, to_weight_dtype


class DiTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ffn_dim: int, audio_token_dim: Optional[int], qk_norm: bool = True,
                 eps: float = 1e-6, attention_backend: str = "sdpa"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = Attention(dim, heads, qk_norm=qk_norm, eps=eps, backend=attention_backend)
        self.has_audio = audio_token_dim is not None
        if self.has_audio:
            self.norm_audio = nn.LayerNorm(dim, eps=eps)
            self.audio_attn = Attention(dim, heads, kv_dim=audio_token_dim, qk_norm=qk_norm, eps=eps)
            self.audio_gate = nn.Parameter(torch.zeros(dim))  # zero-init gated residual: audio path is a no-op at init
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(6, dim))  # per-block table added to the frame mods (AdaLN-Zero)

    def forward(
        self,
        x: torch.Tensor,  # [B, L, N, D] float32 residual stream
        mods: torch.Tensor,  # [B, L, 6, D] float32 timestep + audio modulation per frame
        audio_tokens: Optional[torch.Tensor],  # [B, La, Na, Da], La <= L (the last La frames); None: no audio path
        rope: Rope,
        mask: Optional[FrameMask],
        cache: Optional[KVCache] = None,
        cache_name: str = "",
    ) -> torch.Tensor:
        B, L, N, D = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = (mods.float() + self.modulation.float()).unbind(2)  # [B, L, D]
        h = to_weight_dtype(modulate(self.norm1(x), shift1, scale1).flatten(1, 2), self.self_attn.q)
        h = self.self_attn(h, q_rope=rope, k_rope=rope, mask=mask, cache=cache, cache_name=cache_name)
        x = x + gate1.unsqueeze(2) * h.float().view(B, L, N, D)
        if self.has_audio and audio_tokens is not None:  # each frame's tokens attend to that frame's own audio tokens
            La = audio_tokens.shape[1]
            tail = x[:, L - La:]
            q = to_weight_dtype(norm_fp32(self.norm_audio, tail).flatten(0, 1), self.audio_attn.q)  # [B*La, N, D]
            a = self.audio_attn(q, context=to_weight_dtype(audio_tokens.flatten(0, 1), self.audio_attn.k))
            tail = tail + self.audio_gate.float() * a.float().view(B, La, N, D)
            x = tail if La == L else torch.cat([x[:, : L - La], tail], dim=1)
        h = self.ffn(to_weight_dtype(modulate(self.norm2(x), shift2, scale2), self.ffn[0]))
        return x + gate2.unsqueeze(2) * h.float()
