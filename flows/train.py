"""Training stage as a Prefect flow: the trainer runs from gate to gate, and each gate decides when it is reached.

The trainer stops at every gate step (training.gates.gate_steps: memory, convergence, joint progress, review,
the last step) after a checkpoint; the flow judges that gate there and only then relaunches it, which resumes
exactly (module, optimizer, data position, RNGs). What each verdict changes (DESIGN.md gate table):
  trainer crashed                -> FAILED "TrainerCrashed" with the workers' errors and log tail
  memory  (OOM any time / over budget at memory_step)
                                 -> a fresh attempt with micro batch 1, then with the 16-latent-frame clip, then NO-GO
  stability (NaN / oscillation)  -> per-sample noise, resumed from the last good checkpoint (per_frame runs), then NO-GO
  convergence (loss > X at N)    -> NO-GO at N: train directly on talking-head data (the program branches on it)
  joint progress (at N)          -> NO-GO at N: stop and report
  review (at the review step)    -> pause for a person's answer: continue / stop (NO-GO) / adjust
Every verdict is published as artifacts the moment it is made (flows/gate_artifacts.py) and appended to
`gates.jsonl` in the training directory; gates the run never reaches end NOT EVALUATED. Each attempt is a run
directory named by its settings, so re-running the flow resumes where it stopped and re-judges from the files.

    dualforce train --config train.json [--gates gates.json] [--nproc-per-node 2]   (./run train ...)

Many nodes (docs/multinode.md): either one flow run per node (torchrun, or deepspeed with no_ssh), all with
the same config and a shared out_dir, each deciding from the same shared files; or one flow run on node 0
that starts every node through DeepSpeed's launcher over pdsh/ssh with a hostfile.
"""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin, get_type_hints

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Completed, Failed, State

from flows.cli_checks import at_least
from flows.gate_artifacts import publish_gate
from flows.outcomes import BAD_WEIGHTS
from flows.review import ask_reviewer, publish_review_request, review_verdict
from flows.sample_artifacts import publish_validation_samples
from models.weights import WeightsError
from tasks import contract
from tasks.gate_verdict import GateVerdict
from training import checkpoint
from training.conditioning_checkpoint import measure_checkpoint
from training.conditioning_use import ConditioningUseConfig
from training.gates import (
    GATE_LOG,
    OnTimeout,
    ReviewOptions,
    TrainingGateConfig,
    conditioning_gate,
    convergence_gate,
    gate_steps,
    joint_progress_gate,
    memory_fallback,
    memory_gate,
    not_evaluated,
    stability_gate,
)
from training.launch import (
    LaunchSpec,
    ProcessResult,
    check_launch,
    command,
    environment,
    run_streaming,
)
from training.metrics import METRICS_FILE, read_metrics
from training.plots import plot_losses, plot_memory
from training.run_status import COMPLETED, NONFINITE, OOM, STOPPED, RunStatus, clear_statuses, read_statuses, status_path
from training.train_config import TrainConfig
from training.warm_start import check_wan_init


@dataclass(frozen=True)
class TrainerRun:
    """One launch of the trainer processes: from the run directory's latest checkpoint to cfg.stop_at_step."""

    cfg: TrainConfig
    run_dir: Path
    process: ProcessResult
    records: list[dict[str, Any]]
    statuses: list[RunStatus]

    @property
    def kinds(self) -> set[str]:
        return {s.status for s in self.statuses}


def attempt_dir(base: Path, cfg: TrainConfig) -> Path:
    return base / f"run-b{cfg.micro_batch}-w{cfg.effective_window_frames}-{cfg.noise_mode}"


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
) -> TrainerRun:
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
    return TrainerRun(cfg, run_dir, result, read_metrics(run_dir / METRICS_FILE), read_statuses(run_dir))


def _crash_state(run: TrainerRun) -> State:
    errors = [f"rank {s.rank} at step {s.step + 1}: {s.error}" for s in run.statuses if s.error]
    cause = "timed out" if run.process.timed_out else f"exited with code {run.process.returncode}"
    tail = "\n".join(run.process.tail)
    create_markdown_artifact(
        f"## Trainer {cause}\n\n" + "".join(f"- {e}\n" for e in errors) + f"\nLog tail:\n\n```\n{tail}\n```\n",
        key="trainer-crash",
        description=f"trainer {cause}",
    )
    message = f"trainer {cause} in {run.run_dir}"
    if errors:
        message += "; " + "; ".join(errors)
    return Failed(name="TrainerCrashed", message=f"{message}\nlast log lines:\n{tail}")


