"""The extractors' GPU precision: bf16 autocast on CUDA, float32 elsewhere.

HuBERT and the LivePortrait motion extractor are run in reduced precision by their own users (LivePortrait's
inference config defaults to half precision); under autocast the matmuls and convolutions run in bf16 while
norms and reductions stay float32, and outputs are returned float32. The Wan VAE is not put under it (models/
wan_vae.py: diffusers' Wan pipelines keep it float32).
"""
from __future__ import annotations

import contextlib

import torch


def extractor_autocast(device: torch.device, bf16: bool = True):
    """A bf16 autocast context on CUDA when `bf16`, else a no-op."""
    if bf16 and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def extractor_precision(device: torch.device, bf16: bool = True) -> str:
    """What extractor_autocast runs at on `device`: recorded beside the features it makes."""
    return "bf16-autocast" if bf16 and torch.device(device).type == "cuda" else "fp32"
