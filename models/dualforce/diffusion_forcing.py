"""Diffusion Forcing objective (flow matching) over both streams.

x_sigma = (1 - sigma) * x0 + sigma * eps, target v = eps - x0. Every latent frame draws its own sigma, independently
for the video and the struct stream ("per_frame"); "per_sample" draws one sigma per sample per stream (the fallback
the stability gate switches to). sigma = shift(u) with u ~ uniform or logit-normal; the struct stream's sigma is
scaled into [0, sigma_struct_max] (inference starts the struct stream at that level, see sampler.py).

Loss weights: per latent frame, w(sigma) (loss_weighting) times the keep weight from frames.keep_weights (a video
latent frame counts only if all its video frames are kept; a struct row counts iff its frame is kept). Each stream's
loss is the weighted mean squared error over its counted elements.

A video-only batch (video_latents + reference_latent, no struct / audio / keep mask: general-video pretraining
shards) trains the video stream alone; struct_loss is then reported as 0 and every latent frame counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .frames import group_rows, keep_weights, num_latent_frames

NOISE_MODES = ("per_frame", "per_sample")
SIGMA_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "cosmap")


@dataclass
class DiffusionForcingConfig:
    noise_mode: str = "per_frame"
    sigma_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0  # sigma = shift*u / (1 + (shift-1)*u); 1 = no shift
    sigma_struct_max: float = 0.7
    loss_weighting: str = "none"  # "cosmap": SD3's w = 2 / (pi * (1 - 2s + 2s^2))
    video_loss_weight: float = 1.0
    struct_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if self.noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {self.noise_mode!r}")
        if self.sigma_sampling not in SIGMA_SAMPLINGS:
            raise ValueError(f"sigma_sampling must be one of {SIGMA_SAMPLINGS}, got {self.sigma_sampling!r}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {self.loss_weighting!r}")
        if not 0.0 < self.sigma_struct_max <= 1.0:
            raise ValueError(f"sigma_struct_max must be in (0, 1], got {self.sigma_struct_max}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def _draw_u(cfg: DiffusionForcingConfig, shape: tuple[int, ...], generator, device) -> torch.Tensor:
    if cfg.sigma_sampling == "uniform":
        return torch.rand(shape, generator=generator, device=device)
    z = torch.randn(shape, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
    return torch.sigmoid(z)


def sample_sigmas(
    cfg: DiffusionForcingConfig, batch: int, frames: int, generator: Optional[torch.Generator] = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_video [B, L], sigma_struct [B, L]); struct values lie in [0, sigma_struct_max]."""
    draw_frames = frames if cfg.noise_mode == "per_frame" else 1
    u_video = _draw_u(cfg, (batch, draw_frames), generator, device)
    u_struct = _draw_u(cfg, (batch, draw_frames), generator, device)
    sigma_video = shift_sigma(u_video, cfg.shift).expand(batch, frames)
    sigma_struct = (cfg.sigma_struct_max * shift_sigma(u_struct, cfg.shift)).expand(batch, frames)
    return sigma_video.contiguous(), sigma_struct.contiguous()


def sigma_loss_weight(sigma: torch.Tensor, weighting: str) -> torch.Tensor:
    if weighting == "none":
        return torch.ones_like(sigma)
    return 2.0 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))


REQUIRED_KEYS = ("video_latents", "reference_latent", "struct", "audio_features", "keep_mask")
VIDEO_ONLY_KEYS = ("video_latents", "reference_latent")


