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

Many nodes (docs/multinode.md): either one flow run per node (torchrun, or deepspeed with no_ssh), all with
the same config and a shared out_dir, each deciding from the same shared files; or one flow run on node 0
that starts every node through DeepSpeed's launcher over pdsh/ssh with a hostfile.
"""
from __future__ import annotations

import json
import os
import socket
import time
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
from training.launch import LaunchSpec, ProcessResult, check_launch, command, environment, run_streaming
from training.loss_plot import plot_losses
from training.metrics import METRICS_FILE, read_metrics
from training.run_status import COMPLETED, NONFINITE, OOM, STOPPED, RunStatus, clear_statuses, read_statuses, status_path


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


def _write_config(cfg: TrainConfig, path: Path) -> None:
    """Every node writes the same file into the shared run directory: temp name per process, then rename."""
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2))
    os.replace(tmp, path)


def _wait_for_statuses(run_dir: Path, world_size: int, timeout_s: float) -> None:
    """Ranks on other nodes may still be writing their status when this node's launcher exits; every node's
    flow run must decide from the same files, or the nodes would part ways at a retry."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(status_path(run_dir, r).exists() for r in range(world_size)):
            return
        time.sleep(0.5)


@task(name="run-trainer", cache_policy=NO_CACHE)  # a training run is never served from cache
def run_trainer(
    cfg: TrainConfig, spec: LaunchSpec, timeout_s: Optional[float] = None, peer_wait_s: float = 60.0
) -> Attempt:
    """Start the trainer processes, forward every log line to this run's logger, collect metrics and statuses."""
    logger = get_run_logger()
    plan = check_launch(spec)
    run_dir = Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    clear_statuses(run_dir)
    config_path = run_dir / "train_config.json"
    _write_config(cfg, config_path)
    args = command(spec, config_path, rdzv_suffix=f"-{run_dir.name}")  # a retry never meets the last attempt
    logger.info("launching: %s", " ".join(args))
    result = run_streaming(args, lambda line: logger.info("%s", line), env=environment(), timeout_s=timeout_s)
    logger.info("trainer exited with code %d%s", result.returncode, " (timed out)" if result.timed_out else "")
    if plan.waits_for_peers:
        _wait_for_statuses(run_dir, plan.world_size, peer_wait_s)
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


def _publish(verdict, attempt: Attempt, spec: LaunchSpec) -> State:
    # one plot file per node: the flow runs of several nodes publish into the same shared run directory
    name = f"gate-{verdict.gate}-node{spec.node_rank}.png" if spec.multi_node else f"gate-{verdict.gate}.png"
    plot = plot_losses(attempt.records, attempt.run_dir / name, title=attempt.run_dir.name)
    return publish_gate(verdict, image=plot, key_prefix="train-gate")