@dataclass
class GateBook:
    """Publishes each verdict when it is made: artifacts, a plot, a line of gates.jsonl."""

    base_dir: Path
    spec: LaunchSpec
    gate_cfg: TrainingGateConfig

    def _plot(self, verdict: GateVerdict, run_dir: Path, records: list[dict[str, Any]]) -> Path:
        # one plot file per node: the flow runs of several nodes publish into the same shared run directory
        name = f"gate-{verdict.gate}-node{self.spec.node_rank}.png" if self.spec.multi_node else f"gate-{verdict.gate}.png"
        if verdict.numbers.get("plot"):  # the gate drew its own (the conditioning-use card)
            return Path(verdict.numbers["plot"])
        if verdict.gate == "memory":
            return plot_memory(records, run_dir / name, self.gate_cfg.memory_budget_mb, title=f"{run_dir.name}: peak memory")
        return plot_losses(records, run_dir / name, title=run_dir.name)

    def publish(self, verdict: GateVerdict, run_dir: Path, records: list[dict[str, Any]], step: int) -> State:
        state = publish_gate(verdict, image=self._plot(verdict, run_dir, records), key_prefix="train-gate")
        entry = {"gate": verdict.gate, "verdict": verdict.head, "step": step, "summary": verdict.summary,
                 "recommendation": verdict.recommendation, "run_dir": str(run_dir), "time": time.time(),
                 "numbers": verdict.numbers}
        log = self.base_dir / (f"gates-node{self.spec.node_rank}.jsonl" if self.spec.multi_node else GATE_LOG)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(json.dumps(entry, default=str) + "\n")
        return state


@dataclass(frozen=True)
class Retry:
    """The next attempt's settings, and why (a fallback of the memory or stability gate)."""

    cfg: TrainConfig
    reason: str


def _stability_retry(cfg: TrainConfig, run_dir: Path, records: list[dict[str, Any]], base: Path) -> Retry:
    """Per-sample noise from the last good checkpoint of this attempt (its metrics up to there come along)."""
    nxt = replace(cfg, noise_mode="per_sample")
    good = checkpoint.latest_step(run_dir / "checkpoints")
    if good == 0:
        return Retry(replace(nxt, resume_from=None), "no checkpoint before the instability: per-sample noise from step 0")
    new_dir = attempt_dir(base, nxt)
    new_dir.mkdir(parents=True, exist_ok=True)
    if checkpoint.latest_step(new_dir / "checkpoints") == 0:  # a re-run keeps the fallback's own progress
        seeded = "".join(json.dumps(r) + "\n" for r in records if r.get("step", 0) <= good)
        (new_dir / METRICS_FILE).write_text(seeded)
    return Retry(replace(nxt, resume_from=str(run_dir / "checkpoints")),
                 f"per-sample noise resumed from the step-{good} checkpoint of {run_dir.name}")


