"""A training run's data fields from the shard sets it reads (shards, window, profile, audio width).

A shard set is a preprocess output folder (ROOT/DATASET/shards: stats.json, <split>/shard-*.tar). Several sets
train together only when their windows agree; a talking-head set also needs one HuBERT width across sets.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from datasets_manifest.schema import SPLITS
from tasks import contract
from tasks.steps.shard import STATS_FILE, iter_samples


@dataclass(frozen=True)
class ShardSetInfo:
    path: Path
    window_frames: int
    crop_size: int
    profile: str  # contract.TALKING_HEAD | contract.VIDEO_ONLY
    audio_dim: Optional[int]  # None for video-only sets
    struct_dim: int = contract.STRUCT_DIM  # the struct source's width (LivePortrait 133, FLAME: its layout's)
    struct_source: str = "liveportrait"


def shard_set_info(shard_dir: Path, split: str = "train") -> ShardSetInfo:
    """What a shard set holds, from its stats.json and its first sample of `split`."""
    stats_file = Path(shard_dir) / STATS_FILE
    if not stats_file.is_file():
        raise FileNotFoundError(f"{shard_dir} is not a shard set (no {STATS_FILE}; run preprocess first)")
    stats = json.loads(stats_file.read_text())
    profile = stats.get("profile", contract.TALKING_HEAD)  # sets written before profiles existed are talking-head
    first = next(iter_samples(shard_dir, split=split), None)
    if first is None:
        raise ValueError(f"no {split} samples under {shard_dir}")
    audio_dim = None if profile == contract.VIDEO_ONLY else int(first["meta"]["audio_dim"])
    crop_size = int(stats.get("crop_size", contract.CROP_SIZE))
    return ShardSetInfo(Path(shard_dir), int(stats["window_frames"]), crop_size, profile, audio_dim,
                        int(stats.get("struct_dim", contract.STRUCT_DIM)), str(stats.get("struct_source", "liveportrait")))


def train_data_fields(shard_dirs: list[str | Path], split: str = "train", video_only: bool = False) -> dict[str, Any]:
    """TrainConfig's data fields for these shard sets; `video_only` trains on any profile's video members."""
    infos = [shard_set_info(Path(d), split) for d in shard_dirs]
    if not infos:
        raise ValueError("no shard sets given")
    shapes = {(i.window_frames, i.crop_size) for i in infos}
    if len(shapes) > 1:
        raise ValueError(f"shard sets disagree on the window or crop size: "
                         f"{[(str(i.path), i.window_frames, i.crop_size) for i in infos]}")
    window_frames, crop_size = shapes.pop()
    fields: dict[str, Any] = {
        "shards": [str(i.path / split / "shard-*.tar") for i in infos],
        "window_frames": window_frames,
        "crop_size": crop_size,
        "video_only": video_only,
    }
    if not video_only:
        video = [str(i.path) for i in infos if i.profile == contract.VIDEO_ONLY]
        if video:
            raise ValueError(f"video-only shard sets cannot train the full model (no struct or audio): {video}")
        dims = {(i.audio_dim, i.struct_dim, i.struct_source) for i in infos}
        if len(dims) > 1:
            raise ValueError("shard sets disagree on the HuBERT width or the struct source: "
                             f"{[(str(i.path), i.audio_dim, i.struct_source, i.struct_dim) for i in infos]}")
        fields["audio_dim"], fields["struct_dim"], _ = dims.pop()
    return fields


DATA_FIELDS = ("window_frames", "crop_size", "audio_dim", "struct_dim")  # what a shard set decides for its runs


def with_data_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A raw training config (`dualforce train --config`) with the data fields it leaves out taken from the shard
    sets its `shards` belong to (window_frames, crop size, HuBERT width, struct width), as program and pipeline
    take them; fields it states are kept (a disagreement is the loader's contract error, naming the sample)."""
    missing = [k for k in DATA_FIELDS if k not in config]
    if not missing:
        return config
    roots = [shard_set_root(str(p)) for p in config.get("shards") or []]
    if not roots or not all((r / STATS_FILE).is_file() for r in roots):
        return config
    named = [p for pattern in config["shards"] for p in Path(str(pattern)).parts if p in SPLITS]
    try:
        found = train_data_fields(roots, named[0] if named else "train", video_only=bool(config.get("video_only")))
    except (ValueError, FileNotFoundError):  # no sample to read the widths from: the checks after this one say why
        return config
    return {**config, **{k: found[k] for k in missing if k in found}}


def shard_set_root(pattern: str) -> Path:
    """The shard set folder (the one holding stats.json) of a training run's shard pattern or folder."""
    root = Path(pattern.split("/train/")[0].split("{")[0]).resolve()
    probe = root
    while probe != probe.parent and not (probe / STATS_FILE).is_file():
        probe = probe.parent
    return probe if (probe / STATS_FILE).is_file() else root
