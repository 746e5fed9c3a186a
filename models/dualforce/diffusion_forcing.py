"""Diffusion Forcing objective (flow matching) over both streams, with the schedules that match how it streams.

x_sigma = (1 - sigma) * x0 + sigma * eps, target v = eps - x0. sigma = shift(u) with u ~ uniform or logit-normal;
the struct stream's sigma is scaled into [0, sigma_struct_max] (inference starts the struct stream there).

Per-frame sigma (`noise_mode`): "per_frame" draws one per latent frame, "per_sample" one per sample (the fallback
the stability gate switches to). `sigma_order`: "independent" keeps the draws as they are (classic Diffusion
Forcing); "non_decreasing" sorts each sample's draws along time, so later frames are never cleaner than earlier
ones (SkyReels-V2's non-decreasing schedule, Diffusion Forcing's pyramid): the shape of streaming, where the past
is done and the future is noise.

Clean context (`clean_prefix_prob`): the sampler denoises frame t with frames < t already clean in its cache, a
situation independent draws almost never show (P(sigma < 0.05) is 1.75% per frame; three clean leading frames
~5e-6). With this probability a sample gets a prefix of k ~ U{1..L-1} leading latent frames as context: with
`given_prefix_prob` they are *given* frames (sigma 0, marked by the mask channels: a user's frames or a previous
window's end), otherwise *generated* context at a small context-noise level sigma ~ U[0, context_sigma_max] (what
the sampler's `context_noise` writes into its cache; SkyReels-V2's addnoise_condition=20 is sigma 0.02). Context
frames carry no loss: their velocity target is the noise itself.

Defaults: non_decreasing, clean_prefix_prob 0.5, given_prefix_prob 0.5, context_sigma_max 0.05 (the
references' choices; the learning check, benchmarks/learning_check.py, compares them with independent
draws). Condition dropout for classifier-free guidance: per sample, the audio features are zeroed with
`audio_drop_prob` and the reference latent with `reference_drop_prob` (independently); the sampler's null branches
use the same zeros.

Loss weights: per latent frame, w(sigma) (loss_weighting) times the keep weight from frames.keep_weights (a video
latent frame counts only if all its video frames are kept; a struct row counts iff its frame is kept), times
"not context". Each stream's loss is the weighted mean squared error over its counted elements.

A video-only batch (video_latents + reference_latent, no struct / audio / keep mask: general-video pretraining
shards) trains the video stream alone; struct_loss is then reported as 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from models.struct_layout import STRUCT_DIM

from .aux_losses import head_pose_loss, lipsync_loss, mouth_columns
from .frames import group_rows, keep_weights, num_latent_frames, tie_pad_rows, ungroup_rows

NOISE_MODES = ("per_frame", "per_sample")
SIGMA_ORDERS = ("independent", "non_decreasing")
SIGMA_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTINGS = ("none", "cosmap")


@dataclass
class DiffusionForcingConfig:
    noise_mode: str = "per_frame"
    sigma_order: str = "non_decreasing"
    clean_prefix_prob: float = 0.5
    given_prefix_prob: float = 0.5
    context_sigma_max: float = 0.05
    audio_drop_prob: float = 0.1
    reference_drop_prob: float = 0.1
    sigma_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 3.0  # sigma = shift*u / (1 + (shift-1)*u); 1 = no shift
    sigma_struct_max: float = 0.7
    loss_weighting: str = "none"  # "cosmap": SD3's w = 2 / (pi * (1 - 2s + 2s^2))
    video_loss_weight: float = 1.0
    struct_loss_weight: float = 1.0
    # the review's auxiliary losses (aux_losses.py); 0 = off, and then not even computed
    pose_loss_weight: float = 0.0
    lipsync_loss_weight: float = 0.0
    lipsync_temperature: float = 0.07

    def __post_init__(self) -> None:
        for name, value, allowed in (("noise_mode", self.noise_mode, NOISE_MODES),
                                     ("sigma_order", self.sigma_order, SIGMA_ORDERS),
                                     ("sigma_sampling", self.sigma_sampling, SIGMA_SAMPLINGS),
                                     ("loss_weighting", self.loss_weighting, LOSS_WEIGHTINGS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not 0.0 < self.sigma_struct_max <= 1.0:
            raise ValueError(f"sigma_struct_max must be in (0, 1], got {self.sigma_struct_max}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if self.pose_loss_weight < 0 or self.lipsync_loss_weight < 0 or self.lipsync_temperature <= 0:
            raise ValueError("aux loss weights must be >= 0 and lipsync_temperature > 0")
        for name in ("clean_prefix_prob", "given_prefix_prob", "context_sigma_max", "audio_drop_prob",
                     "reference_drop_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @classmethod
    def independent(cls, **overrides) -> "DiffusionForcingConfig":
        """Classic Diffusion Forcing: independent per-frame sigma, no clean prefix (the pre-v2 behaviour)."""
        return cls(**{"sigma_order": "independent", "clean_prefix_prob": 0.0, **overrides})


@dataclass
class SigmaDraw:
    video: torch.Tensor  # [B, L] sigma of the video stream
    struct: torch.Tensor  # [B, L] sigma of the struct stream, in [0, sigma_struct_max]
    context: torch.Tensor  # [B, L] bool: leading context frames (no loss)
    given: torch.Tensor  # [B, L] bool: context frames marked as given (sigma 0, mask channels 1)


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * u / (1 + (shift - 1) * u)


def _draw_u(cfg: DiffusionForcingConfig, shape: tuple[int, ...], generator, device) -> torch.Tensor:
    if cfg.sigma_sampling == "uniform":
        return torch.rand(shape, generator=generator, device=device)
    z = torch.randn(shape, generator=generator, device=device) * cfg.logit_std + cfg.logit_mean
    return torch.sigmoid(z)


def sample_sigmas(
    cfg: DiffusionForcingConfig, batch: int, frames: int, generator: Optional[torch.Generator] = None, device=None
) -> SigmaDraw:
    """Per-frame sigma of both streams with the configured order and clean-prefix mix (module docstring)."""
    draw_frames = frames if cfg.noise_mode == "per_frame" else 1
    u_video = _draw_u(cfg, (batch, draw_frames), generator, device).expand(batch, frames)
    u_struct = _draw_u(cfg, (batch, draw_frames), generator, device).expand(batch, frames)
    if cfg.sigma_order == "non_decreasing":
        u_video, u_struct = u_video.sort(dim=1).values, u_struct.sort(dim=1).values
    sigma_video = shift_sigma(u_video, cfg.shift)
    sigma_struct = cfg.sigma_struct_max * shift_sigma(u_struct, cfg.shift)
    # clean-prefix mix: always drawn (same random stream whatever the probabilities), applied where it falls
    has_prefix = torch.rand(batch, generator=generator, device=device) < cfg.clean_prefix_prob  # [B]
    given_prefix = torch.rand(batch, generator=generator, device=device) < cfg.given_prefix_prob  # [B]
    hi = max(frames - 1, 1)
    prefix_len = torch.randint(1, hi + 1, (batch,), generator=generator, device=device)  # [B] in 1..L-1
    context_sigma = torch.rand(batch, generator=generator, device=device) * cfg.context_sigma_max  # [B]
    positions = torch.arange(frames, device=device)[None, :]
    context = has_prefix[:, None] & (positions < prefix_len[:, None]) & (frames > 1)  # [B, L]
    given = context & given_prefix[:, None]
    level = torch.where(given_prefix, torch.zeros_like(context_sigma), context_sigma)[:, None].expand(batch, frames)
    sigma_video = torch.where(context, level, sigma_video)
    sigma_struct = torch.where(context, level.clamp(max=cfg.sigma_struct_max), sigma_struct)
    return SigmaDraw(sigma_video.contiguous(), sigma_struct.contiguous(), context, given)


def condition_dropout(cfg: DiffusionForcingConfig, batch: int, generator=None, device=None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(drop_audio [B] bool, drop_reference [B] bool), independent per sample."""
    drop_audio = torch.rand(batch, generator=generator, device=device) < cfg.audio_drop_prob
    drop_reference = torch.rand(batch, generator=generator, device=device) < cfg.reference_drop_prob
    return drop_audio, drop_reference


