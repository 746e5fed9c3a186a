"""The training program as one flow: concept -> pretrain -> joint, each stage entered or branched by its gates.

    concept   one train flow per struct-noise ceiling; go when the chosen ceiling's loss converges, else NO-GO
    pretrain  the video DiT alone on video-only shards, warm-started from Wan 2.1 weights when init_from names them
              (checked before the first stage runs: BAD-WEIGHTS, exit 7); its convergence gate at N decides joint's start:
                GO    -> joint's video DiT starts from pretrain's weights (new modules zero-gated)
                NO-GO -> option B: joint from scratch on talking-head data (recorded, with the gate's reason)
    joint     the full model: memory gate on the first steps, joint progress at 5K, the sample review

Every stage is the train flow (flows/train.py) as a subflow, so each gate is judged live, when its step is reached.
The program file is training/program.py's; OUT/program.json records every stage run, verdict and branch.
Re-running the program resumes: finished stages re-judge from their files without training again.

    dualforce program configs/program-lite.yaml [--auto-approve]
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional, Union

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.states import Failed, State

from flows.outcomes import BAD_WEIGHTS
from flows.train import train_flow
from models.weights import WeightsError
from tasks.reasons import shorten
from training import checkpoint
from training.gates import ReviewOptions, read_gate_log
from training.launch import LaunchSpec
from training.metrics import METRICS_FILE, read_metrics
from training.program import ConceptSpec, ProgramConfig, StageSpec, load_program
from training.program_record import ProgramRecord, StageRun
from training.shard_sets import train_data_fields
from training.train_config import TrainConfig
from training.warm_start import check_wan_init


def stage_config(spec: StageSpec, out_dir: Path, video_only: bool = False, **fields: Any) -> dict[str, Any]:
    """A TrainConfig dict: the stage's data fields, its train settings, then what the program sets."""
    cfg = {**train_data_fields(spec.shards, spec.split, video_only=video_only), **spec.train,
           "out_dir": str(out_dir), **fields}
    return cfg


def _stage_run(stage: str, run: str, state: State, train_dir: Path, seconds: float) -> StageRun:
    gates = read_gate_log(train_dir)
    run_dir = Path(gates[-1]["run_dir"]) if gates else None  # the attempt the train flow ended in
    records = read_metrics(run_dir / METRICS_FILE) if run_dir else []
    steps = max((r["step"] for r in records if "loss" in r), default=0)
    verdict = "GO" if state.is_completed() else state.name
    return StageRun(stage, run, verdict, state.message or "", str(train_dir), str(run_dir) if run_dir else None, steps,
                    seconds, gates)


def _train(stage: str, run: str, cfg: dict[str, Any], spec: StageSpec, program: ProgramConfig,
           record: ProgramRecord, review: ReviewOptions = ReviewOptions()) -> tuple[State, StageRun]:
    t0 = time.perf_counter()
    launch = LaunchSpec(nproc_per_node=program.launch.nproc_per_node, launcher=program.launch.launcher)
    state = train_flow.with_options(flow_run_name=f"{program.name}-{stage}-{run.replace(' ', '-')}")(
        cfg, gates=spec.gates, launch=launch, review=review, return_state=True)
    entry = _stage_run(stage, run, state, Path(cfg["out_dir"]), time.perf_counter() - t0)
    record.add(entry)
    _publish(record)
    return state, entry


def _publish(record: ProgramRecord, headline: Optional[str] = None) -> None:
    create_markdown_artifact(record.markdown(headline), key="training-program", description=headline or "in progress")


def run_concept(spec: ConceptSpec, program: ProgramConfig, record: ProgramRecord) -> Optional[State]:
    """One run per ceiling; a verdict table of all of them; None when the chosen ceiling converged."""
    logger = get_run_logger()
    chosen: Optional[StageRun] = None
    converged = False
    rows = []
    for ceiling in spec.sigma_struct_max:
        options = dict(spec.train.get("loss_options", {}), sigma_struct_max=ceiling)
        cfg = stage_config(spec, Path(program.out_dir) / "concept" / f"sigma-{ceiling:g}", loss_options=options)
        state, entry = _train("concept", f"sigma_s max {ceiling:g}", cfg, spec, program, record)
        convergence = next((g for g in entry.gates if g["gate"] == "convergence"), None)
        rows.append({"sigma_struct_max": ceiling, "chosen": ceiling == spec.chosen, "verdict": entry.verdict,
                     "loss_at_gate": (convergence or {}).get("numbers", {}).get("loss_at_step"),
                     "steps": entry.steps, "detail": shorten(entry.message)})
        if ceiling == spec.chosen:
            chosen = entry
            converged = entry.verdict == "GO" and (convergence or {}).get("verdict") == "GO"
        logger.info("concept, sigma_s max %g: %s", ceiling, entry.verdict)
    create_table_artifact(rows, key="training-program-concept",
                          description=f"concept: one run per struct-noise ceiling; chosen {spec.chosen:g}")
    assert chosen is not None  # the program file's validator guarantees it
    if converged:
        record.decide("concept", "go on", f"the multimodal loss converged at sigma_s max {spec.chosen:g}")
        return None
    record.decide("concept", "stop", f"sigma_s max {spec.chosen:g}: {chosen.verdict}: {shorten(chosen.message)}")
    return Failed(name=chosen.verdict if chosen.verdict != "GO" else "NO-GO",
                  message=f"NO-GO: concept (sigma_s max {spec.chosen:g}): {chosen.message}. Recommendation: the "
                          "dual-stream objective does not converge at this scale; revisit the struct noise ceiling, "
                          "the loss weights or the data before spending a pretraining run")


