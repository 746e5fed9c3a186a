"""Audio projector: causal windows of HuBERT features (25 fps, one row per video frame) -> per-frame audio tokens.

Each latent frame gets `audio_tokens_per_frame` tokens and one pooled vector (for the audio AdaLN branch), computed
from its own window only (frames.audio_windows: its own video frames plus past context, never future frames).
"""
from __future__ import annotations

import torch
import torch.nn as nn


class AudioProjector(nn.Module):
    def __init__(self, audio_dim: int, window: int, tokens: int, dim: int, eps: float = 1e-6):
        super().__init__()
        self.audio_dim = audio_dim
        self.window = window
        self.tokens = tokens
        self.row_norm = nn.LayerNorm(audio_dim, eps=eps)
        self.mlp = nn.Sequential(nn.Linear(window * audio_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, tokens * dim))
        self.token_embed = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.out_norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """windows [B, L, W, A] -> tokens [B, L, tokens, dim], pooled [B, L, dim]."""
        if windows.ndim != 4 or windows.shape[2:] != (self.window, self.audio_dim):
            raise ValueError(
                f"audio windows must be [B, L, {self.window}, {self.audio_dim}], got {tuple(windows.shape)}"
            )
        rows = self.row_norm(windows.to(self.mlp[0].weight.dtype))
        tokens = self.mlp(rows.flatten(2)).unflatten(-1, (self.tokens, -1)) + self.token_embed
        tokens = self.out_norm(tokens)
        return tokens, tokens.mean(dim=2)
