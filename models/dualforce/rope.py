"""3D rotary position embedding (Wan split of the head dim: time d-4*(d//6), height and width 2*(d//6) each)."""
from __future__ import annotations

import torch


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    third = 2 * (head_dim // 6)
    return head_dim - 2 * third, third, third


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [N, 3] (frame, row, col) -> (cos, sin) each [N, head_dim/2], float32."""
    pos = positions.float()
    parts = []
    for axis, dim in enumerate(rope_axis_dims(head_dim)):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float32) / dim)
        parts.append(pos[:, axis, None] * inv_freq)
    angles = torch.cat(parts, dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [B, H, N, d] rotated pairwise (interleaved pairs) by the angles of its N tokens; computed in float32."""
    cos, sin = rope
    pairs = x.float().unflatten(-1, (-1, 2))  # [B, H, N, d/2, 2]
    a, b = pairs[..., 0], pairs[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).type_as(x)


def grid_positions(frames: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Token positions for frames [F] (absolute frame indices) of a rows x cols grid -> [F*rows*cols, 3]."""
    f, r, c = torch.meshgrid(
        frames, torch.arange(rows, device=frames.device), torch.arange(cols, device=frames.device), indexing="ij"
    )
    return torch.stack([f, r, c], dim=-1).reshape(-1, 3)
