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
    rng: np.random.Generator, clip_id: str, window_frames: int = WINDOW, crop: int = CROP, audio_dim: int = AUDIO_DIM,
    profile: str = contract.TALKING_HEAD, split: str = "train", media: Optional[tuple[bytes, bytes]] = None,
    meta_extra: Optional[dict] = None,
) -> dict[str, bytes]:
    """`media`: real (video.mp4, audio.wav) bytes for tests that decode them (validation, evaluation)."""
    hw = crop // contract.VAE_SPACE_STRIDE
    latents = contract.latent_frames(window_frames)
    meta = {
        "clip_id": clip_id,
        "dataset": "synthetic",
        "source": "tests/training_shards.py",
        "split": split,
        "window": [0, window_frames],
        "frames": window_frames,
        "audio_dim": audio_dim,
        "steps": {"sharding": "test"},
        "profile": profile,
        **(meta_extra or {}),
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
        contract.STRUCT: contract.npy_bytes(rng.standard_normal((window_frames, contract.STRUCT_DIM)).astype(np.float32)),
        contract.AUDIO_FEATURES: contract.npy_bytes(rng.standard_normal((window_frames, audio_dim)).astype(np.float16)),
        contract.KEEP_MASK: contract.npy_bytes(rng.random(window_frames) > 0.1),
        contract.META: json.dumps(meta).encode(),
    }
    if media is not None:
        members[contract.VIDEO], members[contract.AUDIO] = media
    if profile == contract.VIDEO_ONLY:  # the general-video profile: video members only
        keep = set(contract.PROFILE_MEMBERS[profile][0] + contract.PROFILE_MEMBERS[profile][1])
        members = {k: v for k, v in members.items() if k in keep}
    return members


def write_shards(
    out_dir: Path,
    n_shards: int,
    per_shard: int,
    seed: int = 0,
    window_frames: int = WINDOW,
    crop: int = CROP,
    audio_dim: int = AUDIO_DIM,
    tamper: Optional[Callable[[str, dict[str, bytes]], dict[str, bytes]]] = None,
    profile: str = contract.TALKING_HEAD,
    split: str = "train",
    media: Optional[Callable[[str], tuple[bytes, bytes]]] = None,
    meta_extra: Optional[dict] = None,
) -> list[Path]:
    """Write shard-%06d.tar files; `tamper(key, members)` may alter a sample's members before writing;
    `media(key)` gives a sample real video.mp4 and audio.wav bytes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for s in range(n_shards):
        path = out_dir / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"clip{s:03d}_w{i:06d}"  # the shard writer's key form (tasks.steps.shard.sample_key)
                members = sample_members(rng, key, window_frames, crop, audio_dim, profile, split,
                                         media(key) if media else None, meta_extra)
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
    cfg = dict(shards=[str(Path(shards) / "shard-*.tar")], out_dir=str(out_dir), window_frames=WINDOW, crop_size=CROP,
               audio_dim=AUDIO_DIM, micro_batch=2, total_steps=3, ckpt_every=10, warmup_steps=1, num_workers=0,
               shuffle_buffer=4)
    cfg.update(overrides)
    return cfg


def train_in_process(cfg) -> None:
    """Run a TrainConfig as rank 0 of 1 in this process (gloo on CPU), writing train_config.json as `dualforce
    train` does; the environment it sets is restored afterwards."""
    import os

    from tests.conftest import _free_port
    from training.launch import environment
    from training.trainer import run_training

    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_config.json").write_text(json.dumps(cfg.to_dict()))
    env = {k: v for k, v in environment().items() if k in ("DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR")}
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        status = run_training(cfg)
        assert status.status == "completed", status
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def real_media(source: Path, window_frames: int = WINDOW, crop: int = CROP) -> Callable[[str], tuple[bytes, bytes]]:
    """`write_shards(media=...)` with real frames and speech: the `source` video at crop x crop, a new stretch per
    sample (20 frames apart), its speech cut to exactly window_frames x 640 samples."""
    import tempfile

    from tasks.media import VideoWriter, read_audio, read_frames, wav_bytes

    frames = read_frames(source, scale_to=(crop, crop))
    audio = read_audio(source)
    made: list[str] = []

    def media(key: str) -> tuple[bytes, bytes]:
        start = 20 * len(made)
        made.append(key)
        with tempfile.TemporaryDirectory() as tmp:
            with VideoWriter(Path(tmp) / "w.mp4", crop, crop) as writer:
                writer.write(frames[start:start + window_frames])
            video = (Path(tmp) / "w.mp4").read_bytes()
        a = start * contract.AUDIO_SAMPLES_PER_FRAME
        return video, wav_bytes(audio[a:a + window_frames * contract.AUDIO_SAMPLES_PER_FRAME])

    return media
