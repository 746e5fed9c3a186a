"""Video frames <-> latent frames: how per-video-frame rows (struct, audio, keep mask) map onto latent frames.

The causal Wan VAE turns T = 4(L-1)+1 video frames into L latent frames: latent frame 0 holds video frame 0 alone,
latent frame j >= 1 holds video frames 4j-3 .. 4j. Per-video-frame rows are regrouped into G = 4 rows per latent
frame. Latent frame 0 has a single real row; it is front-padded to G rows by repeating row 0, and the pad rows are
marked invalid so no loss falls on them (`struct_row_valid`). They stay tied to the real row wherever a struct
group of frame 0 is noised or denoised (`tie_pad_rows`: the same noise in training, the same value at every sampler
step), so the model never integrates an untrained velocity into them. Rows never move across a latent-frame boundary, so
anything computed per latent frame from these groups sees no future video frames.
"""
from __future__ import annotations

import torch

from models.latent_geometry import VAE_TIME_STRIDE


def num_latent_frames(video_frames: int, stride: int = VAE_TIME_STRIDE) -> int:
    if video_frames < 1 or (video_frames - 1) % stride:
        raise ValueError(f"video frame count must be {stride}n+1, got {video_frames}")
    return (video_frames - 1) // stride + 1


def video_frames_of(latent_index: int, stride: int = VAE_TIME_STRIDE) -> range:
    """Video frames packed into one latent frame."""
    return range(0, 1) if latent_index == 0 else range(stride * latent_index - stride + 1, stride * latent_index + 1)


def _front_pad(rows: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    # rows: [B, T, ...] -> [B, pad + T, ...]
    if pad == 0:
        return rows
    if mode == "repeat":
        head = rows[:, :1].expand(-1, pad, *rows.shape[2:])
    else:
        head = rows.new_zeros(rows.shape[0], pad, *rows.shape[2:])
    return torch.cat([head, rows], dim=1)


def group_rows(rows: torch.Tensor, stride: int = VAE_TIME_STRIDE) -> torch.Tensor:
    """[B, T, D] per video frame -> [B, L, G, D] per latent frame (frame 0 front-padded by repeating row 0)."""
    if rows.ndim != 3:
        raise ValueError(f"expected per-frame rows [B, T, D], got shape {tuple(rows.shape)}")
    L = num_latent_frames(rows.shape[1], stride)
    padded = _front_pad(rows, stride - 1, "repeat")  # [B, 4L, D]
    return padded.reshape(rows.shape[0], L, stride, rows.shape[2])


def ungroup_rows(grouped: torch.Tensor) -> torch.Tensor:
    """[B, L, G, D] -> [B, T, D], dropping the pad rows of latent frame 0."""
    B, L, G, D = grouped.shape
    return grouped.reshape(B, L * G, D)[:, G - 1 :]


def tie_pad_rows(grouped: torch.Tensor, frame_offset: int = 0) -> torch.Tensor:
    """[B, n, G, S] groups of latent frames offset..offset+n -> the same with frame 0's pad rows (0..G-2) set to its
    real row (G-1); a copy when frame 0 is among them, else the input itself."""
    if frame_offset != 0:
        return grouped
    tied = grouped.clone()
    tied[:, 0, :-1] = grouped[:, 0, -1:]
    return tied


def struct_row_valid(latent_frames: int, stride: int = VAE_TIME_STRIDE, device=None) -> torch.Tensor:
    """[L, G] bool: False for the pad rows of latent frame 0."""
    valid = torch.ones(latent_frames, stride, dtype=torch.bool, device=device)
    valid[0, : stride - 1] = False
    return valid


def keep_weights(keep_mask: torch.Tensor, stride: int = VAE_TIME_STRIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss weights from a per-video-frame keep mask [B, T] bool.

    Returns (video [B, L] float, struct [B, L, G] float). A struct row counts iff its video frame is kept (and is not
    a pad row). A latent frame's video loss counts iff EVERY video frame packed into it is kept: the latent mixes its
    4 frames, so a partially dropped group cannot be trained on without training on the dropped frame.
    """
    if keep_mask.ndim != 2:
        raise ValueError(f"keep_mask must be [B, T], got shape {tuple(keep_mask.shape)}")
    keep = keep_mask.bool()
    grouped = group_rows(keep.unsqueeze(-1), stride).squeeze(-1)  # [B, L, G]; pads repeat frame 0
    valid = struct_row_valid(grouped.shape[1], stride, keep.device)
    struct_w = (grouped & valid).float()
    video_w = grouped.all(dim=-1).float()  # pads repeat frame 0, so frame 0's weight is keep[0]
    return video_w, struct_w


def audio_windows(audio: torch.Tensor, context: int, stride: int = VAE_TIME_STRIDE) -> torch.Tensor:
    """[B, T, A] per video frame -> [B, L, W, A] causal windows, W = stride + context.

    Window j covers video frames 4j-3-context .. 4j (its own frames and `context` past ones); frames before the
    clip start are zeros. It never reaches past latent frame j's own last video frame.
    """
    if audio.ndim != 3:
        raise ValueError(f"expected audio features [B, T, A], got shape {tuple(audio.shape)}")
    L = num_latent_frames(audio.shape[1], stride)
    W = stride + context
    padded = _front_pad(audio, W - 1, "zeros")  # [B, W-1+T, A]; padded row i = video frame i-(W-1)
    # window j ends at video frame 4j -> padded index 4j + W - 1; starts W-1 earlier
    windows = padded.unfold(1, W, stride)  # [B, L', A, W] for starts 0, 4, 8, ...
    return windows[:, :L].permute(0, 1, 3, 2).contiguous()
