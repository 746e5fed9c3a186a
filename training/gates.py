"""Training go/no-go gates (DESIGN.md gate table) as pure functions of the metrics stream.

Input is the list of metrics.jsonl records ({"step", "loss", "video_loss", "struct_loss", "memory_mb", ...})
and the per-rank run statuses; output is a tasks.gate_verdict.GateVerdict. A gate whose step has not been reached
says so (evaluated False: titled NOT EVALUATED, never GO) rather than guessing.

gate_steps() is the schedule the training flow runs by: the trainer stops at each gate's step, the flow judges
that gate there, and only then does training go on (or branch). A gate step of None means the stage has no
such gate (a video-only pretraining run has no struct stream to judge joint progress on).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any, Literal, Optional, Sequence, get_args

from pydantic import ConfigDict

from tasks import contract
from tasks.gate_verdict import GateVerdict
from training.run_status import NONFINITE, OOM, RunStatus

Records = Sequence[dict[str, Any]]


OnTimeout = Literal["continue", "stop"]  # what an unanswered review does


@dataclass(frozen=True)
class ReviewOptions:
    """How the sample-review gate (review_step) is answered when no person does."""

    __pydantic_config__ = ConfigDict(extra="forbid")

    auto_approve: bool = False  # answer continue at once (unattended runs, CI)
    timeout_s: int = 3600  # how long the review waits for a person
    on_timeout: OnTimeout = "continue"

    def __post_init__(self) -> None:
        if self.timeout_s < 1:
            raise ValueError(f"review timeout_s must be >= 1, got {self.timeout_s}")
        if self.on_timeout not in get_args(OnTimeout):
            raise ValueError(f"review on_timeout must be one of {get_args(OnTimeout)}, got {self.on_timeout!r}")


GATE_LOG = "gates.jsonl"  # one line per verdict, in the training directory, as each is made (flows/train.py)


def read_gate_log(train_dir: Path) -> list[dict[str, Any]]:
    """The verdicts a training flow recorded in `train_dir`, oldest first ([] before the first)."""
    log = Path(train_dir) / GATE_LOG
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.is_file() else []


@dataclass(frozen=True)
class TrainingGateConfig:
    __pydantic_config__ = ConfigDict(extra="forbid")  # as a flow parameter: a misspelt key is an error, not dropped

    memory_budget_mb: Optional[float] = None  # per device (GPU: max allocated, CPU: peak RSS); None: OOM only
    memory_step: int = 10  # the peak is judged after this many steps (an OOM is acted on whenever it happens)
    fallback_latent_frames: int = 16  # memory fallback after batch 1: clip length in latent frames
    convergence_step: Optional[int] = 1000  # N: judge the loss here (None: this stage has no convergence gate) ...
    convergence_max_loss: float = 1.0  # ... X: it must be at most this
    convergence_window: int = 50  # steps averaged, ending at N
    stability_window: int = 200  # last steps searched for oscillation
    oscillation_chunks: int = 8  # the window is cut into this many chunk means
    oscillation_min_sign_changes: int = 5  # chunk-to-chunk direction flips needed to call it oscillating ...
    oscillation_min_amplitude: float = 0.25  # ... with mean |chunk change| / median chunk loss at least this
    joint_step: Optional[int] = 5000  # N for joint progress (None: no such gate, e.g. video-only pretraining)
    joint_window: int = 50  # steps averaged at the start and at N
    joint_min_rel_drop: float = 0.02  # each loss must fall at least this fraction
    review_step: Optional[int] = None  # a person looks at the latest samples here (flows/review.py); None: no review
    # conditioning use (training/conditioning_use.py) on held-out windows at this step (None: no such gate):
    # NO-GO when the model ignores the speech or the reference. The ratios are loss with a wrong input / loss with the
    # true one at fixed noise; a zero-gated (ignoring) path gives exactly 1.00, so the bounds ask for a margin above
    # 1 that noise cannot give: the paired draw makes an ignoring model's ratio 1 +- 0 (measured: exactly 1.0000 on
    # the tiny model at init), and the CPU learning check (benchmarks/README.md) shows what learning looks like
    conditioning_step: Optional[int] = None
    conditioning_min_audio_use: float = 1.05  # mouth rows' loss, another clip's speech / the window's own (median)
    conditioning_min_reference_use: float = 1.05  # video loss, another identity's reference / the window's own
    conditioning_windows: int = 8  # held-out windows measured (round-robin over clips)

    def __post_init__(self) -> None:
        for name in ("memory_step", "convergence_step", "joint_step", "review_step", "conditioning_step"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for no such gate), got {value}")

    def judged_at(self, total_steps: int) -> dict[str, int]:
        """gate -> the step it is judged at in a run of total_steps (gates past the end are left out)."""
        steps = {"memory": min(self.memory_step, total_steps)}
        for gate, step in (("convergence", self.convergence_step), ("joint_progress", self.joint_step),
                           ("conditioning", self.conditioning_step), ("review", self.review_step)):
            if step is not None and step <= total_steps:
                steps[gate] = step
        return steps

    def unreachable(self, total_steps: int) -> dict[str, int]:
        """gate -> its step, for the gates this run never reaches (they end NOT EVALUATED)."""
        steps = {"convergence": self.convergence_step, "joint_progress": self.joint_step,
                 "conditioning": self.conditioning_step, "review": self.review_step}
        return {g: s for g, s in steps.items() if s is not None and s > total_steps}


def gate_steps(cfg: TrainingGateConfig, total_steps: int) -> list[int]:
    """The steps the trainer stops at: every gate's step within the run, and the last step."""
    return sorted(set(cfg.judged_at(total_steps).values()) | {total_steps})