def _run_attempt(
    cfg: TrainConfig, spec: LaunchSpec, gate_cfg: TrainingGateConfig, book: GateBook, base: Path,
    timeout_s: Optional[float], peer_wait_s: float, retry_per_sample_noise: bool, review: ReviewOptions,
) -> State | Retry:
    """Train one setting from gate to gate; a State ends the flow, a Retry starts the next attempt."""
    logger = get_run_logger()
    run_dir = Path(cfg.out_dir)
    fallback_window_frames = contract.video_frames(gate_cfg.fallback_latent_frames)
    memory_judged = False
    published_samples: set[int] = set()
    stop_index = 0
    while True:
        schedule = gate_steps(gate_cfg, cfg.total_steps)  # a review may change total_steps
        due = gate_cfg.judged_at(cfg.total_steps)
        if stop_index >= len(schedule):
            break
        stop = schedule[stop_index]
        stop_index += 1
        run = None
        if checkpoint.latest_step(run_dir / "checkpoints") < stop:
            logger.info("training %s to step %d (next gate step)", run_dir.name, stop)
            run = run_trainer(replace(cfg, stop_at_step=stop if stop < cfg.total_steps else None), spec, timeout_s,
                              peer_wait_s)
        records = read_metrics(run_dir / METRICS_FILE)
        publish_validation_samples(run_dir, published_samples)  # the newest round, as soon as it is there
        statuses = run.statuses if run else []
        kinds = run.kinds if run else set()

        if OOM in kinds or (not memory_judged and stop >= due["memory"]):
            memory = memory_gate(records, statuses, gate_cfg, cfg.micro_batch, cfg.effective_window_frames)
            state = book.publish(memory, run_dir, records, stop)
            memory_judged = True
            if OOM in kinds or not memory.go:
                nxt = memory_fallback(cfg.micro_batch, cfg.effective_window_frames, fallback_window_frames)
                if nxt is None:
                    return state
                window_frames = (nxt["window_frames"] if nxt["window_frames"] != cfg.effective_window_frames
                                 else cfg.train_window_frames)
                return Retry(replace(cfg, micro_batch=nxt["micro_batch"], train_window_frames=window_frames,
                                     resume_from=None),
                             f"memory gate: {memory.summary} -> {memory.recommendation}")
        if run is not None and NONFINITE not in kinds and (
            run.process.returncode != 0 or not kinds or kinds - {COMPLETED, STOPPED}
        ):
            return _crash_state(run)
        stability = stability_gate(records, statuses, gate_cfg, cfg.noise_mode)
        if not stability.go:
            state = book.publish(stability, run_dir, records, stop)
            if retry_per_sample_noise and cfg.noise_mode == "per_frame":
                return _stability_retry(cfg, run_dir, records, base)
            return state
        if stop == cfg.total_steps:
            book.publish(stability, run_dir, records, stop)
        for name, gate in (("convergence", convergence_gate), ("joint_progress", joint_progress_gate)):
            if due.get(name) == stop:
                verdict = gate(records, gate_cfg)
                state = book.publish(verdict, run_dir, records, stop)
                if not verdict.go:
                    logger.warning("%s gate at step %d: %s; training stops here", name, stop, verdict.summary)
                    return state
        if due.get("conditioning") == stop:
            verdict = _conditioning_verdict(cfg, run_dir, stop, gate_cfg)
            state = book.publish(verdict, run_dir, records, stop)
            if not verdict.go:
                logger.warning("conditioning gate at step %d: %s; training stops here", stop, verdict.summary)
                return state
        if due.get("review") == stop:
            plot = plot_losses(records, run_dir / f"review-step{stop}.png", title=f"{run_dir.name} at step {stop}")
            publish_review_request(stop, run_dir, plot, review.timeout_s, review.on_timeout)
            answer, who = ask_reviewer(stop, review.auto_approve, review.timeout_s, review.on_timeout)
            verdict = review_verdict(stop, answer, who)
            state = book.publish(verdict, run_dir, records, stop)
            if not verdict.go:
                return state
            if answer.decision == "adjust":
                options = dict(cfg.loss_options, **answer.loss_options)
                cfg = replace(cfg, loss_options=options, total_steps=answer.total_steps or cfg.total_steps)
                logger.info("review adjusted the run: loss_options %s, total_steps %d", options, cfg.total_steps)
    last = records[-1] if records else {}
    skipped = gate_cfg.unreachable(cfg.total_steps)
    for gate, step in skipped.items():
        book.publish(not_evaluated(gate, cfg.total_steps, step), run_dir, records, cfg.total_steps)
    message = (f"trained {last.get('step', 0)} steps in {run_dir} (final loss {last.get('loss')}); "
               f"every gate judged GO")
    if skipped:
        message += "; not evaluated (their step is past the run's end): " + ", ".join(
            f"{g} at {s}" for g, s in skipped.items())
    return Completed(name="GO", message=message)


def _conditioning_verdict(cfg: TrainConfig, run_dir: Path, step: int, gate_cfg: TrainingGateConfig) -> GateVerdict:
    """The conditioning gate at `step`: the probes measured on the checkpoint the trainer just left there."""
    use_cfg = ConditioningUseConfig(windows=gate_cfg.conditioning_windows)
    try:
        report, record = measure_checkpoint(cfg, run_dir, step, use_cfg)
    except ValueError as exc:  # no held-out talking-head windows to measure on: it decides nothing, and says so
        return GateVerdict("conditioning", True, f"not evaluated: {exc}", {"step": step, "evaluated": False},
                           evaluated=False)
    verdict = conditioning_gate(report, gate_cfg, step)
    verdict.numbers.update(plot=str(record.with_suffix(".png")), record=str(record))
    return verdict


def publish_wan_plan(cfg: TrainConfig) -> Optional[State]:
    """A Wan warm start's plan as a table artifact before anything launches; a BAD-WEIGHTS state (exit 7, every
    problem listed) when the weights do not fit."""
    try:
        transfer = check_wan_init(cfg)
    except WeightsError as exc:
        return Failed(name=BAD_WEIGHTS, message=f"{BAD_WEIGHTS}: warm start from Wan: {exc}")
    if transfer is not None:
        get_run_logger().info("video DiT will start %s", transfer.summary())
        create_table_artifact(transfer.rows(), key="wan-warm-start", description=transfer.summary())
    return None


