"""Each exit code of flows/outcomes.py, produced through `dualforce` main() as a scheduler would see it."""
from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from datasets_manifest.schema import MANIFEST_SCHEMA, ClipRow, rows_to_table
from flows.cli import main
from flows.outcomes import EXIT_CODES
from models.motion_extractor import MOTION_EXTRACTOR_RELPATH
from tasks.feature_models import dryrun_models

DOWNLOAD_ONLY = ["--steps", "download", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _prefect_logs_outside_capsys(prefect_test_server):
    """Prefect binds its console log handler to the sys.stderr of the moment its logging is first set up;
    set it up here, outside the tests' capsys (whose stream closes when its test ends)."""
    from prefect import flow

    flow(lambda: None, name="logging-setup")()


def _manifest(tmp_path, rows=(), malformed=()) -> str:
    table = rows_to_table(list(rows))
    if malformed:
        table = pa.concat_tables([table, pa.Table.from_pylist(list(malformed), schema=MANIFEST_SCHEMA)])
    path = tmp_path / "m.parquet"
    pq.write_table(table, path)
    return str(path)


def _row(clip_id, source, **kw):
    return {"clip_id": clip_id, "dataset": "t", "source": source, "start_s": 0.0, "end_s": 1.0, "face_box": None,
            "identity": "x", "split": "train", "attribution": "", **kw}


def test_codes_are_distinct():
    assert EXIT_CODES == {"NO-GO": 3, "AUDIT-MISMATCH": 4, "CLIPS-FAILED": 5, "UNUSABLE-INPUT": 6, "BAD-WEIGHTS": 7}


def test_a_manifest_without_a_valid_row_is_unusable_input(prefect_test_server, tmp_path, capsys):
    manifest = _manifest(tmp_path, malformed=[_row("backwards", "x.mp4", start_s=5.0, end_s=1.0),
                                              _row("nan", "x.mp4", start_s=float("nan"))])
    assert main(["preprocess", "t", "--manifest", manifest, "--out", str(tmp_path / "out"), *DOWNLOAD_ONLY]) == 6
    err = capsys.readouterr().err
    assert "UNUSABLE-INPUT" in err and "none of its 2 rows is valid" in err and "NO-GO" not in err
    assert "end_s (1.0) must be after start_s" in err
    assert not (tmp_path / "out" / "t" / "steps").exists()
    missing = str(tmp_path / "nowhere.parquet")
    assert main(["preprocess", "t", "--manifest", missing, "--out", str(tmp_path / "out"), *DOWNLOAD_ONLY]) == 2
    assert "does not exist" in capsys.readouterr().err  # a missing file is a usage error, found before the flow


def test_a_clip_failing_through_our_error_exits_5_and_the_rest_is_kept(prefect_test_server, samples_dir, tmp_path,
                                                                     monkeypatch, capsys):
    from tasks.steps.download import DownloadStep

    real_run = DownloadStep.run

    def run(self, row, inputs, out_dir):
        if row.clip_id == "buggy":
            raise KeyError("a bug of ours")  # not a ClipRejected: the clip *failed*
        return real_run(self, row, inputs, out_dir)

    monkeypatch.setattr(DownloadStep, "run", run)
    rows = [ClipRow(clip_id=c, dataset="t", source=str(samples_dir / "yongen.mp4"), identity="a", end_s=1.0)
            for c in ("good", "buggy")]
    manifest = _manifest(tmp_path, rows)
    assert main(["preprocess", "t", "--manifest", manifest, "--out", str(tmp_path / "out"), *DOWNLOAD_ONLY]) == 5
    captured = capsys.readouterr()
    assert "CLIPS-FAILED: 1 clip(s) failed" in captured.err and "buggy at download" in captured.err
    assert "1/2 clips made it through" in captured.out
    monkeypatch.setattr(DownloadStep, "run", real_run)  # fixed: the failed clip runs again, the good one is reused
    assert main(["preprocess", "t", "--manifest", manifest, "--out", str(tmp_path / "out"), *DOWNLOAD_ONLY]) == 0


def test_weights_that_do_not_fit_stop_the_run_before_any_clip(prefect_test_server, samples_dir, tmp_path, capsys):
    """A motion extractor with one key missing and one extra: every problem listed, exit 7, nothing written."""
    weights = tmp_path / "weights"
    shutil.copytree(dryrun_models().liveportrait_root, weights)
    path = weights / MOTION_EXTRACTOR_RELPATH
    state = torch.load(path, weights_only=True)
    dropped, retyped = sorted(k for k in state if state[k].is_floating_point())[:2]
    del state[dropped]
    state["extra.weight"] = torch.zeros(1)
    state[retyped] = state[retyped].to(torch.int32)
    torch.save(state, path)
    manifest = _manifest(tmp_path, [ClipRow(clip_id="good", dataset="t", source=str(samples_dir / "yongen.mp4"),
                                            identity="a")])
    out = tmp_path / "out"
    code = main(["preprocess", "t", "--manifest", manifest, "--out", str(out), "--no-progress",
                 "--liveportrait-root", str(weights), "--hubert", str(weights / "hubert-dryrun"),
                 "--wan-vae", str(weights / "wan-vae-dryrun")])
    assert code == 7
    err = capsys.readouterr().err
    assert "BAD-WEIGHTS" in err and dropped in err and "extra.weight" in err
    assert "missing keys (1)" in err and "unexpected keys (1)" in err and f"{retyped}: file torch.int32" in err
    assert not (out / "t" / "steps").exists() and not (out / "t" / "ledger").exists()


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory, samples_dir):
    """2 s of yongen through download, crop and shard: one 33-frame window in one shard."""
    from flows.preprocess import preprocess

    root = tmp_path_factory.mktemp("tiny")
    manifest = _manifest(root, [ClipRow(clip_id="good", dataset="t", source=str(samples_dir / "yongen.mp4"),
                                        identity="a", end_s=2.0)])
    report = preprocess(dataset="t", manifest=manifest, output_root=str(root / "out"),
                        steps=["download", "crop", "shard"], windows={"shard_features": False})
    assert report["shards"]["samples"] == 1
    return root, manifest


def test_a_gate_no_go_exits_3(tiny_dataset, tmp_path, capsys):
    """The pipeline's launch gate: one shard cannot feed two training processes; judged before training starts."""
    root, manifest = tiny_dataset
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    options = '{"steps": ["download", "crop", "shard"], "windows": {"shard_features": false}}'
    assert main(["pipeline", "t", "--manifest", manifest, "--out", str(out), "--preprocess", options,
                 "--nproc-per-node", "2"]) == 3
    assert "NO-GO: 1 train shards for 2 training processes" in capsys.readouterr().err
    assert not (out / "t" / "train").exists()


def test_an_audit_mismatch_exits_4(tiny_dataset, tmp_path, capsys):
    from tasks.media import run_ffmpeg

    root, _ = tiny_dataset
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    crop = out / "t" / "steps" / "crop" / "good" / "crop.mp4"
    reversed_crop = tmp_path / "reversed.mp4"  # the crop changed under finished shards
    run_ffmpeg(["-y", "-i", str(crop), "-vf", "reverse", "-c:v", "libx264", "-crf", "18", str(reversed_crop)], "reverse")
    crop.chmod(0o644)
    reversed_crop.replace(crop)
    assert main(["audit", str(out / "t" / "shards"), "--fraction", "1", "--models", "none", "--no-progress"]) == 4
    assert "good_w000000" in capsys.readouterr().out