def _losses(records: Records, key: str = "loss", upto: Optional[int] = None) -> list[tuple[int, float]]:
    out = []
    for r in records:
        if key in r and r[key] is not None and (upto is None or r["step"] <= upto):
            out.append((int(r["step"]), float(r[key])))
    return out


def _last_step(records: Records) -> int:
    return max((int(r["step"]) for r in records), default=0)


def memory_fallback(micro_batch: int, window_frames: int, fallback_window_frames: int) -> Optional[dict[str, int]]:
    """Next setting to try after running out of memory: batch 1 first, then the shorter clip; None when spent."""
    if micro_batch > 1:
        return {"micro_batch": 1, "window_frames": window_frames}
    if window_frames > fallback_window_frames:
        return {"micro_batch": 1, "window_frames": fallback_window_frames}
    return None


def memory_gate(
    records: Records, statuses: Sequence[RunStatus], cfg: TrainingGateConfig, micro_batch: int, window_frames: int
) -> GateVerdict:
    fallback_window_frames = contract.video_frames(cfg.fallback_latent_frames)
    ooms = [s for s in statuses if s.status == OOM]
    peaks = [float(r["memory_mb"]) for r in records if r.get("memory_mb") is not None]
    peak = max(peaks, default=None)
    over = cfg.memory_budget_mb is not None and peak is not None and peak > cfg.memory_budget_mb
    numbers = {
        "micro_batch": micro_batch,
        "window_frames": window_frames,
        "peak_memory_mb": peak,
        "budget_mb": cfg.memory_budget_mb,
        "oom_ranks": [s.rank for s in ooms],
        "oom_step": min((s.step + 1 for s in ooms), default=None),
    }
    if not ooms and not over:
        summary = f"peak {peak:.0f} MB" if peak is not None else "no memory figure recorded"
        if cfg.memory_budget_mb is not None:
            summary += f" within budget {cfg.memory_budget_mb:.0f} MB"
        return GateVerdict("memory", True, f"{summary} (batch {micro_batch}, window {window_frames})", numbers)
    nxt = memory_fallback(micro_batch, window_frames, fallback_window_frames)
    if nxt is None:
        recommendation = "stop: does not fit even at batch 1 and the shortest clip; shrink the model or shard it further"
    elif nxt["micro_batch"] != micro_batch:
        recommendation = "retry with micro batch 1"
    else:
        recommendation = (
            f"retry with clip length {cfg.fallback_latent_frames} latent frames ({nxt['window_frames']} video frames)"
        )
    numbers["next"] = nxt
    cause = (
        f"out of memory on rank(s) {numbers['oom_ranks']} at step {numbers['oom_step']}"
        if ooms
        else f"peak {peak:.0f} MB over budget {cfg.memory_budget_mb:.0f} MB"
    )
    return GateVerdict("memory", False, f"{cause} (batch {micro_batch}, window {window_frames})", numbers, recommendation)


