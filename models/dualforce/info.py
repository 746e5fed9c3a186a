"""Size report: parameters per module and FLOPs of one training step, measured on the meta device (no weights).

FLOPs come twice: as torch's counter sees them (attention dense, as SDPA with a boolean mask computes it) and
block-sparse, as FlexAttention computes it: every attention call's dense work (QK^T and AV, forward 2 matmuls,
backward 4: 12 FLOPs per multiply-add of QK^T) is scaled by the share of its tiles that hold a visible pair
(masking.FrameMask.visible_block_fraction).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import DualForceConfig, get_config
from .diffusion_forcing import DiffusionForcingConfig, diffusion_forcing_loss
from .frames import num_latent_frames
from .masking import BLOCK_SIZE, block_sparse_share, count_attention
from .model import DualForce


@dataclass
class ModelSize:
    config: DualForceConfig
    params: dict[str, int]  # top-level module -> parameter count
    total_params: int
    train_step_flops: int  # forward + backward of diffusion_forcing_loss, attention dense (0 if not measured)
    block_sparse_flops: int  # the same with only the visible attention tiles counted (what FlexAttention computes)
    attention_flops: int  # the dense attention part of train_step_flops
    video_frames: int
    latent_size: tuple[int, int]


def measure(config: Union[str, DualForceConfig], video_frames: int = 21, latent_size: tuple[int, int] = (64, 64),
            batch: int = 1, flops: bool = True) -> ModelSize:
    """Build the model on the meta device and count parameters (and, if asked, a training step's FLOPs)."""
    cfg = get_config(config) if isinstance(config, str) else config
    with torch.device("meta"):
        model = DualForce(cfg)
    params = {name: sum(p.numel() for p in child.parameters()) for name, child in model.named_children()}
    total = sum(p.numel() for p in model.parameters())
    step_flops = sparse_flops = attention_flops = 0
    if flops:
        L, (h, w) = num_latent_frames(video_frames), latent_size
        meta = dict(device="meta")
        data = {
            "video_latents": torch.empty(batch, cfg.latent_channels, L, h, w, **meta),
            "reference_latent": torch.empty(batch, cfg.latent_channels, 1, h, w, **meta),
            "struct": torch.empty(batch, video_frames, cfg.struct_dim, **meta),
            "audio_features": torch.empty(batch, video_frames, cfg.audio_dim, **meta),
            "keep_mask": torch.ones(batch, video_frames, dtype=torch.bool, **meta),
        }
        counter = FlopCounterMode(display=False)
        with counter, count_attention() as calls:
            diffusion_forcing_loss(model, data, DiffusionForcingConfig())["loss"].backward()
        step_flops = counter.get_total_flops()
        attention_flops = sum(12 * call.dense_macs for call in calls)
        sparse_flops = step_flops - round(attention_flops * (1 - block_sparse_share(calls)))
    return ModelSize(cfg, params, total, step_flops, sparse_flops, attention_flops, video_frames, latent_size)


def model_info(config_name: str, flops: bool = True) -> str:
    """Human-readable report for `dualforce model-info CONFIG`: params per module, FLOPs per training step."""
    size = measure(config_name, flops=flops)
    c = size.config
    lines = [
        f"DualForce config {c.name!r}: video {c.video_dim}x{c.video_blocks} blocks ({c.video_heads} heads, FFN "
        f"{c.video_ffn_dim}); struct {c.struct_model_dim}x{c.struct_blocks} blocks, {c.struct_tokens_per_frame} "
        f"tokens/frame; bridge {c.bridge_strategy} on video blocks {list(c.bridge_blocks())}",
        f"{'module':<20}{'params':>16}",
    ]
    for name, n in size.params.items():
        lines.append(f"{name:<20}{n:>16,}")
    lines.append(f"{'total':<20}{size.total_params:>16,}  ({size.total_params / 1e9:.3f} B)")
    if flops:
        lines.append(
            f"training step FLOPs (batch 1, {size.video_frames} video frames = {num_latent_frames(size.video_frames)} "
            f"latent frames, latent {size.latent_size[0]}x{size.latent_size[1]}, forward+backward, attention "
            f"counted dense): {size.train_step_flops:.4e} ({size.train_step_flops / 1e12:.2f} TFLOP)"
        )
        skipped = size.train_step_flops - size.block_sparse_flops
        lines.append(
            f"  block-sparse (FlexAttention computes visible {BLOCK_SIZE}-token tiles only): "
            f"{size.block_sparse_flops:.4e} ({size.block_sparse_flops / 1e12:.2f} TFLOP); attention is "
            f"{size.attention_flops / size.train_step_flops:.1%} of the dense count, {skipped:.3e} FLOPs of it masked"
        )
    return "\n".join(lines)
