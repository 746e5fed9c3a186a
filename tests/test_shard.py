"""Step 7 on the real yongen crop: windows, alignment, determinism, bounds, index, reader validation."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from datasets_manifest.schema import ClipRow
from tasks import contract
from tasks.media import read_frames
from tasks.steps.shard import (
    ShardClip,
    ShardConfig,
    iter_samples,
    sample_key,
    shard_files,
    shard_group_of,
    window_starts,
    write_shards,
)

G = shard_group_of("yongen", 16)  # the default 16 groups; the group is a hash of the clip id alone


def _clip(crop, clip_id="yongen", split="train"):
    row = ClipRow(clip_id=clip_id, dataset="samples", source="/s/yongen.mp4", identity="yongen", split=split, start_s=1.0)
    return ShardClip(row=row, crop_dir=crop.clip_dir, frames=crop.frames, step_versions={"crop": "1"})


def _digests(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_files(root)}


def test_window_starts():
    cfg = ShardConfig(window_frames=33)
    assert cfg.step == 33
    assert window_starts(200, cfg) == [0, 33, 66, 99, 132, 165]
    assert window_starts(32, cfg) == []
    assert window_starts(41, ShardConfig(window_frames=9, stride=4)) == list(range(0, 41 - 9 + 1, 4))


def test_samples_are_aligned_windows_of_the_clip(yongen_crop, tmp_path):
    cfg = ShardConfig(window_frames=17, max_samples_per_shard=4)  # 17-frame windows, 4 per shard
    stats = write_shards([_clip(yongen_crop)], tmp_path / "shards", cfg, key="k")
    starts = window_starts(200, cfg)
    assert stats.samples == len(starts) == 11 and stats.shards == 3  # 4 + 4 + 3
    clip_audio, _ = sf.read(yongen_crop.audio, dtype="float32")
    clip_frames = read_frames(yongen_crop.video)
    spec = contract.ContractSpec(window_frames=17, require_features=False)
    seen = []
    for s in iter_samples(tmp_path / "shards", spec):
        start, end = s["meta"]["window"]
        seen.append(start)
        assert s["__key__"] == sample_key("yongen", start)
        audio, sr = sf.read(io.BytesIO(s[contract.AUDIO]), dtype="float32")
        assert sr == 16000 and len(audio) == 17 * 640
        assert np.allclose(audio, clip_audio[start * 640 : end * 640], atol=1 / 32768)
        video_path = tmp_path / "w.mp4"
        video_path.write_bytes(s[contract.VIDEO])
        frames = read_frames(video_path)
        assert frames.shape == (17, 512, 512, 3)
        # re-encoding the window loses little: the window matches the clip frames it was cut from
        err = np.abs(frames.astype(np.int16) - clip_frames[start:end].astype(np.int16)).mean()
        assert err < 4.0
        assert s["meta"]["source_time_range_s"] == pytest.approx([1.0 + start / 25, 1.0 + end / 25])
        assert s["meta"]["steps"] == {"crop": "1"}
    assert seen == starts
    index = pq.read_table(tmp_path / "shards" / "index.parquet").to_pylist()
    assert [r["window_start"] for r in index] == starts
    assert {r["shard"] for r in index} == {f"train/shard-{G}-{i:06d}.tar" for i in range(3)}
    stats_json = json.loads((tmp_path / "shards" / "stats.json").read_text())
    assert stats_json["samples"] == 11 and stats_json["latent_frames"] == 5


def test_same_inputs_same_bytes_and_skip_by_key(yongen_crop, tmp_path):
    cfg = ShardConfig(window_frames=33)
    write_shards([_clip(yongen_crop)], tmp_path / "a", cfg, key="k1")
    write_shards([_clip(yongen_crop)], tmp_path / "b", cfg, key="k1")
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    before = (tmp_path / "a" / "train" / f"shard-{G}-000000.tar").stat().st_mtime_ns
    again = write_shards([_clip(yongen_crop)], tmp_path / "a", cfg, key="k1")
    assert again.skipped and (tmp_path / "a" / "train" / f"shard-{G}-000000.tar").stat().st_mtime_ns == before
    with tarfile.open(tmp_path / "a" / "train" / f"shard-{G}-000000.tar") as tar:
        names = tar.getnames()
        assert all(m.mtime == 0 for m in tar.getmembers())
    assert names[:3] == ["yongen_w000000.audio.wav", "yongen_w000000.meta.json", "yongen_w000000.video.mp4"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_size_bound_and_splits(yongen_crop, tmp_path):
    clips = [_clip(yongen_crop, "c-train", "train"), _clip(yongen_crop, "c-test", "test")]
    stats = write_shards(clips, tmp_path / "s", ShardConfig(window_frames=33, max_bytes_per_shard=400_000), key="k")
    sizes = [p.stat().st_size for p in shard_files(tmp_path / "s")]
    assert stats.per_split["train"]["samples"] == stats.per_split["test"]["samples"] == 6
    assert len(sizes) > 2 and max(sizes) < 400_000 + 250_000  # one sample may overflow a fresh shard only
    assert {p.parent.name for p in shard_files(tmp_path / "s")} == {"train", "test"}


def test_reader_rejects_a_tampered_sample(yongen_crop, tmp_path):
    write_shards([_clip(yongen_crop)], tmp_path / "s", ShardConfig(window_frames=33), key="k")
    tar_path = tmp_path / "s" / "train" / f"shard-{G}-000000.tar"
    with tarfile.open(tar_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(tar_path, "w") as tar:
        for m, data in members:
            if m.name == "yongen_w000033.meta.json":
                meta = json.loads(data)
                meta["frames"] = 32
                data = json.dumps(meta).encode()
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    spec = contract.ContractSpec(window_frames=33, require_features=False)
    it = iter_samples(tmp_path / "s", spec)
    next(it)
    with pytest.raises(contract.ContractError, match=r"yongen_w000033.*meta.json: frames 32, expected window 33"):
        next(it)
