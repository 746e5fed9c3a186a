"""The preprocess flow's parameters, in groups: typed pydantic models that the CLI, prefect.yaml and the Prefect UI
fill the same way, so a run's parameters are validated (types, choices, ranges) before anything starts.

`weights`: which extractors and where their weights are; `windows`: how clips become samples and shards;
`runner`: where batches run; `storage`: where step outputs and staging live; `checks`: the quality thresholds.
In prefect.yaml and the UI each group is a nested mapping (`weights: {models: dryrun}`); in Python a dict or
the model itself.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks import contract
from tasks.steps.shard import DEFAULT_SHARD_GROUPS, ShardConfig

Profile = Literal["talking_head", "general"]
Runner = Literal["local", "processes", "ray"]


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option is an error, not a silently ignored key


class ModelWeights(_Group):
    """`dryrun`: small random models of the real architectures (written once); `real`: the named weights, checked
    before any clip is touched (a profile needs only its own steps' weights)."""

    models: Literal["real", "dryrun"] = "real"
    liveportrait_root: Optional[str] = None  # LivePortrait's pretrained_weights/ root (motion extractor)
    hubert: Optional[str] = None  # a HuBERT directory or a repo id already in the HF cache
    wan_vae: Optional[str] = None  # a Wan VAE directory or cached repo id
    wan_vae_subfolder: Optional[str] = None  # "vae" for a whole Wan pipeline folder
    device: Optional[str] = None  # None: CUDA when available
    flame_dir: Optional[str] = None  # a FLAME tracker's files per clip: the 3D-latent gate's fallback struct source


class WindowOptions(_Group):
    window_frames: int = Field(contract.WINDOW_FRAMES, ge=1)  # video frames per window, 4n+1
    window_stride: Optional[int] = Field(None, ge=1)  # frames between window starts (None: back to back)
    shard_max_samples: int = Field(200, ge=1)
    shard_groups: int = Field(DEFAULT_SHARD_GROUPS, ge=1)  # clips hashed into this many groups, a shard set each
    shard_features: Optional[bool] = None  # None: when the feature steps' results exist

    @model_validator(mode="before")
    @classmethod
    def _window_n(cls, data):
        """Deployments and saved parameters written before the rename say `window_n` (a window of 4n+1 frames)."""
        if isinstance(data, dict) and "window_n" in data:
            if "window_frames" in data:
                raise ValueError("give window_frames only (window_n is its old name: 4n+1 frames)")
            data = {k: v for k, v in data.items() if k != "window_n"} | {
                "window_frames": contract.video_frames(int(data["window_n"]) + 1)}
        return data

    @field_validator("window_frames")
    @classmethod
    def _four_n_plus_one(cls, value: int) -> int:
        contract.latent_frames(value)  # 4n+1 or a ValueError naming the count
        return value

    def shard_config(self) -> ShardConfig:
        """The windows the VAE step encodes and the shard step cuts, and the shards' size."""
        return ShardConfig(window_frames=self.window_frames, stride=self.window_stride,
                           max_samples_per_shard=self.shard_max_samples)


class RunnerOptions(_Group):
    runner: Runner = "local"  # this flow's threads, a process pool, or Ray tasks (flows/runners.py)
    batch_size: int = Field(8, ge=1)  # clips per batch (a task)
    processes: Optional[int] = Field(None, ge=1)  # the process pool's size (None: one per CPU)
    ray_address: Optional[str] = None  # "auto", a cluster address, or None: a local instance
    ray_num_cpus: Optional[int] = Field(None, ge=1)
    cpus_per_batch: float = Field(1.0, gt=0)
    gpus_per_batch: float = Field(1.0, ge=0)  # asked for only by the GPU steps, only where the cluster has GPUs
    progress: bool = False  # a progress bar on the terminal (the local runner)


class StorageOptions(_Group):
    work_root: Optional[str] = None  # step outputs (default: under output_root); may be an fsspec URL
    scratch_root: Optional[str] = None  # a local folder where workers stage step files (default: system temp)


class QualityChecks(_Group):
    pose_threshold_deg: float = Field(10.0, ge=0)  # the pose check's agreement threshold
    max_frame_drop_ratio: float = Field(0.5, ge=0, le=1)  # the 3D-latent gate's limit
    audit_fraction: float = Field(0.02, ge=0, le=1)  # share of the new shard set re-derived and compared
    retry_rejected: bool = False  # run clips whose cached result is a rejection again


class PreprocessOptions(_Group):
    """All groups at once (and which steps, how many clips): what a flow that runs preprocess inside it (pipeline,
    dry run) takes and passes on."""

    steps: Optional[list[str]] = None  # the profile's steps to run (default: all)
    limit: Optional[int] = Field(None, ge=1)  # the manifest's first rows only
    weights: ModelWeights = Field(default_factory=ModelWeights)
    windows: WindowOptions = Field(default_factory=WindowOptions)
    runner: RunnerOptions = Field(default_factory=RunnerOptions)
    storage: StorageOptions = Field(default_factory=StorageOptions)
    checks: QualityChecks = Field(default_factory=QualityChecks)

    def flow_parameters(self) -> dict:
        """The preprocess flow's group parameters."""
        return {"steps": self.steps, "limit": self.limit, "weights": self.weights, "windows": self.windows,
                "runner": self.runner, "storage": self.storage, "checks": self.checks}
