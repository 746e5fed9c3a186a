"""Training stage as a Prefect flow: launch the DeepSpeed trainer, stream its logs, apply the training gates.

Order of decisions after each attempt (DESIGN.md gate table):
  trainer crashed                -> FAILED "TrainerCrashed" with the workers' errors and log tail
  memory  (OOM / over budget)    -> retry with micro batch 1, then with the 16-latent-frame clip, then NO-GO
  stability (NaN / oscillation)  -> retry once with per-sample noise (per_frame runs), then NO-GO
  convergence (loss > X at N)    -> NO-GO: train directly on talking-head data
  joint progress (at N)          -> NO-GO: stop and report
Every verdict is published as artifacts (flows/gate_artifacts.py). Each retry is a new run directory named
by its settings, so re-running the flow resumes an interrupted attempt from its last checkpoint.

    python -m flows.train --config train.json [--gates gates.json] [--nproc-per-node 2]
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from flows.gate_artifacts import publish_gate
from tasks import contract
from training.config import TrainConfig
from training.gates import (
    TrainingGateConfig,
    convergence_gate,
    joint_progress_gate,
    memory_fallback,
    memory_gate,
    stability_gate,
)
from training.launch import LaunchSpec, ProcessResult, command, environment, run_streaming
from training.loss_plot import plot_losses
from training.metrics import METRICS_FILE, read_metrics
from training.run_status import COMPLETED, NONFINITE, OOM, STOPPED, RunStatus, clear_statuses, read_statuses


@dataclass(frozen=True)
class Attempt:
    cfg: TrainConfig
    run_dir: Path
    process: ProcessResult
    records: list[dict[str, Any]]
    statuses: list[RunStatus]

    @property
    def kinds(self) -> set[str]:
        return {s.status for s in self.statuses}


def attempt_dir(base: Path, cfg: TrainConfig) -> Path:
    return base / f"run-b{cfg.micro_batch}-w{cfg.effective_window}-{cfg.noise_mode}"


@task(name="run-trainer", cache_policy=NO_CACHE)  # a training run is never served from cache
def run_trainer(cfg: TrainConfig, spec: LaunchSpec, timeout_s: Optional[float] = None) -> Attempt:
    """Start the trainer processes, forward every log line to this run's logger, collect metrics and statuses."""
    logger = get_run_logger()
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_statuses(run_dir)
    config_path = run_dir / "train_config.json"
    config_path.write_text(json.dumps(cfg.to_dict(), indent=2))
    args = command(spec, config_path)
    logger.info("launching: %s", " ".join(args))
    result = run_streaming(args, lambda line: logger.info("%s", line), env=environment(), timeout_s=timeout_s)
    logger.info("trainer exited with code %d%s", result.returncode, " (timed out)" if result.timed_out else "")
    return Attempt(cfg, run_dir, result, read_metrics(run_dir / METRICS_FILE), read_statuses(run_dir))


def _crash_state(attempt: Attempt) -> State:
    errors = [f"rank {s.rank} at step {s.step + 1}: {s.error}" for s in attempt.statuses if s.error]
    cause = "timed out" if attempt.process.timed_out else f"exited with code {attempt.process.returncode}"
    tail = "\n".join(attempt.process.tail)
    create_markdown_artifact(
        f"## Trainer {cause}\n\n" + "".join(f"- {e}\n" for e in errors) + f"\nLog tail:\n\n```\n{tail}\n```\n",
        key="trainer-crash",
        description=f"trainer {cause}",
    )
    message = f"trainer {cause} in {attempt.run_dir}"
    if errors:
        message += "; " + "; ".join(errors)
    return Failed(name="TrainerCrashed", message=f"{message}\nlast log lines:\n{tail}")


def _publish(verdict, attempt: Attempt) -> State:
    plot = plot_losses(attempt.records, attempt.run_dir / f"gate-{verdict.gate}.png", title=attempt.run_dir.name)
    return publish_gate(verdict, image=plot, key_prefix="train-gate")


@flow(name="train")
def train_flow(
    config: dict[str, Any],
    nproc_per_node: int = 2,
    launcher: str = "torchrun",
    gates: Optional[dict[str, Any]] = None,
    retry_per_sample_noise: bool = True,
    timeout_s: Optional[float] = None,
) -> State:
    """`config` is a training.config.TrainConfig as a dict; `gates` a training.gates.TrainingGateConfig."""
    logger = get_run_logger()
    base_cfg = TrainConfig.from_dict(config)
    gate_cfg = TrainingGateConfig(**(gates or {}))
    spec = LaunchSpec(nproc_per_node=nproc_per_node, launcher=launcher)
    base_dir = Path(base_cfg.out_dir)
    fallback_window = contract.window_frames(gate_cfg.fallback_latent_frames - 1)
    cfg = base_cfg
    tried: set[Path] = set()
    while True:
        cfg = replace(cfg, out_dir=str(attempt_dir(base_dir, cfg)))
        if Path(cfg.out_dir) in tried:  # a fallback that changes nothing would loop forever
            return Failed(name="NO-GO", message=f"no further fallback: {cfg.out_dir} was already tried")
        tried.add(Path(cfg.out_dir))
        attempt = run_trainer(cfg, spec, timeout_s)
        kinds = attempt.kinds

        memory = memory_gate(attempt.records, attempt.statuses, gate_cfg, cfg.micro_batch, cfg.effective_window)
        if OOM in kinds or not memory.go:
            state = _publish(memory, attempt)
            nxt = memory_fallback(cfg.micro_batch, cfg.effective_window, fallback_window)
            if nxt is None:
                return state
            logger.warning("memory gate: %s -> %s", memory.summary, memory.recommendation)
            window = nxt["window"] if nxt["window"] != cfg.effective_window else cfg.train_window
            cfg = replace(cfg, micro_batch=nxt["micro_batch"], train_window=window)
            continue

        stability = stability_gate(attempt.records, attempt.statuses, gate_cfg, cfg.noise_mode)
        if NONFINITE not in kinds and (
            attempt.process.returncode != 0 or not kinds or kinds - {COMPLETED, STOPPED}
        ):
            return _crash_state(attempt)
        _publish(memory, attempt)
        if not stability.go:
            state = _publish(stability, attempt)
            if retry_per_sample_noise and cfg.noise_mode == "per_frame":
                logger.warning("stability gate: %s -> retrying with per-sample noise", stability.summary)
                cfg = replace(cfg, noise_mode="per_sample")
                continue
            return state
        _publish(stability, attempt)
        for gate in (convergence_gate, joint_progress_gate):
            verdict = gate(attempt.records, gate_cfg)
            state = _publish(verdict, attempt)
            if not verdict.go:
                return state
        last = attempt.records[-1] if attempt.records else {}
        return Completed(
            name="GO",
            message=f"trained {last.get('step', 0)} steps in {attempt.run_dir} "
            f"(final loss {last.get('loss')}); all training gates GO",
        )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Run the training stage flow.")
    parser.add_argument("--config", required=True, help="TrainConfig JSON")
    parser.add_argument("--gates", help="TrainingGateConfig JSON")
    parser.add_argument("--nproc-per-node", type=int, default=2)
    parser.add_argument("--launcher", default="torchrun", choices=["torchrun", "deepspeed"])
    ns = parser.parse_args()
    train_flow(
        json.loads(Path(ns.config).read_text()),
        nproc_per_node=ns.nproc_per_node,
        launcher=ns.launcher,
        gates=json.loads(Path(ns.gates).read_text()) if ns.gates else None,
    )
