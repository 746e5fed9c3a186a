"""The preprocessing pipeline, declared once: which steps, in which order, make which kind of sample.

A profile is its steps in order: a download, a crop, the feature steps, and the shard step (run once over the
dataset, not per clip). Each step is a class in its own module beside this one, its name, version and inputs
class constants; `STEPS` is the one registry the preprocess and backfill flows, the audit, the stale scan and
`plan` read. Adding a step: its module, its place in a profile below, and its line in `build_step`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

from tasks import contract
from tasks.feature_models import FeatureModels
from tasks.step_runner import Step
from tasks.steps.audio_features import AudioFeaturesStep
from tasks.steps.center_crop import CenterCropStep
from tasks.steps.crop import CropStep
from tasks.steps.download import DownloadConfig, DownloadStep
from tasks.steps.flame_struct import FlameStructStep
from tasks.steps.motion import MotionStep
from tasks.steps.pose_check import PoseCheckConfig, PoseCheckStep
from tasks.steps.sample_features import vae_window_features, window_features
from tasks.steps.shard import FeatureSource, ShardConfig, ShardStep
from tasks.steps.vae_latents import VaeLatentsStep


@dataclass(frozen=True)
class PreprocessProfile:
    """The steps that make one kind of shard sample, in order (download, crop, features..., shard), and the
    contract profile (tasks/contract.py) the samples satisfy."""

    name: str
    step_classes: tuple[type, ...]
    sample_profile: str

    @property
    def steps(self) -> tuple[str, ...]:
        return tuple(cls.name for cls in self.step_classes)

    @property
    def clip_step_classes(self) -> tuple[type, ...]:
        """The steps run per clip: all but the shard step (run once over the dataset)."""
        return tuple(cls for cls in self.step_classes if cls is not ShardStep)

    @property
    def clip_steps(self) -> tuple[str, ...]:
        return tuple(cls.name for cls in self.clip_step_classes)

    @property
    def crop_step(self) -> str:
        return self.step_classes[1].name

    @property
    def feature_steps(self) -> tuple[str, ...]:
        """The steps between the crop and the shard step: what the samples carry besides frames and audio."""
        return self.clip_steps[2:]

    def feature_source(self, step_dirs: dict[str, Path]) -> FeatureSource:
        """The feature members of this profile's samples, from one clip's step output folders."""
        if self.sample_profile == contract.VIDEO_ONLY:
            return vae_window_features(step_dirs[VaeLatentsStep.name])
        return window_features(step_dirs)


# talking_head: face crop, motion, pose check, HuBERT, VAE (the joint stage's data).
TALKING_HEAD = PreprocessProfile("talking_head", (DownloadStep, CropStep, MotionStep, PoseCheckStep, AudioFeaturesStep,
                                                  VaeLatentsStep, ShardStep), contract.TALKING_HEAD)
# general: general video for the pretrain stage (Panda-70M, VoxCeleb2): a centre crop and its VAE latents.
GENERAL = PreprocessProfile("general", (DownloadStep, CenterCropStep, VaeLatentsStep, ShardStep), contract.VIDEO_ONLY)
# talking_head after the 3D-latent gate's NO-GO with FLAME files at hand: struct rows and keep mask from the
# FLAME tracker files instead of LivePortrait's motion and the pose check (flows/preprocess.py switches to it).
TALKING_HEAD_FLAME = PreprocessProfile("talking_head", (DownloadStep, CropStep, FlameStructStep, AudioFeaturesStep,
                                                        VaeLatentsStep, ShardStep), contract.TALKING_HEAD)
PREPROCESS_PROFILES = {p.name: p for p in (TALKING_HEAD, GENERAL)}
STEPS: dict[str, type] = {cls.name: cls for p in (TALKING_HEAD, GENERAL, TALKING_HEAD_FLAME) for cls in p.step_classes}


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


def wanted_steps(profile: PreprocessProfile, steps: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The profile's steps a run asks for (all of them when `steps` is empty); a name the profile lacks is an error."""
    wanted = tuple(steps) if steps else profile.steps
    unknown = set(wanted) - set(profile.steps)
    if unknown:
        raise ValueError(f"unknown steps {sorted(unknown)} for the {profile.name} profile; choose from {profile.steps}")
    return wanted


def weights_needed(profile: PreprocessProfile) -> list[str]:
    """The ModelWeights fields a real run of this profile names (the models its feature steps load)."""
    return [cls.weights for cls in profile.step_classes if getattr(cls, "weights", None)]


@dataclass
class StepOptions:
    """What a run's options give the clip steps (flows/preprocess.py fills it from its parameter groups)."""

    download_cache: Path  # where downloads of whole sources are kept between clips of one source
    models: Optional[FeatureModels] = None  # None: the steps that load a model are left out
    windows: ShardConfig = field(default_factory=ShardConfig)
    pose: PoseCheckConfig = field(default_factory=PoseCheckConfig)
    flame_dir: Optional[str] = None


def build_step(cls: type, o: StepOptions, profile: PreprocessProfile) -> Step:
    """One clip step configured from a run's options."""
    builders = {
        DownloadStep: lambda: DownloadStep(DownloadConfig(cache_dir=o.download_cache)),
        CropStep: CropStep,
        CenterCropStep: CenterCropStep,
        MotionStep: lambda: MotionStep(o.models),
        PoseCheckStep: lambda: PoseCheckStep(o.pose, o.flame_dir),
        AudioFeaturesStep: lambda: AudioFeaturesStep(o.models),
        VaeLatentsStep: lambda: VaeLatentsStep(o.models, o.windows, crop_step=profile.crop_step),
        FlameStructStep: lambda: FlameStructStep(o.flame_dir),
    }
    return builders[cls]()


def build_steps(profile: PreprocessProfile, names: Sequence[str], o: StepOptions) -> list[Step]:
    """The clip steps of `names`, in the profile's order; without models, only those that load none."""
    return [build_step(cls, o, profile) for cls in profile.clip_step_classes
            if cls.name in names and (o.models is not None or cls.name not in profile.feature_steps)]
