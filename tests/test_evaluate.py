"""`dualforce evaluate`: each held-out clip generated and measured against its own ground truth; absent weights
give skipped metrics with reasons; the long generation gives per-second series; JSON, table, plots and side-by-side
clips are written; the flow publishes the table.

The shard sets' test splits hold real face crops (yongen.mp4 through the crop step) and real speech."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.dualforce import DualForce
from models.dualforce.config import get_config
from models.dualforce.sampler import GeneratedChunk
from tasks.feature_models import dryrun_models
from tests.training_shards import real_media, write_shards

torch.set_num_threads(2)
CROP = 256


def _shard_set(shards, models, crop, source):
    meta = {"extractors": {"wan_vae": models.wan_vae, "hubert": models.hubert},
            "untrained_dryrun_models": ["audio_features", "vae_latents"]}
    write_shards(shards / "test", n_shards=1, per_shard=2, seed=4, split="test", crop=crop,
                 media=real_media(source, crop=crop), meta_extra=meta)
    (shards / "stats.json").write_text(json.dumps({"profile": "talking_head", "window_frames": 9}))
    return meta


@pytest.fixture(scope="module")
def setup(tmp_path_factory, yongen_crop):
    """A 64x64 set (fast generation: the report's plumbing) and a 256x256 one (faces dlib finds: the metrics)."""
    root = tmp_path_factory.mktemp("evaluate")
    models = dryrun_models()
    meta = _shard_set(root / "shards", models, 64, yongen_crop.video)
    _shard_set(root / "faces", models, CROP, yongen_crop.video)
    torch.manual_seed(0)
    model = DualForce(get_config("tiny", audio_dim=32))
    provenance = {"step": 7, "weights": "ema", "training_data": [{"profile": "talking_head", **meta}]}
    model.save_pretrained(root / "model", provenance)
    return root, models


def _options(models, **kw):
    from training.evaluate import EvaluateOptions

    return EvaluateOptions(**{"clips": 2, "sampler_steps": 1, "long_seconds": 1.2, "progress": False,
                              "liveportrait": models.liveportrait_root, **kw})


def test_report_files_and_skipped_metrics(setup):
    from training.evaluate import evaluate_model

    root, models = setup
    (root / "out" / "clips").mkdir(parents=True)
    for rel in ("notes.txt", "clips/mine.mp4"):  # a user's files in the folder -o names: left alone
        (root / "out" / rel).write_text("mine")
    report = evaluate_model(root / "model", root / "shards", root / "out", _options(models))
    assert all((root / "out" / rel).read_text() == "mine" for rel in ("notes.txt", "clips/mine.mp4"))
    data = json.loads((root / "out" / "evaluation.json").read_text())
    assert data["split"] == "test" and data["step"] == 7 and [c["key"] for c in data["clips"]] == [
        "clip000_w000000", "clip000_w000001"]
    summary = {r["name"]: r for r in data["summary"]}
    for name, why in (("lse_d", "syncnet"), ("lse_c", "syncnet"), ("fid", "inception"), ("fvd", "i3d")):
        assert summary[name]["status"] == "skipped" and summary[name]["value"] is None and why in summary[name]["reason"]
    assert summary["pose_error_deg"]["status"] == "ok" and np.isfinite(summary["pose_error_deg"]["value"])
    long = {r["name"]: r for r in data["long_sequence"]}
    assert long["pose_drift_deg_per_second"]["status"] == "ok"
    assert len(long["pose_drift_deg_per_second"]["series"]) == 2  # 33 frames (4n+1 >= 30) in 1 s bins
    assert long["pose_drift_deg_per_second"]["series"][0] >= 0
    assert report.value("fid") is None
    # the latent-space rows need no weights: values for the untrained model, per second of its 9 frames
    for name in ("latent_mse", "struct_pose_error", "struct_mouth_error"):
        assert summary[name]["status"] == "ok" and summary[name]["value"] > 0, summary[name]
    clip_rows = {r["name"]: r for r in data["clips"][0]["results"]}
    assert len(clip_rows["latent_mse"]["series"]) == 1 and clip_rows["latent_mse"]["details"]["latent_frames"] == 3
    assert long["latent_identity_drift"]["status"] == "ok" and len(long["latent_identity_drift"]["series"]) == 2
    # conditioning use: the untrained model's audio and reference paths are zero-gated, so their ratios are exactly 1
    use = {r["name"]: r for r in data["conditioning"]}
    assert use["audio use (null speech, video)"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert use["reference use (null reference, struct)"]["value"] == pytest.approx(1.0, abs=1e-6)
    assert use["bridge use (bridge closed, mouth)"]["details"]["windows"] == 2
    assert use["drift (rollout / teacher-forced)"]["details"]["latent_frames"] == 3
    table = (root / "out" / "evaluation.md").read_text()
    assert "| fid |  | skipped |" in table and "untrained dry-run" in table
    assert (root / "out" / "metric-pose_drift_deg_per_second.png").is_file()
    assert sorted(p.name for p in (root / "out" / "clips").glob("clip*.mp4")) == [
        "clip000_w000000.mp4", "clip000_w000001.mp4"]
    assert "| audio use (null speech, video) | 1 | ok |" in table and "| latent_mse |" in table
    assert (root / "out" / "conditioning-use.png").is_file() and (root / "out" / "metric-latent_mse.png").is_file()


def test_a_perfect_generator_scores_ideal_and_a_swapped_one_worse(setup, monkeypatch):
    """The plumbing pairs each generated clip with its own ground truth and reference: a generator that returns
    a clip's true frames scores identity ~1 (to its own first frame), LMD 0 and pose error 0; one that returns the
    other clip's frames scores worse on each."""
    import training.evaluate as ev
    from training.heldout import held_out_clips

    root, models = setup
    clips = held_out_clips(root / "faces", 2, "test")
    by_features = {c.audio_features.tobytes(): c for c in clips}

    def fake(swap):
        def generated(model, wan, device, reference_latent, features, options, bar=None, on_chunk=None):
            clip = by_features.get(features.tobytes())
            if clip is None:  # the long generation: not studied here
                yield np.zeros((len(features), CROP, CROP, 3), np.uint8)
                return
            other = clips[1 - clips.index(clip)] if swap else clip
            on_chunk(GeneratedChunk(0, torch.from_numpy(other.video_latents)[None], torch.zeros(1),
                                    torch.from_numpy(other.struct)[None]))
            yield other.frames
        return generated

    scores = {}
    for swap in (False, True):
        monkeypatch.setattr(ev, "_generated", fake(swap))
        report = ev.evaluate_model(root / "model", root / "faces", root / f"out-{swap}",
                                   _options(models, long_seconds=0.0))
        scores[swap] = {r["name"]: r["value"] for r in report.summary}
    truth, swapped = scores[False], scores[True]
    assert truth["lmd_mouth"] == pytest.approx(0.0, abs=1e-9) and truth["lmd_face"] == pytest.approx(0.0, abs=1e-9)
    assert truth["pose_error_deg"] == pytest.approx(0.0, abs=1e-6)
    assert truth["identity_similarity"] > 0.99
    assert swapped["lmd_face"] > 0.001 and swapped["pose_error_deg"] > 0.01
    assert swapped["identity_similarity"] < truth["identity_similarity"]
    # the latent rows pair each clip with its own window: 0 for the truth, the two windows' distance when swapped
    a, b = clips
    assert truth["latent_mse"] == 0.0 and truth["struct_pose_error"] == 0.0 and truth["struct_mouth_error"] == 0.0
    assert swapped["latent_mse"] == pytest.approx(float(((a.video_latents - b.video_latents) ** 2).mean()), rel=1e-5)
    assert swapped["struct_mouth_error"] > 0.0


def test_evaluate_command(setup, capsys, prefect_test_server):
    from flows.cli import main

    root, models = setup
    code = main(["evaluate", "--model", str(root / "model"), "--shards", str(root / "shards"), "-o",
                 str(root / "cli"), "--clips", "1", "--steps", "1", "--long-seconds", "0", "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "| lse_d |" in out and (root / "cli" / "evaluation.json").is_file()


def test_the_summary_counts_metrics_and_lists_only_files_written(tmp_path):
    from training.evaluate import summary_lines

    def row(name, value, reason=""):
        return {"name": name, "value": value, "status": "ok" if value is not None else "skipped", "reason": reason,
                "seconds": 0.0}

    data = {"summary": [row("latent_mse", 0.5), row("lse_c", None, "syncnet: weights not given (pass --syncnet)")],
            "long_sequence": [row("identity_per_second", None, "no usable frame in the clip")], "conditioning": []}
    (tmp_path / "evaluation.json").write_text("{}")
    (tmp_path / "clips").mkdir()
    (tmp_path / "empty").mkdir()
    first, files = summary_lines(data, tmp_path)
    assert first.startswith("1 of 3 metrics computed") and "pass --syncnet" in first
    assert files == f"written to {tmp_path}: evaluation.json"  # no metric-*.png claimed, no empty folder
    (tmp_path / "clips" / "a.mp4").write_bytes(b"x")
    assert summary_lines(data, tmp_path)[1].endswith("clips/, evaluation.json")


def test_the_long_generation_is_not_decoded_when_nothing_can_measure_its_frames(setup, monkeypatch):
    """No motion extractor and no face in the 64x64 reference: the long generation runs latent-only, and its
    latent identity drift equals the decoded run's (same seed, same chunks)."""
    import training.evaluate as ev

    root, models = setup
    decoded = ev.evaluate_model(root / "model", root / "shards", root / "out-decoded",
                                _options(models, conditioning_windows=0))
    calls, real = [], ev._generated

    def spy(*args, **kwargs):
        calls.append(len(args[4]))  # the audio rows it was driven with
        yield from real(*args, **kwargs)

    monkeypatch.setattr(ev, "_generated", spy)
    report = ev.evaluate_model(root / "model", root / "shards", root / "out-latent",
                               _options(models, liveportrait=None, conditioning_windows=0))
    assert calls == [9, 9]  # the two clips' windows; the long generation's 33 frames were never decoded
    long = {r["name"]: r for r in report.long_sequence}
    assert long["identity_per_second"]["status"] == "skipped"
    assert "pass --liveportrait-root" in long["pose_drift_deg_per_second"]["reason"]
    before = {r["name"]: r for r in decoded.long_sequence}["latent_identity_drift"]
    assert long["latent_identity_drift"]["series"] == before["series"] and len(before["series"]) == 2
    assert not list((root / "out-latent").glob("metric-pose_drift*.png"))
