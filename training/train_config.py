"""Trainer configuration: one JSON file -> TrainConfig (unknown keys are an error, not silently ignored)."""
from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pydantic import ConfigDict

from tasks.contract import HUBERT_LARGE_DIM, STRUCT_DIM
from training.validation import ValidationConfig

LIPSYNC_EMBED_DIM = 64  # the lip-sync head's width when a run turns the loss on without choosing one
DS_CONFIG_DIR = Path(__file__).resolve().parent / "ds_configs"


@dataclass
class FaultInjection:
    """Test hooks: make the run fail in a known way at a known step (never set in real configs)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # as a flow parameter: a misspelt key is an error, not dropped

    crash_at_step: Optional[int] = None  # raise RuntimeError before this step (1-based)
    crash_rank: Optional[int] = None  # None: every rank
    oom_at_step: Optional[int] = None  # raise torch.OutOfMemoryError before this step ...
    oom_if_batch_above: int = 0  # ... when micro batch > this
    oom_if_window_above: int = 0  # ... and window > this
    nan_at_step: Optional[int] = None  # make the loss NaN at this step ...
    nan_if_noise_mode: Optional[str] = None  # ... when the noise mode is this (None: always)


@dataclass
class WanInit:
    """A warm start of the video DiT from Wan 2.1 transformer weights (models/dualforce/wan_transfer.py)."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    path: str  # a diffusers WanTransformer3DModel folder (or its pipeline folder), or the original release's file
    layers: Union[str, list[int]] = "even"  # "even" | "first" | the source block of each target block

    def __post_init__(self) -> None:
        from models.dualforce.wan_transfer import LAYER_RULES

        if isinstance(self.layers, str) and self.layers not in LAYER_RULES:
            raise ValueError(f"layers must be one of {LAYER_RULES} or a list of block indices, got {self.layers!r}")
        if not isinstance(self.layers, str):
            self.layers = [int(i) for i in self.layers]


# old name -> name: configs written before a rename (run folders' train_config.json, program files) still load
RENAMED_KEYS = {"window": "window_frames", "train_window": "train_window_frames"}


def renamed_keys(data: dict[str, Any]) -> dict[str, Any]:
    """`data` with the old names of renamed keys (RENAMED_KEYS) given their current ones."""
    data = dict(data)
    for old, new in RENAMED_KEYS.items():
        if old in data:
            if new in data:
                raise ValueError(f"training config gives both {new} and {old} (its old name): keep {new}")
            data[new] = data.pop(old)
    return data


