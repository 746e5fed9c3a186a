"""Cut a clip's per-frame features (steps 3-6) into the members of one training window."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks import contract
from tasks.shard import FeatureSource, ShardClip
from tasks.steps import AUDIO_FEATURES_FILE, KEEP_MASK_FILE, STRUCT_FILE, VAE_FILE
from tasks.vae_latents import load_vae_latents

FEATURE_STEPS = ("motion", "pose_check", "audio_features", "vae_latents")


def window_features(step_dirs: dict[str, Path]) -> FeatureSource:
    """A FeatureSource over one clip's step outputs; arrays are loaded once, windows sliced from them."""
    struct = np.load(step_dirs["motion"] / STRUCT_FILE, allow_pickle=False)  # [T, 133] float32
    keep = np.load(step_dirs["pose_check"] / KEEP_MASK_FILE, allow_pickle=False)  # [T] bool
    audio = np.load(step_dirs["audio_features"] / AUDIO_FEATURES_FILE, allow_pickle=False)  # [T, D] float16
    vae = load_vae_latents(step_dirs["vae_latents"] / VAE_FILE)  # [W, 16, n+1, h, w]
    if not (len(struct) == len(keep) == len(audio)):
        raise contract.ContractError(f"per-frame features disagree: struct {len(struct)}, keep {len(keep)}, audio {len(audio)} rows")
    by_start = {int(s): i for i, s in enumerate(vae.window_starts)}

    def source(clip: ShardClip, start: int, end: int) -> dict[str, bytes]:
        if start not in by_start or end - start != vae.window_frames:
            raise contract.ContractError(f"{clip.row.clip_id}: no VAE latent for window [{start}, {end})")
        if end > len(struct):
            raise contract.ContractError(f"{clip.row.clip_id}: window [{start}, {end}) past {len(struct)} feature rows")
        return {
            contract.VIDEO_LATENTS: contract.npy_bytes(vae.latents[by_start[start]]),
            contract.REFERENCE_LATENT: contract.npy_bytes(vae.reference_latent),
            contract.STRUCT: contract.npy_bytes(struct[start:end].astype(np.float32)),
            contract.AUDIO_FEATURES: contract.npy_bytes(audio[start:end].astype(np.float16)),
            contract.KEEP_MASK: contract.npy_bytes(keep[start:end].astype(bool)),
        }

    return source
