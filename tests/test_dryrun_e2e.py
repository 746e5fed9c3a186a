"""End to end: the README's dry-run command on the real sample clips, re-run, and killed + resumed."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from tasks import contract
from tasks.ledger import latest_status, read_ledger
from tasks.media import probe, read_frames
from tasks.shard import iter_samples, shard_files

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
CLIPS = ("samples_sun", "samples_yongen")


def _env(prefect_home: Path) -> dict:
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PYTHONUNBUFFERED="1")
    return env


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "dry-run", "--out", str(out), "--no-progress"]


def _digests(shards: Path) -> dict:
    return {p.relative_to(shards).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in shard_files(shards)}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect")
    out = tmp_path_factory.mktemp("dryrun")
    proc = subprocess.run(_cmd(out), cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, home, proc.stdout


def test_dry_run_makes_shards_from_both_clips(dry_run):
    out, _, stdout = dry_run
    base = out / "samples"
    assert "2/2 clips made it through" in stdout and str(base) in stdout
    status = latest_status(base)
    for clip in CLIPS:
        for step in ("download", "crop", "shard"):
            assert status[(clip, step)]["status"] == "ok", (clip, step, status[(clip, step)])
    spec = contract.ContractSpec(window=33, require_features=False)
    per_clip: dict[str, int] = {}
    for s in iter_samples(base / "shards", spec):
        per_clip[s["meta"]["clip_id"]] = per_clip.get(s["meta"]["clip_id"], 0) + 1
    # sun: 22.0 s -> 550 frames -> 16 windows; yongen: audio 8.0 s -> 200 frames -> 6 windows
    assert per_clip == {"samples_sun": 16, "samples_yongen": 6}
    stats = json.loads((base / "shards" / "stats.json").read_text())
    assert stats["samples"] == 22 and stats["clips"] == 2


def test_crop_outputs_meet_the_contract(dry_run):
    out, _, _ = dry_run
    for clip, seconds in (("samples_sun", 22.0), ("samples_yongen", 8.0)):
        d = out / "samples" / "steps" / "crop" / clip
        info = probe(d / "crop.mp4")
        assert (info.width, info.height, info.fps) == (512, 512, 25.0)
        frames = len(read_frames(d / "crop.mp4"))
        assert frames == int(seconds * 25)  # frame count = duration x 25
        assert sf.info(d / "audio.wav").frames == frames * 640  # audio samples = frames x 640
        lm = np.load(d / "landmarks.npy")
        # face centroid near the crop centre, 64 px low by LivePortrait's vy_ratio; tolerance 8% of 512
        centre = lm.mean(axis=(0, 1))
        assert abs(centre[0] - 256) < 41 and abs(centre[1] - 320) < 41, centre


def test_second_run_does_no_step_work(dry_run):
    out, home, _ = dry_run
    shards = out / "samples" / "shards"
    before = {p: p.stat().st_mtime_ns for p in shard_files(shards)}
    proc = subprocess.run(_cmd(out), cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = read_ledger(out / "samples").to_pylist()
    last_run = ledger[-1]["run_id"]
    rows = [r for r in ledger if r["run_id"] == last_run]
    assert len(rows) == 6 and {r["action"] for r in rows} == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in shard_files(shards)} == before


def test_killed_run_resumes_to_identical_shards(dry_run, tmp_path):
    out, home, _ = dry_run
    resumed = tmp_path / "resumed"
    proc = subprocess.Popen(_cmd(resumed), cwd=REPO, env=_env(home), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    crop_dir = resumed / "samples" / "steps" / "crop"
    deadline = time.time() + 600
    while time.time() < deadline and not any(crop_dir.glob("*/_status.json")):
        assert proc.poll() is None, "the dry-run ended before it could be killed"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: one clip cropped, the other not, no shards yet
    proc.wait()
    assert len(list(crop_dir.glob("*/_status.json"))) == 1
    assert not (resumed / "samples" / "shards").exists()

    done = subprocess.run(_cmd(resumed), cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digests(resumed / "samples" / "shards") == _digests(out / "samples" / "shards")
    a = pq.read_table(out / "samples" / "shards" / "index.parquet").to_pylist()
    b = pq.read_table(resumed / "samples" / "shards" / "index.parquet").to_pylist()
    assert a == b
    assert not list((resumed / "samples" / "steps" / "crop").glob(".*tmp*"))
