"""Small, randomly initialised models of the real architectures, written in the real on-disk layouts.

A dry run points the real loaders at this directory, so it exercises the same code paths as production:
LivePortrait's `pretrained_weights/liveportrait/base_models/motion_extractor.pth` and Hugging Face
`save_pretrained` directories for HuBERT and the Wan VAE. Every model written here carries a marker file
(`untrained_dryrun: true`), the loaders set `untrained_dryrun=True` on the model, and the step results copy it
into their metadata. The outputs are meaningless numbers: they test plumbing, never quality.

Tiny Wan VAE normalisation: latents_mean = 0 and latents_std = 1 (16 values each), i.e. identity
normalisation, because an untrained encoder has no meaningful latent statistics.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from models.motion_extractor import MotionExtractor, MotionExtractorConfig
from models.weights import HF_DRYRUN_MARKER, MOTION_DRYRUN_MARKER, MOTION_EXTRACTOR_RELPATH

log = logging.getLogger(__name__)

HUBERT_SUBDIR = "hubert-dryrun"
WAN_VAE_SUBDIR = "wan-vae-dryrun"
WAN_TRANSFORMER_SUBDIR = "wan-transformer-dryrun"
WAN_TRANSFORMER_DRYRUN_BLOCKS = 6  # twice the tiny video DiT's 3 blocks: the dry-run's warm start selects 0, 2, 4

DRYRUN_MOTION_CFG = MotionExtractorConfig(depths=(1, 1, 2, 1), dims=(16, 32, 64, 128))


@dataclass(frozen=True)
class DryrunPaths:
    liveportrait_root: Path  # holds pretrained_weights/liveportrait/base_models/motion_extractor.pth
    hubert_dir: Path
    wan_vae_dir: Path


def _marker(**extra) -> str:
    return json.dumps({"untrained_dryrun": True, "note": "randomly initialised dry-run model, not real weights",
                       **extra}, indent=2, sort_keys=True)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_dryrun_motion_extractor(root: Path, seed: int = 0, cfg: MotionExtractorConfig = DRYRUN_MOTION_CFG) -> Path:
    torch.manual_seed(seed)
    model = MotionExtractor(cfg)
    path = Path(root) / MOTION_EXTRACTOR_RELPATH
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    _atomic_write_text(path.with_name(MOTION_DRYRUN_MARKER),
                       _marker(depths=list(cfg.depths), dims=list(cfg.dims), num_kp=cfg.num_kp, seed=seed))
    return path


def tiny_hubert_config():
    from transformers import HubertConfig

    # Same front end as HuBERT base (kernels/strides -> 320-sample hop, 400-sample field, 50 Hz), tiny widths.
    return HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)


def write_dryrun_hubert(out_dir: Path, seed: int = 0) -> Path:
    from transformers import HubertModel, Wav2Vec2FeatureExtractor

    torch.manual_seed(seed)
    model = HubertModel(tiny_hubert_config()).eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16_000, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(out_dir)
    _atomic_write_text(out_dir / HF_DRYRUN_MARKER, _marker(seed=seed, model="HubertModel"))
    return out_dir


def tiny_wan_vae_kwargs() -> dict:
    return dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                temperal_downsample=[False, True, True], latents_mean=[0.0] * 16, latents_std=[1.0] * 16)


def write_dryrun_wan_vae(out_dir: Path, seed: int = 0) -> Path:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    vae = AutoencoderKLWan(**tiny_wan_vae_kwargs()).eval()
    out_dir = Path(out_dir)
    vae.save_pretrained(out_dir)
    _atomic_write_text(out_dir / HF_DRYRUN_MARKER, _marker(seed=seed, model="AutoencoderKLWan"))
    return out_dir


def write_dryrun_models(root: str | Path, seed: int = 0) -> DryrunPaths:
    """Write all three dry-run models under `root` (idempotent: same seed, same weights)."""
    root = Path(root)
    log.warning("DRY RUN: writing randomly initialised models under %s (untrained_dryrun=True)", root)
    write_dryrun_motion_extractor(root, seed)
    paths = DryrunPaths(root, root / HUBERT_SUBDIR, root / WAN_VAE_SUBDIR)
    write_dryrun_hubert(paths.hubert_dir, seed)
    write_dryrun_wan_vae(paths.wan_vae_dir, seed)
    return paths


def tiny_wan_transformer(seed: int = 0, num_layers: int = WAN_TRANSFORMER_DRYRUN_BLOCKS, in_channels: int = 16,
                         image_dim: int | None = None, text_dim: int = 32):
    """diffusers' WanTransformer3DModel at the tiny DualForce video DiT's width (dim 64 = 2 heads of 32, FFN 128,
    freq_dim 32, (1,2,2) patches), random weights: the stand-in for Wan 2.1 1.3B's transformer."""
    from diffusers import WanTransformer3DModel

    from models.dualforce.config import get_config

    c = get_config("tiny")
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=c.patch_size, num_attention_heads=c.video_heads, attention_head_dim=c.video_dim // c.video_heads,
        in_channels=in_channels, out_channels=c.latent_channels, text_dim=text_dim, freq_dim=c.freq_dim,
        ffn_dim=c.video_ffn_dim, num_layers=num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=c.eps, image_dim=image_dim, added_kv_proj_dim=c.video_dim if image_dim else None).eval()


def write_dryrun_wan_transformer(out_dir: Path, seed: int = 0) -> Path:
    """A random tiny Wan transformer in diffusers' save_pretrained layout (config.json +
    diffusion_pytorch_model.safetensors): the dry-run's pretrain stage warm-starts from it through the real loader.
    Written once (same seed, same weights), into a temp sibling renamed into place."""
    import shutil
    import tempfile

    out_dir = Path(out_dir)
    if (out_dir / HF_DRYRUN_MARKER).is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tiny_wan_transformer(seed).save_pretrained(staging, safe_serialization=True)
    _atomic_write_text(staging / HF_DRYRUN_MARKER, _marker(seed=seed, model="WanTransformer3DModel"))
    try:
        staging.rename(out_dir)
    except OSError:  # written meanwhile by another run: the same weights
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
