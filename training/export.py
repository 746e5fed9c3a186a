"""`dualforce export RUN_DIR -o DIR`: a training run's checkpoint -> an exported DualForce folder.

Which weights: the EMA when the run kept one (what one samples from), else the module. They are read, in this
order, from the trainer state's EMA (fp32, ZeRO <= 2: every rank holds whole tensors), from `weights.safetensors`
beside the checkpoint (fp32, written with `save_weights`; ZeRO-3 runs need it), or from DeepSpeed's
`mp_rank_00_model_states.pt` (ZeRO <= 2). Every `.pt` is read weights-only (training/safe_checkpoint.py): a
checkpoint is a trust boundary. The folder's provenance.json names the run, step and weights, and what the
training data was made with (each shard set's profile, window, crop size, widths, and the extractors its samples
record), so `generate` needs nothing else.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from models.dualforce import DualForce
from models.dualforce.serialization import check_output_folder
from tasks import contract
from training import checkpoint
from training.safe_checkpoint import load_weights_only
from training.train_config import TrainConfig
from training.warm_start import provenance_of_start

CONFIG_NAME = "train_config.json"
WEIGHT_SOURCES = ("auto", "ema", "module")


class ExportError(ValueError):
    """A run that cannot be exported as asked (no checkpoint, no such weights)."""


class UnusableRun(ExportError):
    """The run folder is there but what it holds cannot be used (exit 6, not 2)."""


@dataclass
class ExportResult:
    out_dir: Path
    step: int
    weights: str  # "ema" | "module"
    source: str  # the file the weights came from
    parameters: int


def module_state(tag_dir: Path) -> tuple[dict, str]:
    """The module weights of one checkpoint (save_weights' safetensors, else DeepSpeed's states read weights-only)
    and the file they came from."""
    weights = tag_dir / checkpoint.WEIGHTS_FILE
    if weights.is_file():
        return checkpoint.load_weights(weights), weights.name
    states = tag_dir / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise ExportError(f"{tag_dir} has neither {checkpoint.WEIGHTS_FILE} nor {states.name}")
    return dict(load_weights_only(states, map_location="cpu")["module"]), states.name


def _ema_state(tag_dir: Path) -> Optional[dict]:
    state_file = checkpoint.state_path(tag_dir.parent, tag_dir.name, 0)
    if not state_file.is_file():
        return None
    return load_weights_only(state_file, map_location="cpu").get("ema")


def training_data(cfg: TrainConfig) -> list[dict[str, Any]]:
    """What each shard set of the run was made with: stats.json facts and the extractors its first sample records."""
    from tasks.steps.shard import iter_samples
    from training.shard_sets import shard_set_root

    sets = []
    for pattern in cfg.shards:
        root = shard_set_root(pattern)
        if not (root / "stats.json").is_file():
            sets.append({"shards": pattern})
            continue
        stats = json.loads((root / "stats.json").read_text())
        first = next(iter_samples(root, split="train"), None)
        meta = first["meta"] if first else {}
        sets.append({
            "shards": pattern, "root": str(root), "profile": stats.get("profile", contract.TALKING_HEAD),
            "window_frames": stats.get("window_frames"), "crop_size": stats.get("crop_size", contract.CROP_SIZE),
            "struct_source": stats.get("struct_source", "liveportrait"), "struct_dim": stats.get("struct_dim"),
            "audio_dim": meta.get("audio_dim"), "extractors": meta.get("extractors", {}),
            "untrained_dryrun_models": meta.get("untrained_dryrun_models", []),
        })
    return sets


def export_run(run_dir: str | Path, out_dir: str | Path, tag: Optional[str] = None, weights: str = "auto") -> ExportResult:
    if weights not in WEIGHT_SOURCES:
        raise ExportError(f"weights must be one of {WEIGHT_SOURCES}, got {weights!r}")
    check_output_folder(out_dir)  # before the checkpoint is read: a folder that is not an earlier export stays as it is
    run_dir = Path(run_dir)
    config_file = run_dir / CONFIG_NAME
    if not config_file.is_file():
        raise ExportError(f"{run_dir} is not a training run (no {CONFIG_NAME})")
    try:
        cfg = TrainConfig.load(config_file)
    except (ValueError, TypeError) as exc:  # not JSON, or not a TrainConfig
        raise UnusableRun(f"{config_file} is not a training config we can read: {exc}") from None
    ckpt_dir = run_dir / "checkpoints"
    tag = tag or checkpoint.latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise ExportError(f"{run_dir} has no checkpoint{' ' + tag if tag else ''} to export")
    tag_dir = ckpt_dir / tag
    state, source, used = None, "", "module"
    if weights in ("auto", "ema"):
        state = _ema_state(tag_dir)
        if state is None and weights == "ema":
            raise ExportError(f"{tag_dir} holds no EMA weights (the run had ema_decay=0)")
        source, used = (checkpoint.state_path(ckpt_dir, tag, 0).name, "ema") if state is not None else ("", "module")
    if state is None:
        state, source = module_state(tag_dir)
    model = DualForce(cfg.model_config())
    own = model.state_dict()
    bad = sorted(k for k in own if k not in state or tuple(state[k].shape) != tuple(own[k].shape))
    if bad:
        hint = " (ZeRO-3 partitions: train with save_weights, then export again)" if cfg.ds_config == "zero3" else ""
        raise ExportError(f"{source} does not hold this run's model: {len(bad)} tensors missing or of another "
                          f"shape, e.g. {', '.join(bad[:4])}{hint}")
    model.load_state_dict({k: state[k].float() for k in own}, strict=True)
    provenance = {
        "run_dir": str(run_dir.resolve()), "checkpoint": tag, "step": int(tag.removeprefix("step")),
        "weights": used, "weights_file": source, "model_variant": cfg.model_variant,
        "train_window_frames": cfg.effective_window_frames, "crop_size": cfg.crop_size, "loss_options": cfg.loss_options,
        "noise_mode": cfg.noise_mode, "training_data": training_data(cfg),
        "initialised_from": provenance_of_start(cfg, run_dir),
    }
    path = model.save_pretrained(out_dir, provenance)
    return ExportResult(Path(path), provenance["step"], used, source, sum(p.numel() for p in model.parameters()))
