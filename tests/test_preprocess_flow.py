"""The preprocess flow in-process: bad inputs are recorded per clip while the rest of the run completes."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from datasets_manifest.schema import MANIFEST_SCHEMA, ClipRow, rows_to_table
from tasks import contract
from tasks.ledger import latest_status, read_ledger
from tasks.media import run_ffmpeg
from tasks.steps.shard import iter_samples

# Steps 1, 2 and 7 only: the feature steps have their own tests below and in the end-to-end dry-run.
BASE = dict(steps=["download", "crop", "shard"], windows={"shard_features": False})


def test_bad_inputs_are_recorded_and_the_rest_completes(prefect_test_server, samples_dir, tmp_path):
    from flows.preprocess import preprocess

    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 200)
    rows = [
        ClipRow(clip_id="good", dataset="t", source=str(samples_dir / "yongen.mp4"), identity="a"),
        ClipRow(clip_id="corrupt", dataset="t", source=str(corrupt), identity="b"),
        ClipRow(clip_id="silent", dataset="t", source=str(samples_dir / "more" / "lp_d0.mp4"), identity="c"),
        ClipRow(clip_id="nowhere", dataset="t", source=str(tmp_path / "missing.mp4"), identity="d"),
        ClipRow(clip_id="nohost", dataset="t", source="http://127.0.0.1:9/clip.mp4", identity="e"),
    ]
    table = rows_to_table(rows)
    malformed = pa.Table.from_pylist(
        [{"clip_id": "backwards", "dataset": "t", "source": "x.mp4", "start_s": 5.0, "end_s": 1.0,
          "face_box": None, "identity": "f", "split": "train", "attribution": ""}], schema=MANIFEST_SCHEMA)
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.concat_tables([table, malformed]), manifest)

    report = preprocess(dataset="t", manifest=str(manifest), output_root=str(tmp_path / "out"), runner={"batch_size": 2}, **BASE)

    assert report["clips_in"] == 6 and report["clips_out"] == 1
    reasons = {r["clip_id"]: (r["step"], r["reason"]) for r in report["rejected"]}
    assert reasons == {
        "corrupt": ("download", "corrupt"),
        "silent": ("crop", "no_audio"),
        "nowhere": ("download", "unreachable"),
        "nohost": ("download", "unreachable"),
        "row-5": ("manifest", "malformed_row"),
    }
    assert all(r["detail"] for r in report["rejected"])
    status_of = {r["clip_id"]: r["status"] for r in report["rejected"]}
    assert status_of["nohost"] == "retryable" and status_of["nowhere"] == "rejected"  # refused: may come back
    assert report["clips_retryable"] == 1
    status = latest_status(tmp_path / "out" / "t")
    assert status[("good", "shard")]["status"] == "ok"
    assert status[("silent", "crop")]["reason"] == "no_audio"
    assert report["shards"]["samples"] == 6  # 200 frames of yongen -> 6 windows of 33
    spec = contract.ContractSpec(33, require_features=False)
    keys = [s["__key__"] for s in iter_samples(tmp_path / "out" / "t" / "shards", spec)]
    assert keys == [f"good_w{s:06d}" for s in range(0, 166, 33)]
    _check_run_pictures(report, tmp_path / "out" / "t")

    # the same run again does no step work: every step result is reused from the store
    again = preprocess(dataset="t", manifest=str(manifest), output_root=str(tmp_path / "out"), runner={"batch_size": 2}, **BASE)
    assert again["shards"]["skipped"]
    second = [r for r in read_ledger(tmp_path / "out" / "t").to_pylist() if r["run_id"] == again["run_id"]]
    actions = {(r["clip_id"], r["step"]): r["action"] for r in second if r["step"] != "manifest"}
    assert actions.pop(("nohost", "download")) == "ran"  # a transient failure is tried again by every run
    assert set(actions.values()) == {"skipped"} and ("good", "crop") in actions

    # retry_rejected: the cached rejections run again, the ok results are still reused
    retried = preprocess(dataset="t", manifest=str(manifest), output_root=str(tmp_path / "out"), runner={"batch_size": 2},
                         checks={"retry_rejected": True}, **BASE)
    third = [r for r in read_ledger(tmp_path / "out" / "t").to_pylist() if r["run_id"] == retried["run_id"]]
    ran = {(r["clip_id"], r["step"]) for r in third if r["action"] == "ran" and r["step"] != "manifest"}
    assert ran == {("corrupt", "download"), ("silent", "crop"), ("nowhere", "download"), ("nohost", "download")}

    # a step output that changed under finished shards: the audit sees the shards' video is no longer the
    # crop's, and the run ends AUDIT-MISMATCH (its findings beside the ledger)
    crop = tmp_path / "out" / "t" / "steps" / "crop" / "good" / "crop.mp4"
    reversed_crop = tmp_path / "reversed.mp4"
    run_ffmpeg(["-y", "-i", str(crop), "-vf", "reverse", "-c:v", "libx264", "-crf", "18", str(reversed_crop)], "reverse")
    reversed_crop.replace(crop)
    state = preprocess(dataset="t", manifest=str(manifest), output_root=str(tmp_path / "out"), runner={"batch_size": 2},
                       checks={"audit_fraction": 1.0}, return_state=True, **BASE)
    assert state.is_failed() and state.name == "AUDIT-MISMATCH", state
    audit = json.loads((tmp_path / "out" / "t" / "audit.json").read_text())["audit"]
    assert audit["samples_checked"] == 6 and {m["check"] for m in audit["mismatches"]} == {"video"}


def _check_run_pictures(report: dict, base) -> None:
    """The contact sheet beside the ledger shows the accepted crop's own frames and the 4 rejected clips; the
    run carries it, its summary and a finished progress bar as artifacts."""
    from pathlib import Path

    import cv2
    import numpy as np
    from prefect.artifacts import Artifact

    from tasks.contact_sheet import HEADER_COLOURS, LABEL, LEGEND, TILE, caption_bar, sheet_header
    from tasks.media import read_frames

    sheet_path = report["contact_sheet"]
    assert sheet_path and sheet_path.startswith(str(base / "ledger" / "contact-sheet-run-"))
    sheet = cv2.cvtColor(cv2.imread(sheet_path), cv2.COLOR_BGR2RGB)
    # the header (run id and counts, the legend), one accepted row, one row of rejected tiles
    assert sheet.shape[0] == 2 * LABEL + (TILE + LABEL) + (TILE + 2 * LABEL)
    run_id = f"t {Path(sheet_path).stem.removeprefix('contact-sheet-')}"
    shown = [r for r in report["rejected"] if r["step"] != "manifest"]  # a malformed row has no clip to show
    header = sheet_header(run_id, 1, len(shown), 24)
    assert header[0].startswith(f"{run_id}: 1 accepted, 4 rejected") and header[1] == LEGEND
    for i, line in enumerate(header):  # the text drawn is that line: the same bar rendered again, pixel for pixel
        assert np.array_equal(sheet[i * LABEL:(i + 1) * LABEL], caption_bar(sheet.shape[1], line, HEADER_COLOURS[i]))
    assert not np.array_equal(sheet[:LABEL], caption_bar(sheet.shape[1], "another run", HEADER_COLOURS[0]))
    top = 2 * LABEL
    crop0 = read_frames(base / "steps" / "crop" / "good" / "crop.mp4", scale_to=(TILE, TILE))[0]
    diff = np.abs(sheet[top:top + TILE, :TILE].astype(int) - crop0.astype(int))
    assert np.median(diff) <= 3  # the first tile is the crop's frame 0 (landmark dots aside)
    rejected_tiles = sheet[top + TILE + LABEL:, :4 * TILE]
    assert rejected_tiles[:TILE].std() > 0  # the 4 tiles are there (corrupt/missing sources stay grey)
    art = Artifact.get("preprocess-t-contact-sheet")
    assert art is not None and "data:image/jpeg;base64," in art.data and sheet_path in art.data
    summary = Artifact.get("preprocess-t-summary")
    assert summary is not None and "1/6 clips made it through" in summary.data and "nohost" in summary.data
    progress = Artifact.get("preprocess-t-progress")
    assert progress is not None and float(progress.data) == 100.0


def test_unknown_step_is_refused(prefect_test_server, tmp_path):
    from flows.preprocess import preprocess

    manifest = tmp_path / "m.parquet"
    pq.write_table(rows_to_table([]), manifest)
    with pytest.raises(ValueError, match="unknown steps"):
        preprocess(dataset="t", manifest=str(manifest), output_root=str(tmp_path), steps=["crop", "teleport"])


def test_a_real_run_without_weights_fails_before_any_work(prefect_test_server, samples_dir, tmp_path):
    from flows.preprocess import preprocess

    manifest = tmp_path / "m.parquet"
    good = ClipRow(clip_id="good", dataset="t", source=str(samples_dir / "yongen.mp4"), identity="a")
    pq.write_table(rows_to_table([good]), manifest)
    with pytest.raises(ValueError, match="a real run needs liveportrait_root, hubert, wan_vae"):
        preprocess(dataset="t", manifest=str(manifest), output_root=str(tmp_path / "out"))
    state = preprocess(dataset="t", manifest=str(manifest), output_root=str(tmp_path / "out"),
                       weights={"liveportrait_root": str(tmp_path / "lp"), "hubert": str(tmp_path / "hubert"),
                                "wan_vae": str(tmp_path / "vae")}, return_state=True)
    assert state.is_failed() and state.name == "BAD-WEIGHTS"
    msg = state.message
    assert "pretrained_weights/liveportrait/base_models/motion_extractor.pth" in msg and "HuBERT" in msg and "Wan VAE" in msg
    assert not (tmp_path / "out" / "t" / "steps").exists()  # nothing was started


def test_latent_quality_gate_no_go_ends_the_run_before_shards(prefect_test_server, samples_dir, tmp_path):
    from prefect.states import State

    from flows.preprocess import preprocess

    manifest = tmp_path / "m.parquet"
    good = ClipRow(clip_id="good", dataset="t", source=str(samples_dir / "yongen.mp4"), identity="a")
    pq.write_table(rows_to_table([good]), manifest)
    # a zero-degree threshold drops every frame: the clip is rejected and the dataset gate says no-go
    state = preprocess(dataset="t", manifest=str(manifest), output_root=str(tmp_path / "out"), weights={"models": "dryrun"},
                       steps=["download", "crop", "motion", "pose_check", "shard"], checks={"pose_threshold_deg": 0.0},
                       return_state=True)
    assert isinstance(state, State) and state.is_failed() and state.name == "NO-GO"
    assert "3d_latent_quality" in state.message and "FLAME-only" in state.message
    assert not (tmp_path / "out" / "t" / "shards").exists()
    status = latest_status(tmp_path / "out" / "t")
    assert status[("good", "pose_check")]["reason"] == "pose_disagreement"
    assert (tmp_path / "out" / "t" / "gate-no-go.json").exists()


def test_the_markdown_summary_is_tables_with_every_rejection():
    from flows.run_summary import run_markdown

    report = {"dataset": "t", "clips_in": 3, "clips_out": 1, "profile": "talking_head", "output": "/o",
              "rejected": [{"clip_id": "a|b", "status": "rejected", "step": "crop", "reason": "no_face",
                            "detail": "no face in\nframe 0"}],
              "step_counts": [{"step": "crop", "ok": 1, "rejected": 1, "failed": 1, "skipped": 0, "seconds": 1.5}],
              "shards": {"samples": 2, "shards": 1, "bytes": 2e6, "per_split": {"train": 2}}}
    text = run_markdown(report, 3.0)
    assert text.startswith("## Summary (3.0 s)") and "### t: 1/3 clips made it through" in text
    assert "| a\\|b | rejected | crop | no_face | no face in frame 0 |" in text  # a pipe or newline stays in its cell
    assert "| crop | 1 | 1 | 0 | 1 | 0 | 1.50 |" in text and "samples: **2** in 1 shards" in text
