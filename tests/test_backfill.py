"""A backfill after a step's version is bumped: the listing names the stale step (and nothing else) before the run,
the run recomputes that step and reuses the rest, and a second backfill finds everything current."""
from __future__ import annotations

import pyarrow.parquet as pq

from datasets_manifest.schema import ClipRow, rows_to_table
from tasks.ledger import read_ledger
from tasks.steps.crop import CropStep

STEPS = ["download", "crop", "shard"]
WINDOWS = {"window_frames": 9, "window_stride": 1000, "shard_features": False}
BUMPED_CROP = CropStep.version + "-bumped"


def _actions(out, run_id):
    return {(r["step"], r["action"]) for r in read_ledger(out / "t").to_pylist() if r["run_id"] == run_id}


def test_a_bumped_step_is_listed_stale_then_recomputed_alone(prefect_test_server, samples_dir, tmp_path, monkeypatch,
                                                            capsys):
    from flows.backfill import backfill
    from flows.cli import main

    manifest = tmp_path / "m.parquet"
    pq.write_table(rows_to_table([ClipRow(clip_id="d12", dataset="t", source=str(samples_dir / "more" / "lp_d12.mp4"),
                                          identity="a")]), manifest)
    out = tmp_path / "out"
    common = dict(dataset="t", manifest=str(manifest), output_root=str(out),
                  preprocess_options={"steps": STEPS, "windows": WINDOWS})
    first = backfill(**common)  # nothing stored yet: everything missing, everything runs
    assert {(r["step"], r["missing"]) for r in first["stale_before"]} == {("download", 1), ("crop", 1)}
    assert first["preprocess"]["clips_out"] == 1, first["preprocess"]["rejected"]

    monkeypatch.setattr(CropStep, "version", BUMPED_CROP)  # what bumping CropStep.version in tasks/steps/crop.py does
    second = backfill(**common)
    listed = {r["step"]: r for r in second["stale_before"]}
    assert listed["download"]["current"] == 1 and listed["download"]["stale"] == 0
    assert listed["crop"]["stale"] == 1 and listed["crop"]["version"] == BUMPED_CROP
    assert _actions(out, second["preprocess"]["run_id"]) == {("download", "skipped"), ("crop", "ran"), ("shard", "ran")}

    code = main(["backfill", "t", "--manifest", str(manifest), "--out", str(out), "--steps", *STEPS,
                 "--window-frames", "9", "--window-stride", "1000", "--no-progress"])
    assert code == 0
    assert "1/1 clips" in capsys.readouterr().out
    third = [r for r in read_ledger(out / "t").to_pylist() if r["step"] == "crop"][-1]
    assert third["action"] == "skipped"  # the CLI's backfill found the bumped crop current
