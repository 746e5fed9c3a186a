"""The `dualforce` command line: the commands that need no flow run, end to end through main()."""
from __future__ import annotations

import re

import pytest

from datasets_manifest.schema import read_manifest
from flows.cli import build_parser, main


def test_manifest_command_writes_parquet_and_prints_summary(samples_dir, tmp_path, capsys):
    out = tmp_path / "m.parquet"
    assert main(["manifest", "samples", str(samples_dir), "-o", str(out)]) == 0
    rows, bad = read_manifest(out)
    assert sorted(r.clip_id for r in rows) == ["samples_sun", "samples_yongen"] and bad == []
    text = capsys.readouterr().out
    assert "samples" in text and re.search(r"\b2\b", text)


def test_model_info_reports_parameters(capsys):
    assert main(["model-info", "tiny"]) == 0
    text = capsys.readouterr().out
    total = int(re.search(r"total\s+([\d,]+)", text).group(1).replace(",", ""))
    from models.dualforce import build_model

    assert total == sum(p.numel() for p in build_model("tiny").parameters())


def test_parser_rejects_unknown_choices():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["preprocess", "hdtf", "--manifest", "m", "--out", "o", "--models", "fake"])
    args = build_parser().parse_args(["dry-run"])
    assert args.window_frames == 17 and args.window_stride == 200 and args.train_steps == 4


def test_preprocess_retry_rejected_flag_and_summary_counts_retryable():
    from flows.run_summary import preprocess_lines

    parse = build_parser().parse_args
    assert parse(["preprocess", "d", "--manifest", "m", "--out", "o", "--retry-rejected"]).retry_rejected
    assert not parse(["preprocess", "d", "--manifest", "m", "--out", "o"]).retry_rejected
    counts = {"step": "download", "ok": 1, "rejected": 0, "retryable": 2, "failed": 0, "skipped": 0, "seconds": 1.0}
    text = "\n".join(preprocess_lines({"dataset": "d", "clips_in": 3, "clips_out": 1, "rejected": [],
                                       "step_counts": [counts], "clips_retryable": 2, "output": "o"}, 1.0))
    assert re.search(r"step\s+ok\s+rej\s+retry\s+fail", text) and re.search(r"download\s+1\s+0\s+2\s+0", text)
    assert "2 clips hit a transient failure" in text


def test_a_large_run_summary_counts_reasons_instead_of_listing_every_clip():
    from flows.run_summary import LISTED_CLIPS, preprocess_lines, preprocess_markdown

    def report(n_rejected: int) -> dict:
        rejected = [{"clip_id": f"c{i:05d}", "status": "rejected", "step": "crop" if i % 3 else "download",
                     "reason": "no_face" if i % 3 else "corrupt", "detail": "x"} for i in range(n_rejected)]
        return {"dataset": "d", "clips_in": 10_000, "clips_out": 10_000 - n_rejected, "rejected": rejected,
                "step_counts": [], "output": "o"}

    small = "\n".join(preprocess_lines(report(LISTED_CLIPS), 1.0))
    assert "c00008: rejected at crop [no_face] x" in small  # a few: each clip named
    for n in (LISTED_CLIPS + 1, 3000):
        lines = preprocess_lines(report(n), 1.0)
        text = "\n".join(lines)
        assert "c00005" not in text and f"{n} clips did not make it" in text
        assert f"- {n - (n + 2) // 3} rejected at crop [no_face]" in text
        assert f"- {(n + 2) // 3} rejected at download [corrupt]" in text
        assert len(lines) == len(preprocess_lines(report(LISTED_CLIPS + 1), 1.0))  # as long at 3,000 as at 11
        markdown = "\n".join(preprocess_markdown(report(n)))
        assert "c00005" not in markdown and f"| {(n + 2) // 3} | rejected at download [corrupt] |" in markdown