def _drop(x: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
    """Zero the samples of x [B, ...] where dropped [B] is True (the null condition of CFG)."""
    return x * (~dropped).to(x.dtype).view(-1, *([1] * (x.ndim - 1)))


def _aux_losses(model, batch, cfg: DiffusionForcingConfig, x0_struct: torch.Tensor, windows: torch.Tensor,
                context: torch.Tensor, frame_kept: torch.Tensor, drop_audio: torch.Tensor) -> dict[str, torch.Tensor]:
    """The auxiliary losses on the clean-struct estimate x0_struct [B, L, G, S]; zeros (not computed) at weight 0."""
    zero = x0_struct.new_zeros(())
    out = {"pose_loss": zero, "lipsync_loss": zero}
    S = x0_struct.shape[-1]
    if cfg.pose_loss_weight > 0:
        if "head_pose" not in batch:
            raise KeyError("pose_loss_weight > 0 needs head_pose in the batch: shards with head_pose.npy (preprocess "
                           "with pose_check v2 on LivePortrait motion)")
        if S != STRUCT_DIM:
            raise ValueError(f"the head-pose alignment loss reads LivePortrait's struct layout ({STRUCT_DIM} wide), "
                             f"not a {S}-wide FLAME layout (whose pose is that estimate already)")
        G = x0_struct.shape[2]
        rows_counted = ungroup_rows(~context[:, :, None].expand(-1, -1, G)[..., None]).squeeze(-1)  # [B, T]
        rows_counted = rows_counted & batch["keep_mask"].to(rows_counted.device).bool()
        out["pose_loss"] = head_pose_loss(ungroup_rows(x0_struct), batch["head_pose"].to(x0_struct.device),
                                          rows_counted)
    if cfg.lipsync_loss_weight > 0:
        head = getattr(model, "lipsync_head", None)
        if head is None:
            raise ValueError("lipsync_loss_weight > 0 needs a model with a lip-sync head (lipsync_embed_dim > 0)")
        counted = frame_kept & ~context & ~drop_audio[:, None]  # [B, L]
        out["lipsync_loss"] = lipsync_loss(head, windows, x0_struct, counted, mouth_columns(S),
                                           cfg.lipsync_temperature)
    return out


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
    draw = sample_sigmas(cfg, B, L, generator, device)
    _, drop_reference = condition_dropout(cfg, B, generator, device)
    sigma_v = draw.video
    eps_v = torch.randn(x0_video.shape, generator=generator, device=device)
    sv = sigma_v[:, None, :, None, None]
    reference = _drop(batch["reference_latent"].float(), drop_reference)
    pred_v, _ = model((1 - sv) * x0_video + sv * eps_v, sigma_v, None, None, reference, None, given=draw.given)
    err_v = (pred_v.float() - (eps_v - x0_video)).pow(2).mean(dim=(1, 3, 4))  # [B, L]
    counted = (~draw.context).float()
    video_loss = (counted * sigma_loss_weight(sigma_v, cfg.loss_weighting) * err_v).sum() / counted.sum().clamp_min(1.0)
    zero = video_loss.new_zeros(())
    return {"loss": cfg.video_loss_weight * video_loss, "video_loss": video_loss.detach(), "struct_loss": zero,
            "sigma_video": sigma_v, "sigma_struct": None, "context": draw.context, "given": draw.given,
            "drop_reference": drop_reference, "video_frames_counted": counted.sum(), "struct_rows_counted": zero}


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

    draw = sample_sigmas(cfg, B, L, generator, device)
    drop_audio, drop_reference = condition_dropout(cfg, B, generator, device)
    sigma_v, sigma_s = draw.video, draw.struct
    eps_v = torch.randn(x0_video.shape, generator=generator, device=device)
    eps_s = tie_pad_rows(torch.randn(x0_struct.shape, generator=generator, device=device))  # pad rows = real row
    sv = sigma_v[:, None, :, None, None]
    ss = sigma_s[:, :, None, None]
    xt_video = (1 - sv) * x0_video + sv * eps_v
    xt_struct = (1 - ss) * x0_struct + ss * eps_s

    windows = model.audio_windows(batch["audio_features"].float())  # [B, L, W, A]
    pred_v, pred_s = model(
        xt_video, sigma_v, xt_struct, sigma_s, _drop(batch["reference_latent"].float(), drop_reference),
        _drop(windows, drop_audio), given=draw.given,
    )
    aux = _aux_losses(model, batch, cfg, xt_struct - ss * pred_s.float(), windows, draw.context,
                      video_keep > 0, drop_audio)
    not_context = (~draw.context).float()  # [B, L]
    video_keep = video_keep * not_context
    struct_keep = struct_keep * not_context[:, :, None]
    err_v = (pred_v.float() - (eps_v - x0_video)).pow(2).mean(dim=(1, 3, 4))  # [B, L]
    err_s = (pred_s.float() - (eps_s - x0_struct)).pow(2).mean(dim=-1)  # [B, L, G]
    w_v = video_keep * sigma_loss_weight(sigma_v, cfg.loss_weighting)
    w_s = struct_keep * sigma_loss_weight(sigma_s, cfg.loss_weighting)[:, :, None]
    video_loss = (w_v * err_v).sum() / video_keep.sum().clamp_min(1.0)
    struct_loss = (w_s * err_s).sum() / struct_keep.sum().clamp_min(1.0)
    loss = cfg.video_loss_weight * video_loss + cfg.struct_loss_weight * struct_loss
    loss = loss + cfg.pose_loss_weight * aux["pose_loss"] + cfg.lipsync_loss_weight * aux["lipsync_loss"]
    return {
        "loss": loss,
        "video_loss": video_loss.detach(),
        "struct_loss": struct_loss.detach(),
        "pose_loss": aux["pose_loss"].detach(),
        "lipsync_loss": aux["lipsync_loss"].detach(),
        "sigma_video": sigma_v,
        "sigma_struct": sigma_s,
        "context": draw.context,
        "given": draw.given,
        "drop_audio": drop_audio,
        "drop_reference": drop_reference,
        "video_frames_counted": video_keep.sum(),
        "struct_rows_counted": struct_keep.sum(),
    }
