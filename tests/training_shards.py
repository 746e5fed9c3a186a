"""Test helper: small contract-valid training shards with random arrays (same layout as the real shard writer)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from tasks import contract

AUDIO_DIM = 32
CROP = 64  # -> 8x8 latents
WINDOW = 9  # video frames -> 3 latent frames


def sample_members(
    rng: np.random.Generator, clip_id: str, window: int = WINDOW, crop: int = CROP, audio_dim: int = AUDIO_DIM,
    profile: str = contract.TALKING_HEAD,
) -> dict[str, bytes]:
    hw = crop // contract.VAE_SPACE_STRIDE
    latents = contract.latent_frames(window)
    meta = {
        "clip_id": clip_id,
        "dataset": "synthetic",
        "source": "tests/training_shards.py",
        "split": "train",
        "window": [0, window],
        "frames": window,
        "audio_dim": audio_dim,
        "steps": {"sharding": "test"},
        "profile": profile,
    }
    members = {
        contract.VIDEO: b"\x00\x00\x00\x18ftypmp42",  # training ignores the media members
        contract.AUDIO: b"RIFF\x24\x00\x00\x00WAVE",
        contract.VIDEO_LATENTS: contract.npy_bytes(
            rng.standard_normal((contract.LATENT_CHANNELS, latents, hw, hw)).astype(np.float16)
        ),
        contract.REFERENCE_LATENT: contract.npy_bytes(
            rng.standard_normal((contract.LATENT_CHANNELS, 1, hw, hw)).astype(np.float16)
        ),
        contract.STRUCT: contract.npy_bytes(rng.standard_normal((window, contract.STRUCT_DIM)).astype(np.float32)),
        contract.AUDIO_FEATURES: contract.npy_bytes(rng.standard_normal((window, audio_dim)).astype(np.float16)),
        contract.KEEP_MASK: contract.npy_bytes(rng.random(window) > 0.1),
        contract.META: json.dumps(meta).encode(),
    }
    if profile == contract.VIDEO_ONLY:  # the general-video profile: video members only
        keep = set(contract.PROFILE_MEMBERS[profile][0] + contract.PROFILE_MEMBERS[profile][1])
        members = {k: v for k, v in members.items() if k in keep}
    return members


def write_shards(
    out_dir: Path,
    n_shards: int,
    per_shard: int,
    seed: int = 0,
    window: int = WINDOW,
    crop: int = CROP,
    audio_dim: int = AUDIO_DIM,
    tamper: Optional[Callable[[str, dict[str, bytes]], dict[str, bytes]]] = None,
    profile: str = contract.TALKING_HEAD,
) -> list[Path]:
    """Write shard-%06d.tar files; `tamper(key, members)` may alter a sample's members before writing."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(n_shards):
        path = out_dir / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"clip{s:03d}_w{i:06d}"  # the shard writer's key form (tasks.shard.sample_key)
                members = sample_members(rng, key, window, crop, audio_dim, profile)
                if tamper is not None:
                    members = tamper(key, members)
                for name, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{name}")
                    info.size = len(data)
                    info.mtime = 0
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def train_config(shards: Path, out_dir: Path, **overrides) -> dict:
    """A TrainConfig dict for the tiny model over shards from write_shards (tests override what they study)."""
    cfg = dict(shards=[str(Path(shards) / "shard-*.tar")], out_dir=str(out_dir), window=WINDOW, crop_size=CROP,
               audio_dim=AUDIO_DIM, micro_batch=2, total_steps=3, ckpt_every=10, warmup_steps=1, num_workers=0,
               shuffle_buffer=4)
    cfg.update(overrides)
    return cfg
