"""Test-only stand-in for models.dualforce (same three names, same signatures) while that branch lands.

A tiny two-stream denoiser with per-frame noise levels: enough to exercise the trainer's plumbing
(gradients, dropout RNG, noise generator, optimizer state), not a model of anything.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DiffusionForcingConfig:
    noise_mode: str = "per_frame"  # or "per_sample"
    struct_weight: float = 1.0


class TinyTwoStream(nn.Module):
    def __init__(self, audio_dim: int, struct_dim: int, channels: int = 16, hidden: int = 32):
        super().__init__()
        self.video = nn.Sequential(nn.Conv3d(channels * 2 + 1, hidden, 1), nn.GELU(), nn.Conv3d(hidden, channels, 1))
        self.struct = nn.Sequential(nn.Linear(struct_dim + audio_dim + 1, hidden), nn.GELU(), nn.Dropout(0.1))
        self.struct_out = nn.Linear(hidden, struct_dim)

    def forward(self, noisy_video, reference, video_sigma, noisy_struct, audio, struct_sigma):
        B, C, L, h, w = noisy_video.shape
        ref = reference.expand(B, C, L, h, w)
        sig = video_sigma[:, None, :, None, None].expand(B, 1, L, h, w)
        video = self.video(torch.cat([noisy_video, ref, sig], dim=1))  # [B, C, L, h, w]
        struct = self.struct_out(self.struct(torch.cat([noisy_struct, audio, struct_sigma[..., None]], dim=-1)))
        return video, struct


def build_model(variant: str = "tiny", audio_dim: int = 32, struct_dim: int = 133) -> nn.Module:
    if variant != "tiny":
        raise ValueError(f"test stand-in only builds 'tiny', got {variant!r}")
    return TinyTwoStream(audio_dim, struct_dim)


def diffusion_forcing_loss(model, batch, cfg: DiffusionForcingConfig, generator=None) -> dict:
    video = batch["video_latents"]  # [B, 16, L, h, w]
    struct = batch["struct"]  # [B, T, 133]
    B, _, L = video.shape[:3]
    T = struct.shape[1]
    shape_v = (B, L) if cfg.noise_mode == "per_frame" else (B, 1)
    sigma_v = torch.rand(shape_v, generator=generator, device=video.device).expand(B, L)
    sigma_s = torch.rand((B, 1), generator=generator, device=video.device).expand(B, T)
    noise_v = torch.randn(video.shape, generator=generator, device=video.device)
    noise_s = torch.randn(struct.shape, generator=generator, device=video.device)
    noisy_v = (1 - sigma_v[:, None, :, None, None]) * video + sigma_v[:, None, :, None, None] * noise_v
    noisy_s = (1 - sigma_s[..., None]) * struct + sigma_s[..., None] * noise_s
    pred_v, pred_s = model(noisy_v, batch["reference_latent"], sigma_v, noisy_s, batch["audio_features"], sigma_s)
    video_loss = ((pred_v - (noise_v - video)) ** 2).mean()
    mask = batch["keep_mask"][..., None].to(pred_s.dtype)
    struct_loss = (((pred_s - (noise_s - struct)) ** 2) * mask).sum() / (mask.sum() * struct.shape[-1]).clamp(min=1)
    loss = video_loss + cfg.struct_weight * struct_loss
    return {"loss": loss, "video_loss": video_loss.detach(), "struct_loss": struct_loss.detach()}
