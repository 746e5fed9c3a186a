"""Cut a clip's per-frame features (steps 3-6) into the members of one training window, and which steps make
which kind of sample (a preprocess profile)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks import contract
from tasks.shard import FeatureSource, ShardClip
from tasks.steps import AUDIO_FEATURES_FILE, HEAD_POSE_FILE, KEEP_MASK_FILE, STRUCT_FILE, VAE_FILE
from tasks.vae_latents import load_vae_latents

FEATURE_STEPS = ("motion", "pose_check", "audio_features", "vae_latents")
VIDEO_FEATURE_STEPS = ("vae_latents",)


@dataclass(frozen=True)
class PreprocessProfile:
    """The steps that make one kind of shard sample: a crop step, the feature steps its samples carry, and the
    contract profile (tasks/contract.py) the samples satisfy."""

    name: str
    crop_step: str
    feature_steps: tuple[str, ...]
    sample_profile: str

    @property
    def clip_steps(self) -> tuple[str, ...]:
        return ("download", self.crop_step, *self.feature_steps)

    @property
    def steps(self) -> tuple[str, ...]:
        return (*self.clip_steps, "shard")

    def feature_source(self, step_dirs: dict[str, Path]) -> FeatureSource:
        """The feature members of this profile's samples, from one clip's step output folders."""
        if self.sample_profile == contract.VIDEO_ONLY:
            return vae_window_features(step_dirs["vae_latents"])
        return window_features(step_dirs)


# talking_head: face crop, motion, pose check, HuBERT, VAE (the joint stage's data). general: general video for
# the pretrain stage (Panda-70M, VoxCeleb2): a centre crop and its VAE latents, video-only samples.
TALKING_HEAD = PreprocessProfile("talking_head", "crop", FEATURE_STEPS, contract.TALKING_HEAD)
GENERAL = PreprocessProfile("general", "center_crop", VIDEO_FEATURE_STEPS, contract.VIDEO_ONLY)
PREPROCESS_PROFILES = {p.name: p for p in (TALKING_HEAD, GENERAL)}
# talking_head after the 3D-latent gate's NO-GO with FLAME files at hand: struct rows and keep mask from the
# FLAME struct step (tasks/flame_struct.py) instead of LivePortrait's motion and the pose check
FLAME_FEATURE_STEPS = ("flame_struct", "audio_features", "vae_latents")
TALKING_HEAD_FLAME = PreprocessProfile("talking_head", "crop", FLAME_FEATURE_STEPS, contract.TALKING_HEAD)


def preprocess_profile(name: str) -> PreprocessProfile:
    if name not in PREPROCESS_PROFILES:
        raise ValueError(f"profile must be one of {tuple(PREPROCESS_PROFILES)}, got {name!r}")
    return PREPROCESS_PROFILES[name]


def profile_of_samples(sample_profile: str) -> PreprocessProfile:
    """The preprocess profile that makes samples of a contract profile (meta.json `profile`)."""
    for p in PREPROCESS_PROFILES.values():
        if p.sample_profile == sample_profile:
            return p
    raise ValueError(f"sample profile must be one of {contract.PROFILES}, got {sample_profile!r}")


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
    flame = step_dirs.get("flame_struct")
    struct = np.load((flame or step_dirs["motion"]) / STRUCT_FILE, allow_pickle=False)  # [T, S] float32
    keep = np.load((flame or step_dirs["pose_check"]) / KEEP_MASK_FILE, allow_pickle=False)  # [T] bool
    audio = np.load(step_dirs["audio_features"] / AUDIO_FEATURES_FILE, allow_pickle=False)  # [T, D] float16
    latents = vae_window_features(step_dirs["vae_latents"])
    pose_file = step_dirs["pose_check"] / HEAD_POSE_FILE if flame is None and "pose_check" in step_dirs else None
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
