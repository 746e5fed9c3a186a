"""Bridge: bidirectional, frame-causal cross-attention between video and struct tokens, zero-gated residuals.

Both directions read the states from before the bridge (symmetric update). A query of frame t sees the other
stream's tokens of frames <= t only. Queries and keys get a temporal-only RoPE (frame index), so a token can tell
its own frame's partner tokens from past ones. Gates start at zero: at init the bridge changes nothing.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .attention import Attention, Rope
from .kv_cache import KVCache
from .masking import FrameMask
from .modulation import norm_fp32, to_weight_dtype


class Bridge(nn.Module):
    def __init__(self, video_dim: int, video_heads: int, struct_dim: int, struct_heads: int, qk_norm: bool = True,
                 eps: float = 1e-6, two_way: bool = True, backend: str = "sdpa"):
        """two_way=False: the one-way bridge of the review's ablation -- video reads struct, struct reads nothing
        back (no video_to_struct attention, struct passes through unchanged)."""
        super().__init__()
        self.norm_video = nn.LayerNorm(video_dim, eps=eps)
        self.norm_struct = nn.LayerNorm(struct_dim, eps=eps)
        self.struct_to_video = Attention(video_dim, video_heads, kv_dim=struct_dim, qk_norm=qk_norm, eps=eps,
                                         backend=backend)
        self.video_gate = nn.Parameter(torch.zeros(video_dim))
        self.video_to_struct = self.struct_gate = None
        if two_way:
            self.video_to_struct = Attention(struct_dim, struct_heads, kv_dim=video_dim, qk_norm=qk_norm, eps=eps,
                                             backend=backend)
            self.struct_gate = nn.Parameter(torch.zeros(struct_dim))

    def forward(
        self,
        xv: torch.Tensor,  # [B, L, Nv, Dv]
        xs: torch.Tensor,  # [B, L, Ns, Ds]
        ropes: dict[str, Rope],  # "v_in_v", "s_in_v" (video head dim), "s_in_s", "v_in_s" (struct head dim)
        masks: dict[str, Optional[FrameMask]],  # "s2v" [Nv, Ns_keys], "v2s" [Ns, Nv_keys]
        cache: Optional[KVCache] = None,
        cache_name: str = "",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hv = to_weight_dtype(norm_fp32(self.norm_video, xv).flatten(1, 2), self.struct_to_video.q)
        hs = to_weight_dtype(norm_fp32(self.norm_struct, xs).flatten(1, 2), self.struct_to_video.q)
        dv = self.struct_to_video(
            hv, hs, q_rope=ropes["v_in_v"], k_rope=ropes["s_in_v"], mask=masks["s2v"],
            cache=cache, cache_name=f"struct:{cache_name}.s2v",  # keys: struct tokens
        )
        if self.video_to_struct is None:  # one way: struct is read, never written
            return xv + self.video_gate.float() * dv.float().view_as(xv), xs
        ds = self.video_to_struct(
            hs, hv, q_rope=ropes["s_in_s"], k_rope=ropes["v_in_s"], mask=masks["v2s"],
            cache=cache, cache_name=f"bridge_video:{cache_name}.v2s",  # keys: real frames' video tokens
        )
        # gated residual adds in float32 (modulation.py)
        return (xv + self.video_gate.float() * dv.float().view_as(xv),
                xs + self.struct_gate.float() * ds.float().view_as(xs))
