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
