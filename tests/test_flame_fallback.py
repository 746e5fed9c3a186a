"""The 3D-latent gate's fallback: its NO-GO re-runs the struct step from FLAME tracker files instead of stopping."""
from __future__ import annotations

import json

import numpy as np
import pytest

from datasets_manifest.schema import ClipRow, rows_to_table
from models.flame_layout import flame_struct
from tasks import contract
from tasks.ledger import read_ledger
from tasks.steps.flame_struct import DEFAULT_FLAME_EXPRESSION
from tasks.steps.pose_check import load_flame_npz
from tasks.steps.shard import iter_samples
from tests.flame_files import write_flame_files

# Dry-run models, one 5-frame window per clip; a 0.5 degree pose threshold makes LivePortrait's (random, dry-run)
# motion disagree with the independent pose on most frames: the gate says NO-GO, as on a dataset LivePortrait fails.
OPTIONS = dict(weights={"models": "dryrun"}, windows={"window_frames": 5, "window_stride": 100_000, "shard_max_samples": 4},
               checks={"audit_fraction": 0.0, "pose_threshold_deg": 0.5}, runner={"batch_size": 2})


@pytest.fixture(scope="module")
def flame_run(prefect_test_server, samples_dir, tmp_path_factory):
    """A crop-only run makes the crops the FLAME files are fitted to (as a tracker would run on the crops);
    then the full run with --flame-dir."""
    import pyarrow.parquet as pq

    from flows.preprocess import preprocess

    tmp = tmp_path_factory.mktemp("flame")
    rows = [ClipRow(clip_id=c, dataset="t", source=str(samples_dir / f"{c}.mp4"), identity=c, end_s=4.0)
            for c in ("sun", "yongen")]
    manifest = tmp / "m.parquet"
    pq.write_table(rows_to_table(rows), manifest)
    out = tmp / "out"
    preprocess(dataset="t", manifest=str(manifest), output_root=str(out), steps=["download", "crop"],
               **dict(OPTIONS, windows={**OPTIONS["windows"], "shard_features": False}))
    files = write_flame_files(out / "t" / "steps" / "crop", ["sun", "yongen"], tmp / "flame")
    without = preprocess(dataset="t", manifest=str(manifest), output_root=str(tmp / "nofallback"), return_state=True,
                         **OPTIONS)
    report = preprocess(dataset="t", manifest=str(manifest), output_root=str(out), **dict(OPTIONS,
                               weights={"models": "dryrun", "flame_dir": str(tmp / "flame")},
                               checks={**OPTIONS["checks"], "audit_fraction": 1.0}))
    return out / "t", files, report, without


def test_without_flame_files_the_gate_stops_the_run(flame_run):
    _, _, _, without = flame_run
    assert without.is_failed() and without.name == "NO-GO"
    assert "FLAME" in without.message


def test_the_gate_no_go_switches_the_struct_source_to_flame_and_says_so(flame_run):
    base, files, report, _ = flame_run
    assert report["gate"]["name"] == "NO-GO" and "FLAME" in report["gate"]["action"]
    assert report["struct_source"] == "flame" and report["clips_out"] == 2  # clips the pose check rejected are back
    # every sample re-derived: its struct rows and keep mask against the FLAME step, not the motion extractor
    assert report["audit"]["ok"], report["audit"]
    checks = {c["check"]: c for c in report["audit"]["checks"]}
    assert checks["features"]["checked"] == 2 and checks["features"]["mismatched"] == 0
    pose = {r["clip_id"]: r["reason"] for r in read_ledger(base).to_pylist() if r["step"] == "pose_check"}
    assert "pose_disagreement" in pose.values(), pose
    flame_rows = [r for r in read_ledger(base).to_pylist() if r["step"] == "flame_struct"]
    assert sorted(r["clip_id"] for r in flame_rows) == ["sun", "yongen"] and {r["status"] for r in flame_rows} == {"ok"}
    stats = json.loads((base / "shards" / "stats.json").read_text())
    width = DEFAULT_FLAME_EXPRESSION + 12
    assert stats["struct_source"] == "flame" and stats["struct_dim"] == width
    samples = list(iter_samples(base / "shards", contract.ContractSpec(window_frames=5, struct_dim=width)))
    assert {s["meta"]["clip_id"] for s in samples} == {"sun", "yongen"}
    for s in samples:
        meta = s["meta"]
        start, end = meta["window"]
        params = load_flame_npz(files[meta["clip_id"]])
        want = flame_struct({k: v for k, v in params.items() if k != "frame"}, params["frame"],
                            n_exp=DEFAULT_FLAME_EXPRESSION)
        # the struct rows are the tracker file's rows at the window, in the FLAME layout; keep = finite rows
        np.testing.assert_array_equal(contract.load_npy(s[contract.STRUCT]), want.struct[start:end])
        np.testing.assert_array_equal(contract.load_npy(s[contract.KEEP_MASK]), want.valid[start:end])
        assert meta["struct_source"] == "flame" and meta["struct_dim"] == width
        assert np.allclose(meta["flame_shape"], want.shape, atol=1e-4)
    # its head pose is the clip's real motion: the fitted global pose moves over the window
    assert np.ptp(want.struct[:, want.layout.block("global_pose")], axis=0).max() > 1e-3


def test_flame_shards_train_with_the_struct_width_they_carry(flame_run, single_process_env, tmp_path):
    from training.loader import LoaderConfig, ShardLoader
    from training.run_status import COMPLETED
    from training.shard_sets import train_data_fields
    from training.train_config import TrainConfig
    from training.trainer import run_training

    base, _, _, _ = flame_run
    fields = train_data_fields([base / "shards"])
    assert fields["struct_dim"] == DEFAULT_FLAME_EXPRESSION + 12
    loader = ShardLoader(LoaderConfig(fields["shards"], fields["window_frames"], struct_dim=fields["struct_dim"],
                                      batch_size=2, shuffle_buffer=0))
    [batch] = list(loader.epoch_iter())
    assert batch["struct"].shape == (2, 5, DEFAULT_FLAME_EXPRESSION + 12) and not loader.stats.rejected
    cfg = TrainConfig.from_dict({**fields, "out_dir": str(tmp_path / "train"), "total_steps": 1, "micro_batch": 2,
                                 "num_workers": 0, "shuffle_buffer": 0, "warmup_steps": 1, "ckpt_every": 1})
    status = run_training(cfg)
    assert status.status == COMPLETED, status.error
