"""Held-out clips of a shard set, decoded for generation: one window per clip, its reference latent (the clip's
first frame), its HuBERT rows, its frames and its speech. Validation samples and `evaluate` both read them.

The first window of each clip in shard order, for the first `count` clips: the same clips at every validation
step and in every run on the same shard set, so samples are comparable across steps and runs.
"""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from tasks import contract

log = logging.getLogger(__name__)
HELD_OUT_SPLITS = ("val", "test")


@dataclass
class HeldOutClip:
    key: str  # the sample's key (clip id + window start)
    clip_id: str
    reference_latent: np.ndarray  # [16, 1, h, w] float32
    audio_features: np.ndarray  # [T, A] float32, row i = frame i
    frames: np.ndarray  # uint8 [T, H, W, 3]: the ground truth
    audio: np.ndarray  # float32 [T * 640], 16 kHz mono
    split: str
    meta: dict = field(default_factory=dict)
    video_latents: Optional[np.ndarray] = None  # [16, L, h, w] the window's ground-truth latents
    struct: Optional[np.ndarray] = None  # [T, S] the window's motion rows (the struct stream's ground truth)
    keep_mask: Optional[np.ndarray] = None  # [T] bool: frames whose motion rows are real


def _npy(sample: dict, member: str) -> np.ndarray:
    return contract.load_npy(sample[member]).astype(np.float32)


def decode_clip(sample: dict, split: str) -> HeldOutClip:
    import soundfile as sf

    from tasks.media import decode_video_bytes

    audio, _ = sf.read(io.BytesIO(sample[contract.AUDIO]), dtype="float32")
    meta = sample["meta"]
    return HeldOutClip(sample["__key__"], str(meta.get("clip_id", sample["__key__"])),
                       _npy(sample, contract.REFERENCE_LATENT), _npy(sample, contract.AUDIO_FEATURES),
                       decode_video_bytes(sample[contract.VIDEO]), audio.reshape(-1), split, meta,
                       video_latents=_npy(sample, contract.VIDEO_LATENTS), struct=_npy(sample, contract.STRUCT),
                       keep_mask=contract.load_npy(sample[contract.KEEP_MASK]).astype(bool))


def held_out_clips(shard_root: str | Path, count: int, split: Optional[str] = None) -> list[HeldOutClip]:
    """The first window of each of the first `count` clips of `split` (default: val, then test; a set with neither
    gives its training clips, and says so: a toy set of two clips has no held-out identity)."""
    from tasks.steps.shard import iter_samples

    splits = (split,) if split else (*HELD_OUT_SPLITS, "train")
    for name in splits:
        clips, seen = [], set()
        for sample in iter_samples(shard_root, split=name):
            if sample["meta"].get("profile", contract.TALKING_HEAD) != contract.TALKING_HEAD:
                continue
            clip_id = sample["meta"].get("clip_id")
            if clip_id in seen:
                continue
            seen.add(clip_id)
            clips.append(decode_clip(sample, name))
            if len(clips) == count:
                break
        if clips:
            if name == "train" and split is None:  # the user's own --split train needs no warning
                log.warning("%s has no held-out split: validation uses %d training clips", shard_root, len(clips))
            return clips
    return []



class NoHeldOutClips(ValueError):
    """A shard set with no talking-head sample in the split asked for; the message names the splits it has."""


def no_clips_message(shard_root: str | Path, split: Optional[str]) -> str:
    """Why there is nothing to evaluate on, and the `--split` that would give something (from stats.json)."""
    import json

    from tasks.steps.shard import STATS_FILE

    asked = f"split {split!r}" if split else f"a held-out split ({' / '.join(HELD_OUT_SPLITS)}) or train"
    stats_file = Path(shard_root) / STATS_FILE
    per_split = json.loads(stats_file.read_text()).get("per_split", {}) if stats_file.is_file() else {}
    have = {name: v.get("clips", 0) for name, v in per_split.items() if v.get("samples")}
    if not have:
        return f"{shard_root}: no talking-head sample in {asked}; the set holds no samples at all"
    listing = ", ".join(f"{name} ({n} clips)" for name, n in have.items())
    best = max(have, key=lambda name: have[name])
    return (f"{shard_root}: no talking-head sample in {asked}; the set has {listing}: pass --split {best} "
            f"(held-out metrics on training clips measure fit, not generalisation)")


def check_shard_set(shards: str | Path, split: Optional[str]) -> Path:
    """The shard set's root, checked before any model is loaded or flow started: NoHeldOutClips when the set has
    no stats.json or no shard in the split asked for (or in any split, with none asked)."""
    from tasks.steps.shard import STATS_FILE, shard_files
    from training.shard_sets import shard_set_root

    root = shard_set_root(str(shards))
    if not (root / STATS_FILE).is_file():
        raise NoHeldOutClips(f"{shards} is not a shard set (no {STATS_FILE} in it or above it)")
    if not any(shard_files(root, name) for name in ((split,) if split else (*HELD_OUT_SPLITS, "train"))):
        raise NoHeldOutClips(no_clips_message(root, split))
    return root
