"""End to end: the README's dry-run command on the real sample clips, re-run, and killed + resumed."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf

from tasks import contract
from tasks.audit import CHECKS, AuditModels, audit_shards
from tasks.contact_sheet import LABEL
from tasks.feature_models import dryrun_models, motion_extractor
from tasks.ledger import latest_status, read_ledger
from tasks.media import probe, read_frames
from tasks.steps.shard import iter_samples, shard_files

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[1]
CLIPS = ("samples_sun", "samples_yongen")


def _env(prefect_home: Path, api_url: str | None = None) -> dict:
    """The README's environment. The first dry-run starts its own temporary server, as the README's command
    does; with `api_url` (the session's test server) a later run reports there and skips that start (~8 s)."""
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(prefect_home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PYTHONUNBUFFERED="1")
    if api_url:
        env["PREFECT_API_URL"] = api_url
    return env


def _cmd(out: Path, train_steps: int = 4) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "dry-run", "--out", str(out), "--no-progress",
            "--train-steps", str(train_steps)]


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
        for step in ("download", "crop", "motion", "pose_check", "audio_features", "vae_latents", "shard"):
            assert status[(clip, step)]["status"] == "ok", (clip, step, status[(clip, step)])
    spec = contract.ContractSpec(window_frames=17)  # every modality, validated
    per_clip: dict[str, list[int]] = {}
    for s in iter_samples(base / "shards", spec):
        meta = s["meta"]
        per_clip.setdefault(meta["clip_id"], []).append(meta["window"][0])
        assert meta["untrained_dryrun_models"] == ["audio_features", "motion", "vae_latents"]
        assert set(meta["steps"]) == {"download", "crop", "motion", "pose_check", "audio_features", "vae_latents"}
        assert contract.load_npy(s[contract.VIDEO_LATENTS]).shape == (16, 5, 64, 64)
        # the pose check's aligned independent pose (the alignment loss's target), the window's own rows
        start, end = meta["window"]
        clip_pose = np.load(base / "steps" / "pose_check" / meta["clip_id"] / "head_pose_deg.npy")
        assert np.array_equal(contract.load_npy(s[contract.HEAD_POSE]), clip_pose[start:end], equal_nan=True)
        assert np.isfinite(clip_pose).any()
    # dry-run windows: 17 frames every 200. sun: 550 frames -> 3 windows; yongen: audio 8.0 s -> 200 frames -> 1
    assert per_clip == {"samples_sun": [0, 200, 400], "samples_yongen": [0]}
    stats = json.loads((base / "shards" / "stats.json").read_text())
    assert stats["samples"] == 4 and stats["clips"] == 2 and stats["shards"] == 3  # 2 samples a shard, per clip


