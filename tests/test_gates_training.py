"""Training gates: each one going and no-going on constructed metric streams."""
from __future__ import annotations

import math

import numpy as np

from training.gates import (
    TrainingGateConfig,
    convergence_gate,
    joint_progress_gate,
    memory_fallback,
    memory_gate,
    oscillation,
    stability_gate,
)
from training.run_status import COMPLETED, NONFINITE, OOM, RunStatus


def stream(n: int, loss=lambda s: 1.0, video=None, struct=None, memory=1000.0, seed=0) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for s in range(1, n + 1):
        v = video(s) if video else loss(s) / 2
        st = struct(s) if struct else loss(s) / 2
        noise = float(rng.normal(0, 0.01))
        records.append({"step": s, "loss": v + st + noise, "video_loss": v + noise, "struct_loss": st, "memory_mb": memory})
    return records


OK = [RunStatus(0, COMPLETED, 10), RunStatus(1, COMPLETED, 10)]


def test_memory_gate_go_and_budget_no_go():
    cfg = TrainingGateConfig(memory_budget_mb=2000)
    go = memory_gate(stream(5, memory=1500.0), OK, cfg, micro_batch=4, window_frames=81)
    assert go.go and go.numbers["peak_memory_mb"] == 1500.0 and go.state_name == "GO"
    nogo = memory_gate(stream(5, memory=2500.0), OK, cfg, micro_batch=4, window_frames=81)
    assert not nogo.go and "over budget" in nogo.summary
    assert nogo.recommendation == "retry with micro batch 1" and nogo.numbers["next"] == {"micro_batch": 1, "window_frames": 81}
    assert nogo.state_name == "NO-GO: memory"


def test_memory_gate_oom_walks_the_fallbacks():
    cfg = TrainingGateConfig(fallback_latent_frames=16)  # 61 video frames
    ooms = [RunStatus(0, COMPLETED, 2), RunStatus(1, OOM, 2)]
    first = memory_gate([], ooms, cfg, micro_batch=2, window_frames=81)
    assert not first.go and first.numbers["oom_ranks"] == [1] and first.numbers["oom_step"] == 3
    assert first.recommendation == "retry with micro batch 1"
    second = memory_gate([], ooms, cfg, micro_batch=1, window_frames=81)
    assert "16 latent frames (61 video frames)" in second.recommendation
    assert second.numbers["next"] == {"micro_batch": 1, "window_frames": 61}
    third = memory_gate([], ooms, cfg, micro_batch=1, window_frames=61)
    assert third.numbers["next"] is None and third.recommendation.startswith("stop")
    assert memory_fallback(1, 61, 61) is None
    # no budget and no OOM: go even with a large peak
    assert memory_gate(stream(3, memory=1e6), OK, cfg, 2, 81).go


def test_stability_gate_nan_and_nonfinite_status():
    cfg = TrainingGateConfig()
    records = stream(20)
    records[12]["loss"] = math.nan
    verdict = stability_gate(records, OK, cfg, "per_frame")
    assert not verdict.go and verdict.numbers["first_nonfinite_step"] == 13
    assert "per-sample noise" in verdict.recommendation
    crashed = stability_gate(stream(4), [RunStatus(0, NONFINITE, 4)], cfg, "per_sample")
    assert not crashed.go and crashed.numbers["first_nonfinite_step"] == 5
    assert crashed.recommendation.startswith("stop")


def test_stability_gate_oscillation_versus_noisy_descent():
    cfg = TrainingGateConfig(stability_window=160, oscillation_chunks=8)
    # square wave with period 40 steps between 1.0 and 2.0: chunk means (20 steps) alternate
    swing = stream(200, loss=lambda s: 1.0 + ((s // 20) % 2))
    verdict = stability_gate(swing, OK, cfg, "per_frame")
    assert not verdict.go and verdict.numbers["sign_changes"] >= 5 and verdict.numbers["amplitude"] > 0.25
    descent = stream(200, loss=lambda s: 2.0 * math.exp(-s / 80) + 0.2)
    assert stability_gate(descent, OK, cfg, "per_frame").go
    flat_noise = stream(200, loss=lambda s: 0.5, seed=3)  # flips, but tiny amplitude
    ok = stability_gate(flat_noise, OK, cfg, "per_frame")
    assert ok.go and ok.numbers["amplitude"] < 0.05
    assert oscillation([1, 2, 1, 2, 1, 2], 6) == (4, 1.0 / 1.5)


def test_convergence_gate():
    cfg = TrainingGateConfig(convergence_step=100, convergence_max_loss=0.5, convergence_window=10)
    falling = stream(120, loss=lambda s: 2.0 * math.exp(-s / 20))
    assert convergence_gate(falling, cfg).go
    stuck = stream(120, loss=lambda s: 0.9)
    verdict = convergence_gate(stuck, cfg)
    assert not verdict.go and abs(verdict.numbers["loss_at_step"] - 0.9) < 0.02
    assert "talking-head data" in verdict.recommendation
    early = convergence_gate(stuck[:50], cfg)
    assert early.go and early.numbers["evaluated"] is False and "not evaluated" in early.summary


def test_joint_progress_gate():
    cfg = TrainingGateConfig(joint_step=100, joint_window=10, joint_min_rel_drop=0.05)
    both = stream(100, video=lambda s: 1.0 - 0.004 * s, struct=lambda s: 2.0 - 0.01 * s)
    verdict = joint_progress_gate(both, cfg)
    assert verdict.go and all(r["falling"] for r in verdict.rows)
    struct_flat = stream(100, video=lambda s: 1.0 - 0.004 * s, struct=lambda s: 2.0)
    nogo = joint_progress_gate(struct_flat, cfg)
    assert not nogo.go and "struct_loss" in nogo.summary and "video_loss" not in nogo.summary
    assert [r["falling"] for r in nogo.rows] == [True, False]
    assert nogo.recommendation.startswith("stop")
    assert joint_progress_gate(both[:60], cfg).numbers["evaluated"] is False


def test_convergence_without_any_loss_at_step_n_is_no_go():
    records = [{"step": s} for s in range(1, 11)]  # steps ran, no loss recorded (every one non-finite)
    verdict = convergence_gate(records, TrainingGateConfig(convergence_step=10, convergence_window=5))
    assert not verdict.go and verdict.summary.startswith("no finite loss at step 10")
    assert verdict.numbers["loss_at_step"] is None and verdict.numbers["evaluated"] is True