def _wan_field(spec: StageSpec) -> dict[str, Any]:
    return {"init_from_wan": spec.init_from.train_field()} if spec.init_from is not None else {}


def pretrain_config(spec: StageSpec, program: ProgramConfig) -> dict[str, Any]:
    return stage_config(spec, Path(program.out_dir) / "pretrain", video_only=True, save_weights=True,
                        **_wan_field(spec))


def check_warm_starts(program: ProgramConfig) -> tuple[Optional[State], dict[str, str]]:
    """Every stage's Wan warm start checked before the first stage runs (its weights' headers only): a BAD-WEIGHTS
    state listing every problem, or the stages' start labels ("from wan (N of M tensors, blocks ...)")."""
    labels: dict[str, str] = {}
    for stage, build in (("pretrain", lambda s: pretrain_config(s, program)),
                         ("joint", lambda s: stage_config(s, Path(program.out_dir) / "joint", **_wan_field(s)))):
        spec = getattr(program, stage)
        if spec is None or spec.init_from is None:
            continue
        try:
            plan = check_wan_init(TrainConfig.from_dict(build(spec)))
        except WeightsError as exc:
            return Failed(name=BAD_WEIGHTS, message=f"{BAD_WEIGHTS}: {stage}.init_from: {exc}. Remove "
                                                     f"{stage}.init_from to train that stage from scratch"), labels
        labels[stage] = plan.summary()
        create_table_artifact(plan.rows(), key=f"training-program-{stage}-wan-warm-start", description=plan.summary())
    return None, labels


def run_pretrain(spec: StageSpec, program: ProgramConfig, record: ProgramRecord,
                 start: str = "") -> tuple[Optional[State], Optional[str]]:
    """(a state that ends the program, or None; the weights file joint starts from, or None for option B)."""
    cfg = pretrain_config(spec, program)
    state, entry = _train("pretrain", f"video-only, {start}" if start else "video-only", cfg, spec, program, record)
    if state.is_completed():
        ckpt = Path(entry.run_dir) / "checkpoints"
        weights = checkpoint.weights_path(ckpt, checkpoint.latest_tag(ckpt))
        record.decide("pretrain", f"joint starts from pretrain's video DiT (step {entry.steps})",
                      f"convergence gate GO: {shorten(entry.message)}")
        return None, str(weights)
    if state.name == "NO-GO" and (state.message or "").startswith("NO-GO: convergence"):
        record.decide("pretrain", "option B: joint starts from scratch on talking-head data",
                      f"pretrain's convergence gate said NO-GO: {shorten(state.message or '', 300)}")
        return None, None
    record.decide("pretrain", "stop", f"{state.name}: {shorten(state.message or '', 300)}")
    return Failed(name=state.name, message=state.message), None  # a fresh state: the program's, not the subflow's


@flow(name="training-program")
def training_program(
    program: Union[str, dict[str, Any]],
    auto_approve: Optional[bool] = None,
    review_timeout_s: Optional[int] = None,
) -> Union[dict, State]:
    """`program`: a program file (YAML/JSON, training/program.py) or its content as a dict.
    `auto_approve` / `review_timeout_s` override the file's review settings (unattended and CI runs)."""
    logger = get_run_logger()
    cfg = load_program(program)
    review = cfg.review.model_copy(update={k: v for k, v in (("auto_approve", auto_approve),
                                                              ("timeout_s", review_timeout_s)) if v is not None})
    record = ProgramRecord(cfg.name, Path(cfg.out_dir))
    stages = [s for s in ("concept", "pretrain", "joint") if getattr(cfg, s) is not None]
    logger.info("training program %s: %s -> %s", cfg.name, " -> ".join(stages), cfg.out_dir)

    stop, starts = check_warm_starts(cfg)
    if stop is not None:
        _publish(record, stop.name)
        return stop
    if cfg.concept is not None:
        stop = run_concept(cfg.concept, cfg, record)
        if stop is not None:
            _publish(record, stop.name)
            return stop
    init_from = None
    if cfg.pretrain is not None:
        stop, init_from = run_pretrain(cfg.pretrain, cfg, record, starts.get("pretrain", ""))
        if stop is not None:
            _publish(record, stop.name)
            return stop
    else:
        record.decide("pretrain", f"joint starts {starts.get('joint', 'from scratch')}", "the program has no pretrain stage")
    start = "from pretrain" if init_from else starts.get("joint", "from scratch")
    folder = start.split(" (")[0].replace(" ", "-")  # from-pretrain | from-wan | from-scratch
    joint_cfg = stage_config(cfg.joint, Path(cfg.out_dir) / "joint" / folder, init_from=init_from,
                             save_weights=True, **({} if init_from else _wan_field(cfg.joint)))
    state, _ = _train("joint", start, joint_cfg, cfg.joint, cfg, record,
                      review=ReviewOptions(review.auto_approve, review.timeout_s, review.on_timeout))
    if not state.is_completed():
        record.decide("joint", "stop", f"{state.name}: {shorten(state.message or '', 300)}")
        _publish(record, state.name)
        return Failed(name=state.name, message=state.message)  # the program ends as its stage did (exit code)
    record.decide("joint", "done", state.message or "")
    _publish(record, "GO")
    return {"program": cfg.name, "record": str(record.save()), "stages": record.table(),
            "decisions": record.decisions, "joint_dir": joint_cfg["out_dir"]}