@dataclass
class TrainConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")  # as a flow parameter: a misspelt key is an error, not dropped

    shards: list[str]
    out_dir: str
    window_frames: int  # video frames per shard sample (4n+1)
    train_window_frames: Optional[int] = None  # shorter window cut from each sample (memory fallback)
    crop_size: int = 512
    audio_dim: int = HUBERT_LARGE_DIM  # the shards' HuBERT width: a program or pipeline takes it from the shard set
    struct_dim: int = STRUCT_DIM  # per-frame struct width of the shards: LivePortrait's 133, or a FLAME layout's (stats.json)
    model_variant: str = "tiny"  # models.dualforce preset: "tiny" (CPU tests) or "lite" (~1.5B)
    model_overrides: dict[str, Any] = field(default_factory=dict)  # DualForceConfig fields
    noise_mode: str = "per_frame"
    loss_options: dict[str, Any] = field(default_factory=dict)  # other DiffusionForcingConfig fields
    ds_config: str = "zero2"  # name in training/ds_configs/ or a path to a JSON file
    micro_batch: int = 1  # per process
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    decay: str = "cosine"  # "cosine" | "linear" | "constant"
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA
    total_steps: int = 1000
    stop_at_step: Optional[int] = None  # leave early (after a checkpoint) as if interrupted
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = True
    resume_from: Optional[str] = None  # another run's checkpoints/ to continue from while this one has none
    # a video-only run's weights file (checkpoints/<tag>/weights.safetensors): a fresh run starts its video DiT
    # from it (models/dualforce/pretrained.py); ignored once the run has a checkpoint of its own
    init_from: Optional[str] = None
    # or Wan 2.1 transformer weights (the review's option a: warm start instead of from scratch); the transfer's
    # report is written beside the run (wan_transfer.json / .md); ignored once the run has a checkpoint of its own
    init_from_wan: Optional[WanInit] = None
    save_weights: bool = False  # beside every checkpoint, the module's fp32 weights as safetensors (rank 0)
    video_only: bool = False  # the video DiT alone on video_latents + reference_latent (the pretrain stage)
    log_every: int = 1
    seed: int = 0
    num_workers: int = 2
    shuffle_buffer: int = 64
    resampled: bool = False
    shards_per_epoch: Optional[int] = None
    faults: FaultInjection = field(default_factory=FaultInjection)
    # validation samples every K steps (training/validation.py: held-out clips generated, mp4s + a contact sheet)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if isinstance(self.faults, dict):
            self.faults = FaultInjection(**self.faults)
        if isinstance(self.validation, dict):
            self.validation = ValidationConfig(**self.validation)
        if isinstance(self.init_from_wan, dict):
            self.init_from_wan = WanInit(**self.init_from_wan)
        if self.init_from and self.init_from_wan:
            raise ValueError("init_from (our pretrain weights) and init_from_wan (Wan weights) exclude each other")
        self.betas = tuple(self.betas)  # type: ignore[assignment]
        if self.noise_mode not in ("per_frame", "per_sample"):
            raise ValueError(f"noise_mode must be per_frame or per_sample, got {self.noise_mode!r}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay must be cosine, linear or constant, got {self.decay!r}")
        small = {k: getattr(self, k) for k in ("ckpt_every", "total_steps", "micro_batch", "grad_accum", "window_frames",
                                               "keep_checkpoints", "log_every") if getattr(self, k) < 1}
        small.update({k: getattr(self, k) for k in ("warmup_steps", "num_workers") if getattr(self, k) < 0})
        if small:
            raise ValueError(f"{', '.join(f'{k}={v}' for k, v in small.items())}: counts of steps, samples, frames "
                             "and workers must be >= 1 (warmup_steps and num_workers >= 0)")
        ranges = {"lr": (self.lr > 0, "> 0"), "weight_decay": (self.weight_decay >= 0, ">= 0"),
                  "min_lr_ratio": (0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
                  "grad_clip": (self.grad_clip >= 0, ">= 0"), "ema_decay": (0 <= self.ema_decay < 1, "in [0, 1)"),
                  "betas": (all(0 <= b < 1 for b in self.betas), "each in [0, 1)")}
        bad = [f"{k}={getattr(self, k)} (must be {rule})" for k, (ok, rule) in ranges.items() if not ok]
        if bad:
            raise ValueError(f"out of range: {', '.join(bad)}")

    def model_config(self):
        """The DualForceConfig this run trains (preset + the shards' widths + overrides)."""
        from models.dualforce.config import get_config

        overrides = dict(self.model_overrides, video_only=self.video_only)
        if self.loss_options.get("lipsync_loss_weight", 0) > 0 and not self.video_only:
            overrides.setdefault("lipsync_embed_dim", LIPSYNC_EMBED_DIM)  # the lip-sync loss needs its head
        return get_config(self.model_variant, audio_dim=self.audio_dim, struct_dim=self.struct_dim, **overrides)

    @property
    def effective_window_frames(self) -> int:
        return self.train_window_frames or self.window_frames

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """A config from a mapping (a program file, a run folder's train_config.json); keys renamed since still read."""
        data = renamed_keys(data)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return config_adapter(cls).validate_python(data)  # types checked as the train flow checks its parameter

    @classmethod
    def load(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_ds_config(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {name_or_path!r} not found (looked at {path})")
    return json.loads(path.read_text())


@functools.cache
def config_adapter(kind: type) -> Any:
    """pydantic's validator of a config dataclass (a ValidationError is a ValueError: '1' -> 1, None for an int
    refused), built once."""
    import pydantic

    return pydantic.TypeAdapter(kind)
