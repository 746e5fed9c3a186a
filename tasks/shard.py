"""Step 7, shard: clips -> fixed-length 4n+1-frame training windows in webdataset tar shards.

Shards are written per split (`<out>/<split>/shard-%06d.tar`), bounded by sample count and bytes, with a
parquet index (sample key, shard, clip id, window, split) and `stats.json`. The whole shard set is built in
a temporary directory and renamed into place, and tar headers carry a fixed mtime, so the same inputs give
the same bytes whether or not an earlier run was killed.
"""
from __future__ import annotations

import io
import json
import shutil
import tempfile
import uuid
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import soundfile as sf
import webdataset as wds

from datasets_manifest.schema import ClipRow, sanitize_clip_id
from tasks import contract
from tasks.crop import CROP_AUDIO, CROP_VIDEO
from tasks.media import VideoWriter, iter_frames, wav_bytes

INDEX_FILE = "index.parquet"
STATS_FILE = "stats.json"
STATUS_FILE = "_status.json"


@dataclass(frozen=True)
class ShardConfig:
    n: int = 8  # window = 4n+1 video frames (33 frames, 1.32 s) -> n+1 latent frames
    stride: Optional[int] = None  # frames between window starts; None = window (no overlap)
    max_samples_per_shard: int = 200
    max_bytes_per_shard: int = 512 << 20
    video_crf: int = 18

    @property
    def window(self) -> int:
        return contract.window_frames(self.n)

    @property
    def step(self) -> int:
        return self.stride or self.window


# A feature source adds members to a sample: (clip, start, end) -> {member name: bytes}.
FeatureSource = Callable[["ShardClip", int, int], dict[str, bytes]]


@dataclass
class ShardClip:
    row: ClipRow
    crop_dir: Path
    frames: int
    step_versions: dict[str, str]
    lineage: dict = field(default_factory=dict)
    feature_sources: list[FeatureSource] = field(default_factory=list)
    meta_extra: dict = field(default_factory=dict)


def window_starts(frames: int, cfg: ShardConfig) -> list[int]:
    return list(range(0, frames - cfg.window + 1, cfg.step))


def sample_key(clip_id: str, start: int) -> str:
    return f"{sanitize_clip_id(clip_id)}_w{start:06d}"


def _encode_window(frames: np.ndarray, crf: int) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.mp4"
        with VideoWriter(path, frames.shape[2], frames.shape[1], fps=contract.FPS, crf=crf) as w:
            w.write(frames)
        return path.read_bytes()


def _iter_windows(clip: ShardClip, cfg: ShardConfig) -> Iterator[tuple[int, np.ndarray]]:
    """Windows of decoded crop frames, streaming (only one window plus one chunk in memory)."""
    starts = window_starts(clip.frames, cfg)
    if not starts:
        return
    buf: list[np.ndarray] = []
    buf_start = 0
    next_i = 0
    for chunk in iter_frames(clip.crop_dir / CROP_VIDEO):
        buf.extend(chunk)
        while next_i < len(starts) and starts[next_i] + cfg.window <= buf_start + len(buf):
            s = starts[next_i]
            yield s, np.stack(buf[s - buf_start : s - buf_start + cfg.window])
            next_i += 1
        if next_i < len(starts):  # drop frames no later window needs
            drop = starts[next_i] - buf_start
            if drop > 0:
                del buf[:drop]
                buf_start += drop
        else:
            break


def _sample(clip: ShardClip, start: int, frames: np.ndarray, audio: np.ndarray, cfg: ShardConfig) -> dict:
    end = start + cfg.window
    row = clip.row
    meta = {
        "clip_id": row.clip_id,
        "dataset": row.dataset,
        "source": row.source,
        "identity": row.identity,
        "split": row.split,
        "attribution": row.attribution,
        "source_time_range_s": [row.start_s + start / contract.FPS, row.start_s + end / contract.FPS],
        "window": [start, end],
        "frames": cfg.window,
        "fps": contract.FPS,
        "sample_rate": contract.SAMPLE_RATE,
        "steps": clip.step_versions,
        "lineage": clip.lineage,
        **clip.meta_extra,
    }
    a = contract.AUDIO_SAMPLES_PER_FRAME
    sample = {
        "__key__": sample_key(row.clip_id, start),
        contract.VIDEO: _encode_window(frames, cfg.video_crf),
        contract.AUDIO: wav_bytes(audio[start * a : end * a]),
    }
    for source in clip.feature_sources:
        sample.update(source(clip, start, end))
    sample[contract.META] = json.dumps(meta, sort_keys=True).encode()
    return sample


class _SplitWriter:
    """Rolls tar shards for one split, each written under a temp name and renamed when closed."""

    def __init__(self, out: Path, split: str, cfg: ShardConfig):
        self.dir = out / split
        self.dir.mkdir(parents=True, exist_ok=True)
        self.split, self.cfg = split, cfg
        self.index = 0
        self.count = 0
        self.bytes = 0
        self._tar: Optional[wds.TarWriter] = None
        self._tmp: Optional[Path] = None
        self.shards: list[dict] = []

    def _open(self) -> None:
        self._tmp = self.dir / f".shard-{self.index:06d}.tar.tmp"
        self._tar = wds.TarWriter(str(self._tmp), mtime=0.0, user="dualforce", group="dualforce", mode=0o444)
        self.count = self.bytes = 0

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.dir / f"shard-{self.index:06d}.tar"
        self._tmp.replace(final)
        self.shards.append({"shard": f"{self.split}/{final.name}", "samples": self.count, "bytes": final.stat().st_size})
        self._tar = None
        self.index += 1

    def write(self, sample: dict) -> str:
        size = sum(len(v) for k, v in sample.items() if not k.startswith("__"))
        if self._tar is not None and (
            self.count >= self.cfg.max_samples_per_shard or self.bytes + size > self.cfg.max_bytes_per_shard
        ):
            self._close()
        if self._tar is None:
            self._open()
        self._tar.write(sample)
        self.count += 1
        self.bytes += size
        return f"{self.split}/shard-{self.index:06d}.tar"

    def close(self) -> None:
        self._close()