def test_dry_run_trains_a_few_steps_on_its_shards(dry_run):
    out, _, stdout = dry_run
    report = json.loads((out / "dryrun-report.json").read_text())
    t = report["training"]
    assert t["state"] == "GO" and t["steps"] == 4
    records = [json.loads(line) for line in (Path(t["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["video_loss"] > 0 and r["struct_loss"] > 0 for r in records if "loss" in r)
    assert "training: GO after 4 steps" in stdout


def test_dry_run_runs_the_training_program_stage_by_stage(dry_run):
    """concept (3 ceilings) -> pretrain on the video-only shards -> joint from pretrain's video DiT, every gate judged
    live at its step, the review auto-approved; the summary prints the stage table."""
    out, _, stdout = dry_run
    record = json.loads((out / "program" / "program.json").read_text())
    # pretrain warm-started from the dry-run's random 6-block Wan transformer (diffusers layout): blocks 0, 2, 4
    pretrain_run = Path(record["runs"][3]["run_dir"])
    wan = json.loads((pretrain_run / "wan_transfer.json").read_text())
    assert wan["layers"] == [0, 2, 4] and wan["layout"] == "diffusers"
    assert wan["summary"] == f"from wan ({len(wan['transferred'])} of {len(wan['transferred']) + len(wan['dropped'])} " \
                             "tensors, blocks 0, 2, 4)"
    assert [(r["stage"], r["run"], r["verdict"]) for r in record["runs"]] == [
        ("concept", "sigma_s max 0.5", "GO"), ("concept", "sigma_s max 0.7", "GO"), ("concept", "sigma_s max 1", "GO"),
        ("pretrain", f"video-only, {wan['summary']}", "GO"), ("joint", "from pretrain", "GO")]
    for ceiling in ("0.5", "0.7", "1"):  # each concept run trained with its own struct-noise ceiling
        cfg = json.loads(next((out / "program" / "concept" / f"sigma-{ceiling}").glob("run-*/train_config.json")).read_text())
        assert cfg["loss_options"]["sigma_struct_max"] == float(ceiling)
    joint = record["runs"][-1]
    assert [(g["gate"], g["step"], g["verdict"]) for g in joint["gates"]] == [
        ("memory", 1, "GO"), ("joint_progress", 2, "GO"), ("conditioning", 2, "GO"), ("review", 3, "GO"),
        ("stability", 4, "GO")]
    assert joint["gates"][3]["numbers"]["answered_by"] == "auto-approve"
    # the conditioning gate was measured live at step 2 on held-out windows of the sample clips: its card
    conditioning = joint["gates"][2]["numbers"]
    assert conditioning["windows"] >= 2 and 0.5 < conditioning["audio_use"] < 2.0
    assert Path(conditioning["plot"]).is_file() and json.loads(Path(conditioning["record"]).read_text())["rows"]
    # the review looked at validation samples made at its step: one clip, ground truth | generated, with speech
    run = next((out / "program" / "joint" / "from-pretrain").glob("run-*/samples/step000003.json")).parent
    round3 = json.loads((run / "step000003.json").read_text())
    assert round3["weights"] == "module" and len(round3["clips"]) == 1 and round3["clips"][0]["frames"] == 17
    video = probe(run / round3["clips"][0]["video"])
    assert (video.width, video.height, video.has_audio) == (1024, 512 + LABEL, True)  # the "truth | generated" bar
    assert "validation samples at step 3" in stdout
    # joint started from the weights pretrain saved at its gate step; pretrain trained on video-only samples
    joint_cfg = json.loads(next((out / "program" / "joint" / "from-pretrain").glob("run-*/train_config.json")).read_text())
    assert joint_cfg["init_from"].endswith("pretrain/run-b1-w17-per_frame/checkpoints/step00000002/weights.safetensors")
    general = out / "general" / "samples" / "shards"
    samples = list(iter_samples(general, contract.ContractSpec(window_frames=17, profile=contract.VIDEO_ONLY)))
    assert len(samples) == 2 and all(s["meta"]["profile"] == "video_only" for s in samples)
    assert all(contract.STRUCT not in s and contract.AUDIO not in s for s in samples)
    assert f"pretrain  video-only, {wan['summary']}  GO" in stdout
    assert "after pretrain: joint starts from pretrain's video DiT" in stdout


def test_dry_run_shards_pass_the_audit(dry_run):
    out, _, _ = dry_run
    audit = json.loads((out / "dryrun-report.json").read_text())["preprocess"]["audit"]
    assert audit["ok"], audit
    assert {c["check"] for c in audit["checks"]} == set(CHECKS)  # latents and struct re-run through the models
    assert all(c["checked"] == 2 and c["mismatched"] == 0 for c in audit["checks"])


def _rewrite_shards(shards: Path, edit) -> None:
    """Rewrite every tar under `shards` with `edit(samples)` applied: {key: {member: bytes}} in place."""
    for tar_path in shard_files(shards):
        with tarfile.open(tar_path) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        samples: dict[str, dict[str, bytes]] = {}
        for name, data in members:
            key, member = name.split(".", 1)
            samples.setdefault(key, {})[member] = data
        edit(samples)
        tar_path.chmod(0o644)
        with tarfile.open(tar_path, "w") as tar:
            for key, sample in samples.items():
                for member, data in sample.items():
                    info = tarfile.TarInfo(f"{key}.{member}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_audit_finds_members_that_hold_another_windows_content(dry_run, tmp_path):
    """The bug that shipped, replayed: one window's video and wav taken from another window of the same clip,
    another window's struct rows shifted by a frame. Shapes stay valid; the audit names exactly those members."""
    out, _, _ = dry_run
    shards = tmp_path / "shards"
    shutil.copytree(out / "samples" / "shards", shards)
    wrong, donor, shifted = "samples_sun_w000400", "samples_sun_w000000", "samples_sun_w000200"
    all_samples: dict[str, dict[str, bytes]] = {}
    _rewrite_shards(shards, lambda samples: all_samples.update(samples))  # read every sample first

    def edit(samples):
        if wrong in samples:
            samples[wrong]["video.mp4"] = all_samples[donor]["video.mp4"]
            samples[wrong]["audio.wav"] = all_samples[donor]["audio.wav"]
        if shifted in samples:
            rows = np.load(io.BytesIO(samples[shifted]["struct.npy"]))
            samples[shifted]["struct.npy"] = contract.npy_bytes(np.roll(rows, 1, axis=0))

    _rewrite_shards(shards, edit)
    models = dryrun_models()
    report = audit_shards(shards, out / "samples" / "steps", AuditModels(motion_extractor=motion_extractor(models)),
                          keys=[wrong, shifted, donor])
    assert report.samples_checked == 3 and not report.ok
    found = {(m.key, m.check) for m in report.mismatches}
    assert found == {(wrong, "video"), (wrong, "audio"), (shifted, "struct"), (shifted, "features")}, found
    assert "PSNR" in next(m.detail for m in report.mismatches if m.check == "video")


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


@pytest.mark.slow
def test_second_run_does_no_step_work(dry_run, prefect_test_server):
    out, home, _ = dry_run
    shards = out / "samples" / "shards"
    before = {p: p.stat().st_mtime_ns for p in shard_files(shards)}
    proc = subprocess.run(_cmd(out), cwd=REPO, env=_env(home, prefect_test_server), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = read_ledger(out / "samples").to_pylist()
    last_run = ledger[-1]["run_id"]
    rows = [r for r in ledger if r["run_id"] == last_run]
    assert len(rows) == 14 and {r["action"] for r in rows} == {"skipped"}
    assert {p: p.stat().st_mtime_ns for p in shard_files(shards)} == before
    report = json.loads((out / "dryrun-report.json").read_text())
    metrics = Path(report["training"]["run_dir"]) / "metrics.jsonl"
    assert len([line for line in metrics.read_text().splitlines() if '"loss"' in line]) == 4  # resumed at step 4: no new steps


@pytest.mark.slow
def test_killed_run_resumes_to_identical_shards(dry_run, prefect_test_server, tmp_path):
    """A fresh run is killed in the middle of a clip's VAE step, then re-run: the shards come out byte-identical
    to the first run's, what the killed run committed is reused and its half-done step is cleaned up.

    To keep this affordable, sun's finished step outputs are copied in from the first run (its VAE step alone
    costs a minute on CPU); yongen goes through every step afresh, so a fresh run's determinism is still checked
    byte for byte through its shard members.
    """
    out, home, _ = dry_run
    resumed = tmp_path / "resumed"
    done_clip, fresh_clip = CLIPS
    for step_dir in (out / "samples" / "steps").iterdir():
        if (step_dir / done_clip).is_dir():
            shutil.copytree(step_dir / done_clip, resumed / "samples" / "steps" / step_dir.name / done_clip)
    proc = subprocess.Popen(_cmd(resumed, train_steps=0), cwd=REPO, env=_env(home, prefect_test_server),
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    vae_dir = resumed / "samples" / "steps" / "vae_latents"
    deadline = time.time() + 900
    while time.time() < deadline and not list(vae_dir.glob(f".{fresh_clip}.tmp-*")):
        assert proc.poll() is None, "the dry-run ended before it could be killed"
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the encode (seconds per window on CPU), not at its first line
    os.killpg(proc.pid, signal.SIGKILL)  # mid-run: one clip's latents done, the other's in flight, no shards
    proc.wait()
    assert [p.parent.name for p in vae_dir.glob("*/_status.json")] == [done_clip]
    assert list(vae_dir.glob(f".{fresh_clip}.tmp-*")), "the killed VAE step left no staging folder behind"
    assert not (resumed / "samples" / "shards").exists()
    assert read_ledger(resumed / "samples").num_rows == 0  # a run writes its ledger part at its end

    done = subprocess.run(_cmd(resumed, train_steps=0), cwd=REPO, env=_env(home, prefect_test_server),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert _digests(resumed / "samples" / "shards") == _digests(out / "samples" / "shards")
    a = pq.read_table(out / "samples" / "shards" / "index.parquet").to_pylist()
    b = pq.read_table(resumed / "samples" / "shards" / "index.parquet").to_pylist()
    assert a == b
    for step_dir in (resumed / "samples" / "steps").iterdir():
        assert not list(step_dir.glob(".*tmp*")), step_dir
    # the resumed run reused the copied outputs and those the killed run committed, and redid only the VAE step
    # it interrupted (and the shards)
    rows = read_ledger(resumed / "samples").to_pylist()
    actions = {(r["clip_id"], r["step"]): (r["status"], r["action"]) for r in rows}
    steps = ("download", "crop", "motion", "pose_check", "audio_features", "vae_latents")
    assert actions == {**{(c, s): ("ok", "skipped") for c in CLIPS for s in steps},
                       (fresh_clip, "vae_latents"): ("ok", "ran"),
                       (done_clip, "shard"): ("ok", "ran"), (fresh_clip, "shard"): ("ok", "ran")}


@pytest.mark.slow
def test_the_summary_ends_with_next_commands_that_run_as_printed(dry_run, prefect_test_server):
    """export -> generate -> evaluate, as the summary prints them (this run's paths filled in), all exit 0."""
    import shlex

    from flows.cli import main

    out, _, stdout = dry_run
    commands = json.loads((out / "dryrun-report.json").read_text())["next_commands"]
    assert [c.split()[1] for c in commands] == ["export", "generate", "evaluate"]
    tail = [line.strip() for line in stdout.rstrip().splitlines()[-10:]]
    assert all(c in tail for c in commands), tail
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "./run" and (REPO / "run").is_file()  # the dry-run ran in the repository
        assert main(argv[1:]) == 0, command
    record = json.loads((out / "generated.mp4.json").read_text())
    assert (out / "face.png").is_file() and record["frames"] == 50 and probe(out / "generated.mp4").has_audio
    assert json.loads((out / "evaluation" / "evaluation.json").read_text())["split"] == "train"


def test_the_top_level_run_carries_summary_tables_progress_and_contact_sheet(dry_run):
    """What a user sees first in the UI: the dry-run's own run, not one subflow deeper (read from the run's
    Prefect database: its embedded server is gone)."""
    import sqlite3

    _, home, _ = dry_run
    with sqlite3.connect(f"file:{home / 'prefect.db'}?mode=ro", uri=True) as con:
        rows = con.execute(
            "SELECT a.key, a.data FROM artifact a JOIN flow_run r ON a.flow_run_id = r.id JOIN flow f ON "
            "r.flow_id = f.id WHERE f.name = 'dry-run' AND r.parent_task_run_id IS NULL").fetchall()
    artifacts = {key: json.loads(data) if isinstance(data, str) else data for key, data in rows}  # progress: a number
    summary = artifacts["dry-run-summary"]
    assert "```" not in summary.split("### Next")[0]  # tables, not a fixed-width block
    assert "| step | ok | rejected | retry | failed | cached | seconds |" in summary
    assert "| crop | 2 | 0 | 0 | 0 | 0 |" in summary and "| stage | run | verdict | steps | gates judged |" in summary
    assert "| joint |" in summary and "**GO**" in summary and "./run export" in summary.split("### Next")[1]
    assert "data:image/jpeg;base64," in artifacts["dry-run-contact-sheet"]
    assert float(artifacts["dry-run-progress"]) == 100.0
