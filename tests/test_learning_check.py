"""The learning check at a small size (benchmarks/learning_check.py; the figures come from its full run): real
sample clips through the real step functions, the tiny model trained, then measured on held-out windows."""
from __future__ import annotations

import json

import pytest


@pytest.mark.slow  # ~90 s: two clips cropped and encoded, 60 training steps, the probes and the drift
def test_training_lowers_the_held_out_loss_and_every_figure_is_measured(samples_dir, tmp_path):
    from benchmarks.learning_check import main

    report = main(["--clips", "yongen.mp4", "more/lp_d12.mp4", "--window", "17", "--stride", "8",
                   "--held-out-frames", "40", "--max-steps", "60", "--minutes", "5", "--schedules", "default",
                   "--samples", str(samples_dir), "--use-windows", "6", "--out", str(tmp_path)])
    assert json.loads((tmp_path / "learning_check.json").read_text())["train_windows"] == report["train_windows"]
    clips = {c["name"]: c for c in report["clips"]}
    assert set(clips) == {"yongen", "lp_d12"} and all(c["held_out_windows"] >= 1 for c in clips.values())
    run = report["schedules"]["default"]
    assert run["steps"] == 60
    curve = run["held_out_curve"]
    assert curve[0]["step"] == 0 and curve[-1]["step"] == 60
    assert curve[-1]["video"] < curve[0]["video"] and curve[-1]["struct"] < curve[0]["struct"]
    figures = {f["name"]: f for f in run["conditioning"]["figures"]}
    for name in ("audio use (other clip's speech, mouth)", "reference use (other identity, video)",
                 "bridge use (bridge closed, struct)"):
        assert figures[name]["windows"] == 6 and figures[name]["ratio_q25"] <= figures[name]["ratio_median"]
    drift = run["conditioning"]["drift"]
    assert len(drift["ratio"]) == 5 and all(r > 0 for r in drift["ratio"])


@pytest.mark.slow  # ~15 s: a clip cropped and encoded
def test_held_out_windows_never_overlap_training_windows(samples_dir, tmp_path):
    """The split the check's claims rest on: per clip, every training window ends before the first held-out one."""
    from benchmarks.learning_check import CheckConfig, clip_windows
    from tasks.feature_models import dryrun_models

    cfg = CheckConfig(window_frames=17, stride=8, held_out_frames=40)
    clip = clip_windows(samples_dir / "more" / "lp_d12.mp4", tmp_path, cfg, dryrun_models())
    starts = lambda ws: [int(w.key.rsplit("_w", 1)[1]) for w in ws]  # noqa: E731
    assert clip.train and clip.held_out
    assert max(starts(clip.train)) + cfg.window_frames <= min(starts(clip.held_out))
    assert min(starts(clip.held_out)) >= clip.frames - cfg.held_out_frames
    # a window's struct rows are the clip's rows at its frames: consecutive windows overlap by window - stride
    a, b = clip.train[0].tensors["struct"], clip.train[1].tensors["struct"]
    assert (a[cfg.stride:] == b[: cfg.window_frames - cfg.stride]).all()
