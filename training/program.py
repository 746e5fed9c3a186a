"""The training program file: the planning review's phases as stages, each with its data, training and gates.

One YAML (or JSON) file per program (configs/program-lite.yaml is the plan's defaults). YAML because the
program is written and reviewed by people: it carries comments (why a threshold is what it is), and it reads
like prefect.yaml beside it; JSON is accepted because YAML is a superset. Every field is validated before
anything runs (pydantic: unknown keys, wrong types and values outside their range are errors naming the field),
and each stage's training and gate settings are checked against TrainConfig / TrainingGateConfig.

    concept   (Phase 0.5)  a small model on ~100 talking-head clips, one run per struct-noise ceiling
    pretrain  (Phase 2)    the video DiT alone on general video; its convergence gate picks joint's start
    joint     (Phase 4)    the full model on talking-head data, from pretrain's video DiT (or from scratch)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from training.gates import TrainingGateConfig
from training.train_config import TrainConfig, config_adapter

# TrainConfig fields a stage sets itself (from its data or its place in the program), never from the file
STAGE_OWNED = ("shards", "out_dir", "window_frames", "audio_dim", "struct_dim", "crop_size", "video_only", "init_from",
               "init_from_wan", "resume_from")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WanStart(_Strict):
    """`init_from: {wan: PATH, layers: even}`: the stage's video DiT starts from Wan 2.1 transformer weights."""

    wan: str  # a diffusers WanTransformer3DModel folder or the original release's file, relative to the program file
    layers: Union[Literal["even", "first"], list[int]] = "even"  # which source blocks fill ours

    def train_field(self) -> dict[str, Any]:
        return {"path": self.wan, "layers": self.layers}


class StageSpec(_Strict):
    """One stage: the shard sets it reads, TrainConfig fields, TrainingGateConfig fields."""

    shards: list[str] = Field(min_length=1)  # shard-set folders (ROOT/DATASET/shards), relative to the program file
    split: str = "train"
    init_from: Optional[WanStart] = None  # pretrain (or joint without a pretrain stage): warm start from Wan
    train: dict[str, Any] = Field(default_factory=dict)
    gates: dict[str, Any] = Field(default_factory=dict)

    @field_validator("train")
    @classmethod
    def _train_fields(cls, train: dict[str, Any]) -> dict[str, Any]:
        owned = sorted(set(train) & set(STAGE_OWNED))
        if owned:
            raise ValueError(f"{owned} are set by the program from the stage's data and order, not in train")
        TrainConfig.from_dict({"shards": ["-"], "out_dir": "-", "window_frames": 9, **train})  # unknown keys, bad values
        return train

    @field_validator("gates")
    @classmethod
    def _gate_fields(cls, gates: dict[str, Any]) -> dict[str, Any]:
        config_adapter(TrainingGateConfig).validate_python(gates)  # types too, as the train flow checks them
        return gates


class ConceptSpec(StageSpec):
    """Phase 0.5: does the dual-stream objective converge at all, and at which struct-noise ceiling."""

    sigma_struct_max: list[float] = Field(default=[0.5, 0.7, 1.0], min_length=1)
    chosen: float = 0.7  # the ceiling the later stages use; go when its run converges

    @model_validator(mode="after")
    def _chosen_is_tried(self) -> "ConceptSpec":
        if self.chosen not in self.sigma_struct_max:
            raise ValueError(f"chosen {self.chosen} is not one of sigma_struct_max {self.sigma_struct_max}")
        if any(not 0.0 < s <= 1.0 for s in self.sigma_struct_max):
            raise ValueError(f"sigma_struct_max values must lie in (0, 1], got {self.sigma_struct_max}")
        return self


class ReviewSpec(_Strict):
    """How joint's sample-review gate is answered when no person does."""

    auto_approve: bool = False
    timeout_s: int = Field(default=24 * 3600, ge=1)
    on_timeout: Literal["continue", "stop"] = "continue"


class LaunchSpecFields(_Strict):
    nproc_per_node: int = Field(default=1, ge=1)
    launcher: Literal["torchrun", "deepspeed"] = "torchrun"


class ProgramConfig(_Strict):
    name: str
    out_dir: str  # relative to the program file
    launch: LaunchSpecFields = Field(default_factory=LaunchSpecFields)
    review: ReviewSpec = Field(default_factory=ReviewSpec)
    concept: Optional[ConceptSpec] = None  # None: skip Phase 0.5
    pretrain: Optional[StageSpec] = None  # None: joint starts from scratch (option B by choice)
    joint: StageSpec

    @model_validator(mode="after")
    def _stage_roles(self) -> "ProgramConfig":
        for stage in ("concept", "joint"):
            spec = getattr(self, stage)
            if spec is not None and spec.train.get("video_only"):
                raise ValueError(f"{stage} trains the full model; video_only belongs to pretrain")
        if self.concept is not None and self.concept.init_from is not None:
            raise ValueError("concept trains a small model of its own width: it has no init_from")
        if self.pretrain is not None and self.joint.init_from is not None:
            raise ValueError("joint starts from pretrain's video DiT: give init_from to pretrain, or drop pretrain")
        if self.pretrain is not None and self.pretrain.gates.get("joint_step") is not None:
            raise ValueError("pretrain has no struct stream: set its gates' joint_step to null")
        for stage in ("concept", "pretrain"):  # these stages are left by their convergence verdict: it must be judged
            spec = getattr(self, stage)
            if spec is None:
                continue
            gates = TrainingGateConfig(**spec.gates)
            total = TrainConfig.from_dict({"shards": ["-"], "out_dir": "-", "window_frames": 9, **spec.train}).total_steps
            if gates.convergence_step is None or gates.convergence_step > total:
                raise ValueError(f"{stage}'s convergence gate (step {gates.convergence_step}) must fall within its "
                                 f"{total} training steps: the stage is left by that verdict")
        return self

    def resolved(self, base: Path) -> "ProgramConfig":
        """Paths relative to `base` (the program file's folder) made absolute."""
        data = self.model_dump()
        data["out_dir"] = resolve_path(base, self.out_dir)
        for stage in ("concept", "pretrain", "joint"):
            if data.get(stage):
                data[stage]["shards"] = [resolve_path(base, s) for s in data[stage]["shards"]]
                if data[stage].get("init_from"):
                    data[stage]["init_from"]["wan"] = resolve_path(base, data[stage]["init_from"]["wan"])
        return ProgramConfig.model_validate(data)


def resolve_path(base: Path, p: str) -> str:
    """`p` made absolute against `base` (a config file's folder); ~ expanded."""
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


class ConfigFileError(ValueError):
    """A program / ablation file that cannot be read or parsed (the CLI's exit 6: an unusable input)."""


def read_config_file(source: str | Path | dict[str, Any], what: str) -> tuple[dict[str, Any], Path]:
    """(the mapping, the folder its relative paths are relative to) of a .yaml / .yml / .json file or a parsed dict."""
    if isinstance(source, dict):
        return source, Path.cwd()
    path = Path(source)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as exc:  # safe loader: a Python tag is refused
        raise ConfigFileError(f"{path}: {what} that cannot be read: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: {what} holds a mapping, got {type(data).__name__}")
    return data, path.resolve().parent


def load_program(source: str | Path | dict[str, Any]) -> ProgramConfig:
    """A program file (.yaml / .yml / .json) or an already-parsed dict; paths resolved against the file's folder."""
    data, base = read_config_file(source, "a program file")
    return ProgramConfig.model_validate(data).resolved(base)
