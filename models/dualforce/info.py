"""Size report: parameters per module and FLOPs of one training step, measured on the meta device (no weights)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch
from torch.utils.flop_counter import FlopCounterMode

from .config import DualForceConfig, get_config
from .diffusion_forcing import DiffusionForcingConfig, diffusion_forcing_loss
from .frames import num_latent_frames
from .model import DualForce


@dataclass
class ModelSize:
    config: DualForceConfig
    params: dict[str, int]  # top-level module -> parameter count
    total_params: int
    train_step_flops: int  # forward + backward of diffusion_forcing_loss (0 if not measured)
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
    step_flops = 0
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
        with counter:
            diffusion_forcing_loss(model, data, DiffusionForcingConfig())["loss"].backward()
        step_flops = counter.get_total_flops()
    return ModelSize(cfg, params, total, step_flops, video_frames, latent_size)


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
    return "\n".join(lines)