def oscillation(losses: Sequence[float], chunks: int) -> tuple[int, float]:
    """(direction flips between consecutive chunk means, mean |chunk change| / median chunk mean)."""
    size = len(losses) // chunks
    if size < 1 or chunks < 3:
        return 0, 0.0
    means = [sum(losses[i * size : (i + 1) * size]) / size for i in range(chunks)]
    diffs = [b - a for a, b in zip(means, means[1:])]
    flips = sum(1 for a, b in zip(diffs, diffs[1:]) if a * b < 0)
    scale = abs(median(means)) or 1e-12
    return flips, sum(abs(d) for d in diffs) / len(diffs) / scale


def stability_gate(
    records: Records, statuses: Sequence[RunStatus], cfg: TrainingGateConfig, noise_mode: str
) -> GateVerdict:
    fallback = (
        "fall back from per-frame to per-sample noise (noise_mode=per_sample) and retry"
        if noise_mode == "per_frame"
        else "stop: unstable even with per-sample noise; lower the learning rate and report"
    )
    bad = [
        r["step"]
        for r in records
        if r.get("nonfinite") or any(
            r.get(k) is not None and not math.isfinite(float(r[k])) for k in ("loss", "video_loss", "struct_loss")
        )
    ]
    bad += [s.step + 1 for s in statuses if s.status == NONFINITE]
    numbers: dict[str, Any] = {"noise_mode": noise_mode, "first_nonfinite_step": min(bad, default=None)}
    if bad:
        return GateVerdict("stability", False, f"loss is NaN/inf at step {min(bad)}", numbers, fallback)
    tail = [v for _, v in _losses(records)][-cfg.stability_window :]
    flips, amplitude = oscillation(tail, cfg.oscillation_chunks)
    numbers.update(
        steps_checked=len(tail),
        sign_changes=flips,
        amplitude=amplitude,
        min_sign_changes=cfg.oscillation_min_sign_changes,
        min_amplitude=cfg.oscillation_min_amplitude,
    )
    if flips >= cfg.oscillation_min_sign_changes and amplitude >= cfg.oscillation_min_amplitude:
        summary = f"loss oscillates over the last {len(tail)} steps ({flips} flips, amplitude {amplitude:.2f})"
        return GateVerdict("stability", False, summary, numbers, fallback)
    return GateVerdict(
        "stability", True, f"finite loss, no oscillation ({flips} flips, amplitude {amplitude:.2f})", numbers
    )


def _window_mean(points: list[tuple[int, float]], end: int, width: int) -> Optional[float]:
    vals = [v for s, v in points if end - width < s <= end]
    return sum(vals) / len(vals) if vals else None


def not_evaluated(gate: str, last: int, step: Optional[int], numbers: Optional[dict[str, Any]] = None) -> GateVerdict:
    """The verdict of a gate whose step was never reached: it decided nothing, and says so."""
    numbers = dict(numbers or {}, step=step, last_step=last, evaluated=False)
    return GateVerdict(gate, True, f"not evaluated: the run ended at step {last}, before step {step}", numbers,
                       evaluated=False)


def _not_reached(gate: str, last: int, step: Optional[int], numbers: dict[str, Any]) -> Optional[GateVerdict]:
    if step is not None and last >= step:
        return None
    if step is None:
        numbers["evaluated"] = False
        return GateVerdict(gate, True, "not evaluated: this stage has no such gate", numbers, evaluated=False)
    return not_evaluated(gate, last, step, numbers)


def convergence_gate(records: Records, cfg: TrainingGateConfig) -> GateVerdict:
    last = _last_step(records)
    numbers: dict[str, Any] = {"step": cfg.convergence_step, "max_loss": cfg.convergence_max_loss, "last_step": last}
    pending = _not_reached("convergence", last, cfg.convergence_step, numbers)
    if pending:
        return pending
    loss = _window_mean(_losses(records, upto=cfg.convergence_step), cfg.convergence_step, cfg.convergence_window)
    numbers.update(evaluated=True, loss_at_step=loss)
    if loss is None or loss > cfg.convergence_max_loss:
        shown = "no finite loss" if loss is None else f"loss {loss:.4f}"
        return GateVerdict(
            "convergence",
            False,
            f"{shown} at step {cfg.convergence_step} is above {cfg.convergence_max_loss}",
            numbers,
            "switch to training directly on talking-head data (skip the general pretraining stage)",
        )
    return GateVerdict(
        "convergence", True, f"loss {loss:.4f} at step {cfg.convergence_step} <= {cfg.convergence_max_loss}", numbers
    )