@dataclass
class ShardSetStats:
    out_dir: Path
    samples: int
    shards: int
    bytes: int
    clips: int
    per_split: dict
    skipped: bool = False


def write_shards(
    clips: list[ShardClip],
    out_dir: str | Path,
    cfg: ShardConfig = ShardConfig(),
    key: str = "",
    on_clip: Optional[Callable[[ShardClip, int], None]] = None,
) -> ShardSetStats:
    """Write the shard set for `clips` into `out_dir` (replacing it atomically); skip when `key` matches."""
    out_dir = Path(out_dir)
    status = out_dir / STATUS_FILE
    if key and status.exists():
        done = json.loads(status.read_text())
        if done.get("key") == key:
            s = done["stats"]
            return ShardSetStats(out_dir, s["samples"], s["shards"], s["bytes"], s["clips"], s["per_split"], skipped=True)

    staging = out_dir.with_name(f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    staging.mkdir(parents=True)
    try:
        writers: dict[str, _SplitWriter] = {}
        index_rows: list[dict] = []
        for clip in sorted(clips, key=lambda c: c.row.clip_id):
            audio, sr = sf.read(clip.crop_dir / CROP_AUDIO, dtype="float32")
            if sr != contract.SAMPLE_RATE:
                raise ValueError(f"{clip.row.clip_id}: wav at {sr} Hz, expected {contract.SAMPLE_RATE}")
            writer = writers.setdefault(clip.row.split, _SplitWriter(staging, clip.row.split, cfg))
            n = 0
            for start, frames in _iter_windows(clip, cfg):
                sample = _sample(clip, start, frames, audio, cfg)
                shard = writer.write(sample)
                index_rows.append({
                    "key": sample["__key__"], "shard": shard, "clip_id": clip.row.clip_id,
                    "window_start": start, "window_end": start + cfg.window, "split": clip.row.split,
                })
                n += 1
            if on_clip:
                on_clip(clip, n)
        for w in writers.values():
            w.close()
        shards = [s for w in writers.values() for s in w.shards]
        per_split: dict = defaultdict(lambda: {"samples": 0, "shards": 0, "clips": 0})
        for s in shards:
            per_split[s["shard"].split("/")[0]]["samples"] += s["samples"]
            per_split[s["shard"].split("/")[0]]["shards"] += 1
        for c in clips:
            if c.row.split in per_split:
                per_split[c.row.split]["clips"] += 1
        stats = {
            "samples": len(index_rows),
            "shards": len(shards),
            "bytes": sum(s["bytes"] for s in shards),
            "clips": len({r["clip_id"] for r in index_rows}),
            "per_split": dict(per_split),
            "window_frames": cfg.window,
            "latent_frames": contract.latent_frames(cfg.window),
            "config": asdict(cfg),
            "shard_files": shards,
        }
        pq.write_table(pa.Table.from_pylist(index_rows, schema=INDEX_SCHEMA), staging / INDEX_FILE)
        (staging / STATS_FILE).write_text(json.dumps(stats, indent=1, sort_keys=True))
        (staging / STATUS_FILE).write_text(json.dumps({"key": key, "stats": stats}, sort_keys=True))
        if out_dir.exists():
            trash = out_dir.with_name(f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            out_dir.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ShardSetStats(out_dir, stats["samples"], stats["shards"], stats["bytes"], stats["clips"], stats["per_split"])


INDEX_SCHEMA = pa.schema(
    [("key", pa.string()), ("shard", pa.string()), ("clip_id", pa.string()),
     ("window_start", pa.int64()), ("window_end", pa.int64()), ("split", pa.string())]
)


def shard_files(shard_dir: str | Path, split: Optional[str] = None) -> list[Path]:
    root = Path(shard_dir)
    pattern = f"{split}/shard-*.tar" if split else "*/shard-*.tar"
    return sorted(root.glob(pattern))


def iter_samples(
    shard_dir: str | Path, spec: Optional[contract.ContractSpec] = None, split: Optional[str] = None
) -> Iterator[dict]:
    """Every sample (member name -> bytes, plus __key__ and parsed `meta`), validated when `spec` is given."""
    files = shard_files(shard_dir, split)
    if not files:
        return
    for sample in wds.WebDataset([str(f) for f in files], shardshuffle=False, empty_check=False):
        sample = {k: v for k, v in sample.items() if k != "__url__" and k != "__local_path__"}
        if spec is not None:
            sample["meta"] = contract.validate_sample(sample, spec)
        else:
            sample["meta"] = json.loads(sample[contract.META])
        yield sample


def decode_audio(data: bytes) -> np.ndarray:
    audio, sr = sf.read(io.BytesIO(data), dtype="float32")
    if sr != contract.SAMPLE_RATE:
        raise contract.ContractError(f"audio at {sr} Hz, expected {contract.SAMPLE_RATE}")
    return audio
