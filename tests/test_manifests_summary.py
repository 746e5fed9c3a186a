"""Summary figures, storage arithmetic, and the written manifest round-tripping through schema.read_manifest."""
from __future__ import annotations

from pathlib import Path

import pytest

from datasets_manifest import build_manifest, manifest_command
from datasets_manifest.schema import ClipRow, read_manifest
from datasets_manifest.summary import (
    CROP_BYTES_PER_S,
    DOWNLOAD_BYTES_PER_S,
    MOTION_BYTES_PER_S,
    VAE_BYTES_PER_S,
    format_summary,
    hubert_bytes_per_s,
    shard_bytes_per_window,
    storage_bytes_per_second,
    summarize,
)

FIX = Path(__file__).parent / "fixtures" / "manifests"


def test_storage_constants_arithmetic():
    assert DOWNLOAD_BYTES_PER_S == 578_500  # (4.5 Mbit/s + 128 kbit/s) / 8
    assert CROP_BYTES_PER_S == 250_000 + 32_000  # 2 Mbit/s H.264 + 16 kHz int16 wav
    assert MOTION_BYTES_PER_S == 133 * 2 * 25
    assert hubert_bytes_per_s(768) == 38_400 and hubert_bytes_per_s(1024) == 51_200
    assert VAE_BYTES_PER_S == 16 * 6.25 * 64 * 64 * 2 == 819_200
    # one 49-frame window: 13 latent frames + 1 reference latent + struct + audio + keep + meta + 6 tar members
    expected = 16 * 13 * 64 * 64 * 2 + 16 * 64 * 64 * 2 + 133 * 2 * 49 + 1024 * 2 * 49 + 49 + 1024 + 6 * 1024
    assert shard_bytes_per_window(49, 1024) == expected
    assert storage_bytes_per_second(49, 1024)["shards"] == pytest.approx(expected / (49 / 25))
    with pytest.raises(ValueError, match="4n\\+1"):
        shard_bytes_per_window(48)


def test_summary_numbers_on_the_hdtf_fixture():
    b = build_manifest("hdtf", FIX / "hdtf")
    s = summarize(b.rows, dataset="hdtf", errors=len(b.errors))
    seconds = 75 + 170 + 40 + 40  # Radio1_0, JaneDoe0_0, JaneDoe1_0, JaneDoe1_1
    assert (s.clips, s.identities, s.errors, s.unknown_duration_clips) == (4, 2, 4, 0)
    assert s.hours == pytest.approx(seconds / 3600)
    assert s.per_split["train"].clips == 4 and s.per_split["train"].hours == pytest.approx(seconds / 3600)
    assert s.per_split["val"].clips == 0 and s.per_split["test"].hours == 0.0
    assert s.storage_bytes["download"] == pytest.approx(578_500 * seconds)
    assert s.storage_bytes["vae"] == pytest.approx(819_200 * seconds)
    steps = ["download", "crop", "motion", "flame", "hubert", "vae", "shards"]
    assert list(s.storage_bytes) == steps + ["total"]
    assert s.storage_bytes["total"] == pytest.approx(sum(s.storage_bytes[k] for k in steps))
    text = format_summary(s)
    assert "clips 4" in text and "identities 2" in text and "skipped records 4" in text
    assert "download" in text and "578,500" in text


def test_summary_per_split_and_unknown_durations():
    rows = [
        ClipRow(clip_id="a", dataset="x", source="/a.mp4", start_s=0, end_s=3600, identity="p1", split="train"),
        ClipRow(clip_id="b", dataset="x", source="/b.mp4", start_s=10, end_s=1810, identity="p2", split="val"),
        ClipRow(clip_id="c", dataset="x", source="/c.mp4", identity="p3", split="test"),  # whole file
    ]
    s = summarize(rows)
    assert s.hours == pytest.approx(1.5) and s.unknown_duration_clips == 1
    assert (s.per_split["train"].hours, s.per_split["val"].hours, s.per_split["test"].hours) == (1.0, 0.5, 0.0)
    assert (s.per_split["test"].clips, s.per_split["test"].identities) == (1, 1)
    assert s.storage_bytes["crop"] == pytest.approx(282_000 * 5400)
    assert "1 clips have no known duration" in format_summary(s)


def test_manifest_command_writes_a_parquet_that_round_trips(tmp_path):
    out = tmp_path / "manifests" / "vfhq.parquet"
    text = manifest_command("vfhq", FIX / "vfhq", out, seed=3)
    assert out.exists() and not list(out.parent.glob("*.tmp"))
    rows, bad = read_manifest(out)
    assert bad == []
    expected = build_manifest("vfhq", FIX / "vfhq", seed=3).rows
    assert [r.model_dump() for r in rows] == [r.model_dump() for r in expected]
    assert rows[0].face_box == [446.0, 6.0, 937.0, 497.0]
    assert "wrote 2 rows" in text and "skipped records 3" in text
    assert "missing header line 'CROP'" in text  # the skipped records are listed with their reasons


def test_round_trip_keeps_none_boxes_and_open_ends(tmp_path):
    out = tmp_path / "mead.parquet"
    manifest_command("mead", FIX / "mead", out)
    rows, bad = read_manifest(out)
    assert bad == [] and len(rows) == 3
    assert all(r.end_s is None and r.face_box is None and r.identity in ("M003", "W009") for r in rows)