def joint_progress_gate(records: Records, cfg: TrainingGateConfig) -> GateVerdict:
    last = _last_step(records)
    numbers: dict[str, Any] = {"step": cfg.joint_step, "min_rel_drop": cfg.joint_min_rel_drop, "last_step": last}
    pending = _not_reached("joint_progress", last, cfg.joint_step, numbers)
    if pending:
        return pending
    rows = []
    for stream in ("video_loss", "struct_loss"):
        points = _losses(records, stream, upto=cfg.joint_step)
        first_step = min((s for s, _ in points), default=0)
        start = _window_mean(points, first_step + cfg.joint_window - 1, cfg.joint_window)
        end = _window_mean(points, cfg.joint_step, cfg.joint_window)
        drop = (start - end) / abs(start) if start and end is not None else None
        ok = drop is not None and drop >= cfg.joint_min_rel_drop
        rows.append({"stream": stream, "start_mean": start, "end_mean": end, "rel_drop": drop, "falling": ok})
    numbers["evaluated"] = True
    falling = [r["stream"] for r in rows if r["falling"]]
    if len(falling) == 2:
        return GateVerdict("joint_progress", True, "video and struct losses both falling", numbers, rows=rows)
    stuck = [r["stream"] for r in rows if not r["falling"]]
    return GateVerdict(
        "joint_progress",
        False,
        f"by step {cfg.joint_step} not falling: {', '.join(stuck)}",
        numbers,
        "stop and report: the two streams are not learning together (check the bridge and loss weights)",
        rows,
    )


CONDITIONING_FIX = {
    "audio": "the model ignores the speech: lower audio_drop_prob (loss_options; the audio path sees the true speech "
             "more often), turn the lip-sync loss on (loss_options.lipsync_loss_weight, e.g. 0.1), and check the "
             "HuBERT features are aligned to the frames (audit the shard set)",
    "reference": "the model ignores the reference: lower reference_drop_prob (loss_options) and check the shards' "
                 "reference latents are their clips' own first frames (audit the shard set)",
}


def conditioning_gate(report, cfg: TrainingGateConfig, step: int) -> GateVerdict:
    """NO-GO when the held-out audio-use or reference-use ratio (median over windows) is below its bound;
    `report` is a training.conditioning_use.ConditioningUse measured at `step`."""
    audio = report.get("audio", "other clip's speech", "mouth")
    reference = report.get("reference", "other identity", "video")
    numbers: dict[str, Any] = {"step": step, "windows": report.windows, "split": report.split,
                               "min_audio_use": cfg.conditioning_min_audio_use,
                               "min_reference_use": cfg.conditioning_min_reference_use, "evaluated": True}
    rows = report.rows()
    if audio is None or reference is None:
        why = "; ".join(f"{k}: {v}" for k, v in report.skipped.items()) or "no figure measured"
        numbers["evaluated"] = False
        return GateVerdict("conditioning", True, f"not evaluated: {why}", numbers, rows=rows, evaluated=False)
    numbers.update(audio_use=audio.ratio_median, audio_use_q25=audio.ratio_q25, audio_use_q75=audio.ratio_q75,
                   reference_use=reference.ratio_median, reference_use_q25=reference.ratio_q25,
                   reference_use_q75=reference.ratio_q75)
    shown = (f"audio use {audio.ratio_median:.3f} (q25-q75 {audio.ratio_q25:.3f}-{audio.ratio_q75:.3f}), "
             f"reference use {reference.ratio_median:.3f} (q25-q75 {reference.ratio_q25:.3f}-"
             f"{reference.ratio_q75:.3f}) on {report.windows} {report.split} windows at step {step}")
    ignored = [name for name, fig, bound in (("audio", audio, cfg.conditioning_min_audio_use),
                                             ("reference", reference, cfg.conditioning_min_reference_use))
               if not fig.ratio_median >= bound]
    if not ignored:
        return GateVerdict("conditioning", True, shown, numbers, rows=rows)
    bounds = ", ".join(f"{n} use below {getattr(cfg, f'conditioning_min_{n}_use')}" for n in ignored)
    return GateVerdict("conditioning", False, f"{bounds}: {shown}", numbers,
                       " | ".join(CONDITIONING_FIX[n] for n in ignored), rows)
