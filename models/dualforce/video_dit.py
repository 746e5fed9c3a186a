"""Video stream input/output: the conditioning channels, the reference tokens, (1,2,2) patches and the head.

Two roles, kept apart (DESIGN.md, model notes):
- **Context frames** (continuation): the input has 36 channels = 16 noisy latent + 4 mask + 16 given latent (Wan
  i2v layout). A frame whose content is really given (a user's frames, the end of a previous window) has its 4 mask
  channels = 1 and its clean latent in the last 16; every other frame has zeros there. `given_condition` builds it.
- **The reference** (identity): one clean latent with its own tokens at frame id masking.REFERENCE_FRAME (-1), embedded
  by the same patch embedding as a given frame plus a learned reference embedding, prepended to the video stream.
  Frame-causal masks make it visible to every frame (-1 <= t) while it sees only itself; with a KV cache it is
  computed once (model.DualForce.cache_reference).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from .modulation import modulate, to_weight_dtype


def given_condition(latents: torch.Tensor, given: Optional[torch.Tensor], mask_channels: int) -> torch.Tensor:
    """latents [B, C, n, h, w] (a given frame's own clean latent), given [B, n] bool or None -> [B, mask + C, n, h, w]."""
    B, C, n, h, w = latents.shape
    if given is None:
        return latents.new_zeros(B, mask_channels + C, n, h, w)
    g = given.to(latents.dtype)[:, None, :, None, None]  # [B, 1, n, 1, 1]
    return torch.cat([g.expand(B, mask_channels, n, h, w), latents * g], dim=1)


class VideoPatchEmbed(nn.Module):
    """[B, 36, L, h, w] -> tokens [B, L, (h/2)*(w/2), D]."""

    def __init__(self, in_channels: int, dim: int, patch: tuple[int, int, int]):
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv3d(in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, _, _, h, w = x.shape
        if h % self.patch[1] or w % self.patch[2]:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch {self.patch[1:]}")
        y = self.proj(x.to(self.proj.weight.dtype))  # [B, D, L, hp, wp]
        return y.flatten(3).permute(0, 2, 3, 1)


class ReferenceEmbed(nn.Module):
    """reference latent [B, C, 1, h, w] -> reference tokens [B, 1, N, D] (float32): the patch embedding of a clean,
    given frame plus a learned reference embedding, which tells it apart from a given context frame."""

    def __init__(self, dim: int, mask_channels: int):
        super().__init__()
        self.mask_channels = mask_channels
        self.embed = nn.Parameter(torch.zeros(dim))

    def forward(self, patch_embed: VideoPatchEmbed, reference_latent: torch.Tensor) -> torch.Tensor:
        B = reference_latent.shape[0]
        given = torch.ones(B, 1, dtype=torch.bool, device=reference_latent.device)
        cond = given_condition(reference_latent, given, self.mask_channels)
        return patch_embed(torch.cat([reference_latent, cond], dim=1)).float() + self.embed.float()


class VideoHead(nn.Module):
    """tokens [B, L, N, D] + frame embedding [B, L, D] -> velocity [B, C, L, h, w]; the projection starts at zero.

    A token's C*pt*ph*pw outputs are ordered (pt, ph, pw, C), as Wan's head: its weights transfer as they are
    (models/dualforce/wan_transfer.py). The comparison with diffusers' WanTransformer3DModel found ours ordered
    (C, ph, pw) before, which a copied head would have scrambled."""

    def __init__(self, dim: int, out_channels: int, patch: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.patch = patch
        self.out_channels = out_channels
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.proj = nn.Linear(dim, out_channels * patch[0] * patch[1] * patch[2])
        self.modulation = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, frame_emb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        shift, scale = (self.modulation.float() + frame_emb.float().unsqueeze(2)).unbind(2)
        y = self.proj(to_weight_dtype(modulate(self.norm(x), shift, scale), self.proj))  # [B, L, N, C*pt*ph*pw]
        B, L = y.shape[:2]
        hp, wp = grid
        _, ph, pw = self.patch
        y = y.view(B, L, hp, wp, ph, pw, self.out_channels)  # Wan's unpatchify order: (pt, ph, pw, C) per token
        return y.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, self.out_channels, L, hp * ph, wp * pw)
