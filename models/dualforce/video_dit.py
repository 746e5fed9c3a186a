"""Video stream input/output: Wan i2v conditioning, (1,2,2) patch embedding and the per-frame modulated head.

Conditioning (Wan i2v convention): the input has 36 channels = 16 noisy latent + 4 mask + 16 reference latent.
The reference latent sits at latent frame 0 with its 4 mask channels = 1; every other frame has mask 0 and a zero
reference. Frames are addressed by absolute index, so a chunk that does not contain frame 0 carries no reference
(it reaches the reference through attention to the cached frame 0).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .modulation import modulate


def reference_condition(reference_latent: torch.Tensor, frames: int, frame_offset: int, mask_channels: int) -> torch.Tensor:
    """reference [B, C, 1, h, w] -> [B, mask_channels + C, frames, h, w] for absolute frames offset..offset+frames."""
    B, C, _, h, w = reference_latent.shape
    cond = reference_latent.new_zeros(B, mask_channels + C, frames, h, w)
    if frame_offset == 0:
        cond[:, :mask_channels, 0] = 1.0
        cond[:, mask_channels:, 0] = reference_latent[:, :, 0]
    return cond


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
        y = self.proj(x)  # [B, D, L, hp, wp]
        return y.flatten(3).permute(0, 2, 3, 1)


class VideoHead(nn.Module):
    """tokens [B, L, N, D] + frame embedding [B, L, D] -> velocity [B, C, L, h, w]."""

    def __init__(self, dim: int, out_channels: int, patch: tuple[int, int, int], eps: float = 1e-6):
        super().__init__()
        self.patch = patch
        self.out_channels = out_channels
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.proj = nn.Linear(dim, out_channels * patch[0] * patch[1] * patch[2])
        self.modulation = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, frame_emb: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        shift, scale = (self.modulation + frame_emb.unsqueeze(2)).unbind(2)
        y = self.proj(modulate(self.norm(x), shift, scale))  # [B, L, N, C*pt*ph*pw]
        B, L = y.shape[:2]
        hp, wp = grid
        _, ph, pw = self.patch
        y = y.view(B, L, hp, wp, self.out_channels, ph, pw)
        return y.permute(0, 4, 1, 2, 5, 3, 6).reshape(B, self.out_channels, L, hp * ph, wp * pw)
