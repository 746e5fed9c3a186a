"""Struct stream input/output: a latent frame's G=4 struct rows (frames.group_rows) <-> n struct tokens."""
from __future__ import annotations

import torch
import torch.nn as nn

from .modulation import modulate, to_weight_dtype


class StructEmbed(nn.Module):
    """[B, L, G, S] -> tokens [B, L, n, D] (float32: the residual stream)."""

    def __init__(self, rows: int, struct_dim: int, tokens: int, dim: int):
        super().__init__()
        self.rows, self.struct_dim, self.tokens = rows, struct_dim, tokens
        self.proj = nn.Linear(rows * struct_dim, tokens * dim)
        self.token_embed = nn.Parameter(torch.randn(tokens, dim) * 0.02)

    def forward(self, struct: torch.Tensor) -> torch.Tensor:
        if struct.ndim != 4 or struct.shape[2:] != (self.rows, self.struct_dim):
            raise ValueError(f"grouped struct must be [B, L, {self.rows}, {self.struct_dim}], got {tuple(struct.shape)}")
        tokens = self.proj(to_weight_dtype(struct.flatten(2), self.proj)).unflatten(-1, (self.tokens, -1))
        return tokens.float() + self.token_embed.float()


class StructHead(nn.Module):
    """tokens [B, L, n, D] + frame embedding [B, L, D] -> velocity [B, L, G, S]; the projection starts at zero."""

    def __init__(self, rows: int, struct_dim: int, tokens: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.rows, self.struct_dim = rows, struct_dim
        self.norm = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.proj = nn.Linear(tokens * dim, rows * struct_dim)
        self.modulation = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        nn.init.zeros_(self.proj.weight)  # zero-initialised output head: velocity 0 at init
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, frame_emb: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + frame_emb.float().unsqueeze(2)).unbind(2)
        y = self.proj(to_weight_dtype(modulate(self.norm(x), shift, scale).flatten(2), self.proj))
        return y.unflatten(-1, (self.rows, self.struct_dim))