def video_only_loss(model, batch: dict[str, torch.Tensor], cfg: DiffusionForcingConfig,
                    generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """Diffusion Forcing of the video stream alone (video_latents [B,16,L,h,w], reference_latent [B,16,1,h,w])."""
    missing = [k for k in VIDEO_ONLY_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {', '.join(missing)}")
    x0_video = batch["video_latents"].float()
    B, _, L, _, _ = x0_video.shape
    device = x0_video.device
    sigma_v, _ = sample_sigmas(cfg, B, L, generator, device)
    eps_v = torch.randn(x0_video.shape, generator=generator, device=device)
    sv = sigma_v[:, None, :, None, None]
    pred_v, _ = model((1 - sv) * x0_video + sv * eps_v, sigma_v, None, None, batch["reference_latent"].float(), None)
    err_v = (pred_v.float() - (eps_v - x0_video)).pow(2).mean(dim=(1, 3, 4))  # [B, L]
    video_loss = (sigma_loss_weight(sigma_v, cfg.loss_weighting) * err_v).mean()
    zero = video_loss.new_zeros(())
    return {"loss": cfg.video_loss_weight * video_loss, "video_loss": video_loss.detach(), "struct_loss": zero,
            "sigma_video": sigma_v, "sigma_struct": None, "video_frames_counted": video_loss.new_tensor(B * L),
            "struct_rows_counted": zero}


def diffusion_forcing_loss(
    model, batch: dict[str, torch.Tensor], cfg: DiffusionForcingConfig, generator: Optional[torch.Generator] = None
) -> dict[str, torch.Tensor]:
    """One Diffusion Forcing step's losses: "loss" (to backprop), "video_loss", "struct_loss", and the sigmas drawn.

    batch: video_latents [B,16,L,h,w], reference_latent [B,16,1,h,w], struct [B,T,S], audio_features [B,T,A],
    keep_mask [B,T] bool, with T = 4(L-1)+1. A batch without struct goes to video_only_loss.
    """
    if "struct" not in batch:
        return video_only_loss(model, batch, cfg, generator)
    missing = [k for k in REQUIRED_KEYS if k not in batch]
    if missing:
        raise KeyError(f"batch is missing {', '.join(missing)}")
    x0_video = batch["video_latents"].float()
    B, _, L, _, _ = x0_video.shape
    T = batch["struct"].shape[1]
    if num_latent_frames(T) != L:
        raise ValueError(f"struct has {T} video frames, which make {num_latent_frames(T)} latent frames, not {L}")
    for key in ("audio_features", "keep_mask"):
        if tuple(batch[key].shape[:2]) != (B, T):
            raise ValueError(f"{key} must start with [B={B}, T={T}], got {tuple(batch[key].shape)}")
    device = x0_video.device
    x0_struct = group_rows(batch["struct"].float())  # [B, L, G, S]
    video_keep, struct_keep = keep_weights(batch["keep_mask"].to(device))  # [B, L], [B, L, G]

    sigma_v, sigma_s = sample_sigmas(cfg, B, L, generator, device)
    eps_v = torch.randn(x0_video.shape, generator=generator, device=device)
    eps_s = torch.randn(x0_struct.shape, generator=generator, device=device)
    sv = sigma_v[:, None, :, None, None]
    ss = sigma_s[:, :, None, None]
    xt_video = (1 - sv) * x0_video + sv * eps_v
    xt_struct = (1 - ss) * x0_struct + ss * eps_s

    pred_v, pred_s = model(
        xt_video, sigma_v, xt_struct, sigma_s, batch["reference_latent"].float(),
        model.audio_windows(batch["audio_features"].float()),
    )
    err_v = (pred_v.float() - (eps_v - x0_video)).pow(2).mean(dim=(1, 3, 4))  # [B, L]
    err_s = (pred_s.float() - (eps_s - x0_struct)).pow(2).mean(dim=-1)  # [B, L, G]
    w_v = video_keep * sigma_loss_weight(sigma_v, cfg.loss_weighting)
    w_s = struct_keep * sigma_loss_weight(sigma_s, cfg.loss_weighting)[:, :, None]
    video_loss = (w_v * err_v).sum() / video_keep.sum().clamp_min(1.0)
    struct_loss = (w_s * err_s).sum() / struct_keep.sum().clamp_min(1.0)
    loss = cfg.video_loss_weight * video_loss + cfg.struct_loss_weight * struct_loss
    return {
        "loss": loss,
        "video_loss": video_loss.detach(),
        "struct_loss": struct_loss.detach(),
        "sigma_video": sigma_v,
        "sigma_struct": sigma_s,
        "video_frames_counted": video_keep.sum(),
        "struct_rows_counted": struct_keep.sum(),
    }