@flow(name="train")
def train_flow(
    config: TrainConfig,
    gates: Optional[TrainingGateConfig] = None,
    launch: LaunchSpec = LaunchSpec(),
    review: ReviewOptions = ReviewOptions(),
    retry_per_sample_noise: bool = True,
    timeout_s: Optional[float] = None,
    peer_wait_s: float = 60.0,
) -> State:
    """`config`: a training.train_config.TrainConfig (a mapping of its fields in prefect.yaml and the UI, validated with
    its types before the run starts; an unknown key is an error); `gates`: a training.gates.TrainingGateConfig.

    `launch`: where the trainer processes run (training.launch.LaunchSpec; multi-node runs need a shared out_dir);
    `review`: how the review gate is answered when nobody does (training.gates.ReviewOptions).
    peer_wait_s: how long a node waits, after its launcher exits, for the other nodes' ranks' statuses.
    timeout_s bounds each launch of the trainer (one stretch between gates).
    """
    spec = launch if isinstance(launch, LaunchSpec) else LaunchSpec(**launch)  # .fn callers may pass mappings
    review = review if isinstance(review, ReviewOptions) else ReviewOptions(**review)
    plan = check_launch(spec)  # bad launch settings fail here, before anything starts
    logger = get_run_logger()
    base_cfg = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)  # .fn callers: a dict
    gate_cfg = gates if isinstance(gates, TrainingGateConfig) else TrainingGateConfig(**(gates or {}))
    bad_weights = None if any(Path(base_cfg.out_dir).glob("run-*/checkpoints/step*")) else publish_wan_plan(base_cfg)
    if bad_weights is not None:  # (a run that has checkpoints resumes them: the warm start is behind it)
        return bad_weights
    if spec.multi_node:
        logger.info("node %d of %d, %d trainer processes in all (%s)", spec.node_rank, spec.nnodes,
                    plan.world_size, spec.launcher)
    base_dir = Path(base_cfg.out_dir)
    book = GateBook(base_dir, spec, gate_cfg)
    logger.info("gate steps: %s (of %d)", gate_cfg.judged_at(base_cfg.total_steps), base_cfg.total_steps)
    cfg = base_cfg
    tried: set[Path] = set()
    notes: list[str] = []
    while True:
        cfg = replace(cfg, out_dir=str(attempt_dir(base_dir, cfg)))
        if Path(cfg.out_dir) in tried:  # a fallback that changes nothing would loop forever
            return Failed(name="NO-GO", message=f"no further fallback: {cfg.out_dir} was already tried")
        tried.add(Path(cfg.out_dir))
        outcome = _run_attempt(cfg, spec, gate_cfg, book, base_dir, timeout_s, peer_wait_s, retry_per_sample_noise,
                               review)
        if isinstance(outcome, Retry):
            logger.warning("%s", outcome.reason)
            notes.append(outcome.reason)
            cfg = outcome.cfg
            continue
        if notes and outcome.message:
            outcome.message += " | fallbacks taken: " + "; ".join(notes)
        return outcome


def add_launch_arguments(parser) -> None:
    """`dualforce train`'s launch flags: one per LaunchSpec field (its metadata gives the help, the flag's name
    when it is not the field's, and a lower bound), so the fields are declared once."""
    hints = get_type_hints(LaunchSpec)
    for f in fields(LaunchSpec):
        flag = f.metadata.get("flag", "--" + f.name.replace("_", "-"))
        kind = hints[f.name]
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", help=f.metadata["help"])
            continue
        choices = get_args(kind) if get_origin(kind) is Literal else None
        number = int in get_args(kind) or kind is int
        convert = at_least(f.metadata["min"]) if "min" in f.metadata else (int if number else None)
        parser.add_argument(flag, dest=f.name, default=f.default, choices=choices, type=convert,
                            help=f.metadata["help"])


def launch_kwargs(ns) -> dict[str, Any]:
    """The LaunchSpec fields of parsed flags (add_launch_arguments)."""
    return {f.name: getattr(ns, f.name) for f in fields(LaunchSpec)}


def add_review_arguments(parser) -> None:
    """How the sample-review gate (gates' review_step) is answered when no person does (ReviewOptions)."""
    parser.add_argument("--auto-approve", action="store_true", help="answer the sample review with continue")
    parser.add_argument("--review-timeout", type=at_least(1), default=ReviewOptions.timeout_s,
                        help="seconds the review waits for a person")
    parser.add_argument("--review-on-timeout", choices=get_args(OnTimeout), default=ReviewOptions.on_timeout)


def review_options(ns) -> ReviewOptions:
    return ReviewOptions(auto_approve=ns.auto_approve, timeout_s=ns.review_timeout, on_timeout=ns.review_on_timeout)
