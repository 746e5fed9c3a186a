"""Cut a clip's per-frame features (steps 3-6) into the members of one training window (what the shard step adds
to each sample besides the crop's frames and audio)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks import contract
from tasks.steps.audio_features import AUDIO_FEATURES_FILE, AudioFeaturesStep
from tasks.steps.flame_struct import FlameStructStep
from tasks.steps.motion import STRUCT_FILE, MotionStep
from tasks.steps.pose_check import HEAD_POSE_FILE, KEEP_MASK_FILE, PoseCheckStep
from tasks.steps.shard import FeatureSource, ShardClip
from tasks.steps.vae_latents import VAE_FILE, VaeLatentsStep, load_vae_latents


def vae_window_features(vae_dir: Path) -> FeatureSource:
    """A FeatureSource of the VAE members alone (video_latents, reference_latent), from one clip's VAE step
    output, loaded once; every sample profile carries these."""
    vae = load_vae_latents(vae_dir / VAE_FILE)  # [W, 16, n+1, h, w]
    by_start = {int(s): i for i, s in enumerate(vae.window_starts)}

    def source(clip: ShardClip, start: int, end: int) -> dict[str, bytes]:
        if start not in by_start or end - start != vae.window_frames:
            raise contract.ContractError(f"{clip.row.clip_id}: no VAE latent for window [{start}, {end})")
        return {
            contract.VIDEO_LATENTS: contract.npy_bytes(vae.latents[by_start[start]]),
            contract.REFERENCE_LATENT: contract.npy_bytes(vae.reference_latent),
        }

    return source


def window_features(step_dirs: dict[str, Path]) -> FeatureSource:
    """A FeatureSource over one clip's step outputs (steps 3-6); arrays are loaded once, windows sliced from them.
    Struct rows and keep mask come from the FLAME struct step when it is among them, else from motion + pose check
    (which also gives the optional head_pose member: its aligned independent pose, the alignment loss's target)."""
    flame = step_dirs.get(FlameStructStep.name)
    struct = np.load((flame or step_dirs[MotionStep.name]) / STRUCT_FILE, allow_pickle=False)  # [T, S] float32
    keep = np.load((flame or step_dirs[PoseCheckStep.name]) / KEEP_MASK_FILE, allow_pickle=False)  # [T] bool
    audio = np.load(step_dirs[AudioFeaturesStep.name] / AUDIO_FEATURES_FILE, allow_pickle=False)  # [T, D] float16
    latents = vae_window_features(step_dirs[VaeLatentsStep.name])
    pose_file = (step_dirs[PoseCheckStep.name] / HEAD_POSE_FILE
                 if flame is None and PoseCheckStep.name in step_dirs else None)
    head_pose = np.load(pose_file, allow_pickle=False) if pose_file is not None and pose_file.is_file() else None
    if head_pose is not None and len(head_pose) != len(struct):
        raise contract.ContractError(f"head pose has {len(head_pose)} rows for {len(struct)} struct rows")
    if not (len(struct) == len(keep) == len(audio)):
        raise contract.ContractError(f"per-frame features disagree: struct {len(struct)}, keep {len(keep)}, "
                                     f"audio {len(audio)} rows")

    def source(clip: ShardClip, start: int, end: int) -> dict[str, bytes]:
        members = latents(clip, start, end)
        if end > len(struct):
            raise contract.ContractError(f"{clip.row.clip_id}: window [{start}, {end}) past {len(struct)} feature rows")
        return {
            **members,
            contract.STRUCT: contract.npy_bytes(struct[start:end].astype(np.float32)),
            contract.AUDIO_FEATURES: contract.npy_bytes(audio[start:end].astype(np.float16)),
            contract.KEEP_MASK: contract.npy_bytes(keep[start:end].astype(bool)),
            **({} if head_pose is None else {contract.HEAD_POSE: contract.npy_bytes(head_pose[start:end].astype(np.float32))}),
        }

    return source