@flow(name="train")
def train_flow(
    config: dict[str, Any],
    nproc_per_node: int = 2,
    launcher: str = "torchrun",
    gates: Optional[dict[str, Any]] = None,
    retry_per_sample_noise: bool = True,
    timeout_s: Optional[float] = None,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: Optional[str] = None,
    master_port: int = 29500,
    hostfile: Optional[str] = None,
    rdzv_backend: str = "static",
    rdzv_id: str = "dualforce",
    rdzv_timeout_s: Optional[int] = None,
    no_ssh: bool = False,
    ds_launcher: str = "pdsh",
    peer_wait_s: float = 60.0,
) -> State:
    """`config` is a training.config.TrainConfig as a dict; `gates` a training.gates.TrainingGateConfig.

    The launch parameters are training.launch.LaunchSpec's; multi-node runs need a shared out_dir.
    peer_wait_s: how long a node waits, after its launcher exits, for the other nodes' ranks' statuses.
    """
    spec = LaunchSpec(
        nproc_per_node=nproc_per_node, launcher=launcher, nnodes=nnodes, node_rank=node_rank,
        master_addr=master_addr, master_port=master_port, hostfile=hostfile, rdzv_backend=rdzv_backend,
        rdzv_id=rdzv_id, rdzv_timeout_s=rdzv_timeout_s, no_ssh=no_ssh, ds_launcher=ds_launcher,
    )
    plan = check_launch(spec)  # bad launch settings fail here, before anything starts
    logger = get_run_logger()
    base_cfg = TrainConfig.from_dict(config)
    gate_cfg = TrainingGateConfig(**(gates or {}))
    if spec.multi_node:
        logger.info("node %d of %d, %d trainer processes in all (%s)", spec.node_rank, spec.nnodes,
                    plan.world_size, spec.launcher)
    base_dir = Path(base_cfg.out_dir)
    fallback_window = contract.window_frames(gate_cfg.fallback_latent_frames - 1)
    cfg = base_cfg
    tried: set[Path] = set()
    while True:
        cfg = replace(cfg, out_dir=str(attempt_dir(base_dir, cfg)))
        if Path(cfg.out_dir) in tried:  # a fallback that changes nothing would loop forever
            return Failed(name="NO-GO", message=f"no further fallback: {cfg.out_dir} was already tried")
        tried.add(Path(cfg.out_dir))
        attempt = run_trainer(cfg, spec, timeout_s, peer_wait_s)
        kinds = attempt.kinds

        memory = memory_gate(attempt.records, attempt.statuses, gate_cfg, cfg.micro_batch, cfg.effective_window)
        if OOM in kinds or not memory.go:
            state = _publish(memory, attempt, spec)
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
        _publish(memory, attempt, spec)
        if not stability.go:
            state = _publish(stability, attempt, spec)
            if retry_per_sample_noise and cfg.noise_mode == "per_frame":
                logger.warning("stability gate: %s -> retrying with per-sample noise", stability.summary)
                cfg = replace(cfg, noise_mode="per_sample")
                continue
            return state
        _publish(stability, attempt, spec)
        for gate in (convergence_gate, joint_progress_gate):
            verdict = gate(attempt.records, gate_cfg)
            state = _publish(verdict, attempt, spec)
            if not verdict.go:
                return state
        last = attempt.records[-1] if attempt.records else {}
        return Completed(
            name="GO",
            message=f"trained {last.get('step', 0)} steps in {attempt.run_dir} "
            f"(final loss {last.get('loss')}); all training gates GO",
        )


def add_launch_arguments(parser) -> None:
    """The launch flags of `python -m flows.train` (and what a `dualforce train` command would take)."""
    parser.add_argument("--nproc-per-node", type=int, default=2, help="trainer processes per node")
    parser.add_argument("--launcher", default="torchrun", choices=["torchrun", "deepspeed"])
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0, help="this node, 0..nnodes-1 (e.g. $SLURM_NODEID)")
    parser.add_argument("--master-addr", help="rendezvous host: node 0 (e.g. first host of $SLURM_JOB_NODELIST)")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--hostfile", help="deepspeed launcher: 'HOST slots=N' per node")
    parser.add_argument("--rdzv-backend", default="static", choices=["static", "c10d"], help="torchrun, many nodes")
    parser.add_argument("--rdzv-id", default="dualforce", help="torchrun c10d: one id per job (e.g. $SLURM_JOB_ID)")
    parser.add_argument("--rdzv-timeout", type=int, dest="rdzv_timeout_s", help="torchrun c10d: seconds to wait for all nodes")
    parser.add_argument("--no-ssh", action="store_true", help="deepspeed: one launcher per node, no pdsh/ssh")
    parser.add_argument("--ds-launcher", default="pdsh", help="deepspeed over ssh: pdsh | openmpi | mvapich | slurm | mpich | impi")


def launch_kwargs(ns) -> dict[str, Any]:
    keys = ("nproc_per_node", "launcher", "nnodes", "node_rank", "master_addr", "master_port", "hostfile",
            "rdzv_backend", "rdzv_id", "rdzv_timeout_s", "no_ssh", "ds_launcher")
    return {k: getattr(ns, k) for k in keys}


if __name__ == "__main__":
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="Run the training stage flow.")
    parser.add_argument("--config", required=True, help="TrainConfig JSON")
    parser.add_argument("--gates", help="TrainingGateConfig JSON")
    add_launch_arguments(parser)
    ns = parser.parse_args()
    state = train_flow(
        json.loads(Path(ns.config).read_text()),
        gates=json.loads(Path(ns.gates).read_text()) if ns.gates else None,
        return_state=True,
        **launch_kwargs(ns),
    )
    print(f"{state.name}: {state.message}", file=sys.stderr)
    sys.exit(0 if state.is_completed() else 1)
