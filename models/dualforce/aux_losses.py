"""The review's auxiliary losses on the struct stream, each optional with a weight (the ablations toggle them).

Both read the model's clean-struct estimate x0_hat = x_t - sigma * v_hat (flow matching), so they shape what the
struct stream predicts, not a separate output.

- Head-pose alignment (`pose_loss_weight`): x0_hat's pitch/yaw/roll rows against the pose check's independent
  estimate (FLAME when the clip has a tracker's file, else 68 landmarks + PnP; aligned to LivePortrait's frame by
  the clip's mean offset: shard member head_pose.npy), squared error in struct units (deg / 128), on frames the
  pose check kept, that have an estimate, and are not context. LivePortrait struct only: a FLAME struct's pose is
  that estimate already.
- Lip sync (`lipsync_loss_weight`): InfoNCE between each latent frame's audio window and its mouth features (the
  x0_hat columns of LivePortrait's lip keypoints' expression, or FLAME's expression + jaw), over every counted
  (sample, frame) pair of the batch: the positive is the frame's own audio, the negatives the other frames' (other
  times of the same clip, other clips). Two small projections (LipSyncHead) embed both sides; a frame counts when
  its struct rows are kept, its audio was not dropped, and it is not context.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.struct_layout import EXP, POSE, POSE_SCALE, STRUCT_DIM

LIP_KEYPOINTS = (6, 12, 14, 17, 19, 20)  # LivePortrait's "lip" animation region of its 21 implicit keypoints
FLAME_POSE_COLUMNS = 12  # a FLAME struct row ends with jaw, neck, global pose and translation (3 each)


def mouth_columns(struct_dim: int) -> list[int]:
    """Struct columns that move with the mouth: LivePortrait's lip-keypoint expression, or FLAME's expression + jaw."""
    if struct_dim == STRUCT_DIM:
        return [EXP.start + 3 * k + axis for k in LIP_KEYPOINTS for axis in range(3)]
    n_exp = struct_dim - FLAME_POSE_COLUMNS
    if n_exp < 1:
        raise ValueError(f"struct width {struct_dim} is neither LivePortrait's {STRUCT_DIM} nor a FLAME layout's")
    return list(range(n_exp + 3))  # expression coefficients, then the jaw pose


def pose_columns(struct_dim: int) -> list[int]:
    """Struct columns of the head's rotation: LivePortrait's pitch / yaw / roll, or FLAME's global pose."""
    if struct_dim == STRUCT_DIM:
        return list(range(POSE.start, POSE.stop))
    if struct_dim <= FLAME_POSE_COLUMNS:
        raise ValueError(f"struct width {struct_dim} is neither LivePortrait's {STRUCT_DIM} nor a FLAME layout's")
    return list(range(struct_dim - 6, struct_dim - 3))  # jaw, neck, global pose, translation: the third triple


class LipSyncHead(nn.Module):
    """audio windows [B, L, W, A] and mouth features [B, L, G*m] -> unit embeddings [B, L, d] each."""

    def __init__(self, audio_window: int, audio_dim: int, mouth_dim: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.audio_norm = nn.LayerNorm(audio_dim, eps=eps)
        self.audio_proj = nn.Sequential(nn.Linear(audio_window * audio_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.mouth_proj = nn.Sequential(nn.Linear(mouth_dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, audio_windows: torch.Tensor, mouth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.audio_proj[0].weight.dtype
        za = self.audio_proj(self.audio_norm(audio_windows.to(w)).flatten(2))
        zm = self.mouth_proj(mouth.to(w))
        return F.normalize(za.float(), dim=-1), F.normalize(zm.float(), dim=-1)


def info_nce(za: torch.Tensor, zm: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE over N pairs (za[i], zm[i]): [N, d] each, unit norm."""
    logits = zm @ za.T / temperature  # [N, N]
    target = torch.arange(len(za), device=za.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def head_pose_loss(x0_rows: torch.Tensor, head_pose_deg: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """x0_rows [B, T, 133] clean-struct estimate, head_pose_deg [B, T, 3] (NaN: none), counted [B, T] bool ->
    mean squared pose error in struct units over counted frames with an estimate (0 when there is none)."""
    has = counted & torch.isfinite(head_pose_deg).all(-1)
    target = torch.nan_to_num(head_pose_deg.float()) * POSE_SCALE
    err = (x0_rows[..., POSE].float() - target).pow(2).mean(-1)  # [B, T]
    return (err * has).sum() / has.sum().clamp_min(1)


def lipsync_loss(head: LipSyncHead, audio_windows: torch.Tensor, x0_groups: torch.Tensor, counted: torch.Tensor,
                 columns: list[int], temperature: float) -> torch.Tensor:
    """audio_windows [B, L, W, A], x0_groups [B, L, G, S], counted [B, L] bool -> InfoNCE over the counted frames
    (0 when fewer than two frames count: there is no negative)."""
    if int(counted.sum()) < 2:
        return x0_groups.sum() * 0.0
    mouth = x0_groups[..., columns].flatten(2)  # [B, L, G*m]
    za, zm = head(audio_windows, mouth)
    return info_nce(za[counted], zm[counted], temperature)
